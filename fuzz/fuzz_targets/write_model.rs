//! Op programs against a freshly created in-memory image and a `Vec<u8>` shadow model (the
//! cloud-hypervisor `disk_qcow2_ops` idea). After every op the image reads back equal to the
//! model; at the end the closed image checks clean and reads back equal after a reopen.
//!
//! Input: 4 bytes of geometry, then 8-byte ops (at most `MAX_OPS`).
//! * byte 0: cluster size 512 << (b % 8) (512 B .. 64 KiB)
//! * byte 1: refcount bits 1 << (b % 7) (1 .. 64)
//! * byte 2: bit 0 extended L2 (if clusters >= 16 KiB), bit 1 lazy refcounts
//! * byte 3: virtual size, one of `SIZES`
//! * op: kind (u8), value (u8), length (u16 BE), offset (u32 BE); offset and length are
//!   reduced into the virtual size. Kinds (mod 7): 0 write, 1 write_zeroes, 2 discard,
//!   3 flush, 4 close and reopen, 5 truncate (grow by (length % 1024 + 1) * 512, up to
//!   `MAX_SIZE`), 6 a long write (length * 16 bytes).
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use qcowrs::{create_on, CreateOptions, MemStorage, QcowFile, Repair};
use qcowrs_fuzz::{check_mem, image_path, open_options};

const SIZES: [u64; 6] = [1 << 20, 64 << 10, (300 << 10) + 512, 2 << 20, 4096, 1_000_001];
const MAX_SIZE: u64 = 3 << 20;
const MAX_OPS: usize = 48;

struct Op {
    kind: u8,
    val: u8,
    len: u16,
    off: u32,
}

fn pattern(val: u8, op_index: usize, guest: u64, len: usize) -> Vec<u8> {
    (0..len as u64).map(|i| val.wrapping_add(((guest + i) / 251) as u8) ^ (op_index as u8).wrapping_mul(37)).collect()
}

fn reopen(mem: &Arc<MemStorage>, writable: bool) -> QcowFile {
    match QcowFile::open_storage(mem.clone(), image_path(), open_options(writable, false)) {
        Ok(f) => f,
        Err(e) => panic!("reopening a closed image failed: {e}"),
    }
}

fn assert_reads_as(f: &QcowFile, model: &[u8], after: &str) {
    assert_eq!(f.virtual_size(), model.len() as u64, "virtual size after {after}");
    let mut buf = vec![0u8; model.len()];
    match f.read_at(&mut buf, 0) {
        Ok(n) => assert_eq!(n, model.len(), "short read after {after}"),
        Err(e) => panic!("read failed after {after}: {e}"),
    }
    if buf != model {
        let first = buf.iter().zip(model).position(|(a, b)| a != b).unwrap_or(0);
        panic!(
            "after {after}: guest offset {first} reads 0x{:02x}, the model has 0x{:02x} (cluster size {})",
            buf[first],
            model[first],
            f.cluster_size()
        );
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let cluster_size = 512u64 << (data[0] % 8);
    let opts = CreateOptions {
        virtual_size: SIZES[data[3] as usize % SIZES.len()],
        cluster_size,
        refcount_bits: 1 << (data[1] % 7),
        extended_l2: data[2] & 1 != 0 && cluster_size >= 16 << 10,
        lazy_refcounts: data[2] & 2 != 0,
        ..CreateOptions::default()
    };
    let ops: Vec<Op> = data[4..]
        .chunks_exact(8)
        .take(MAX_OPS)
        .map(|c| Op {
            kind: c[0] % 7,
            val: c[1],
            len: u16::from_be_bytes([c[2], c[3]]),
            off: u32::from_be_bytes([c[4], c[5], c[6], c[7]]),
        })
        .collect();

    let mem = Arc::new(MemStorage::default());
    let mut f = match create_on(mem.clone(), &opts) {
        Ok(f) => f,
        Err(e) => panic!("create_on({opts:?}) failed: {e}"),
    };
    // qemu-img create (and qcowrs) round the size up to whole sectors.
    let mut model = vec![0u8; opts.virtual_size.div_ceil(512) as usize * 512];
    for (i, op) in ops.iter().enumerate() {
        let size = model.len() as u64;
        let off = u64::from(op.off) % size;
        let len = u64::from(op.len).min(size - off);
        let what = format!("op {i} (kind {} at {off} len {len}, {opts:?})", op.kind);
        let r = match op.kind {
            0 | 6 => {
                let len = if op.kind == 6 { (len * 16).min(size - off) } else { len } as usize;
                let buf = pattern(op.val, i, off, len);
                model[off as usize..off as usize + len].copy_from_slice(&buf);
                f.write_at(&buf, off)
            }
            1 => {
                model[off as usize..(off + len) as usize].fill(0);
                f.write_zeroes(off, len)
            }
            2 => {
                // Whole clusters inside the range read as zeros afterwards; partial ones are
                // left unchanged.
                let first = off.div_ceil(cluster_size) * cluster_size;
                let end = off + len;
                let last = if end == size { end } else { end / cluster_size * cluster_size };
                if last > first {
                    model[first as usize..last as usize].fill(0);
                }
                f.discard(off, len)
            }
            3 => f.flush(),
            4 => {
                if let Err(e) = f.close() {
                    panic!("{what}: close failed: {e}");
                }
                drop(f);
                f = reopen(&mem, true);
                Ok(())
            }
            _ => {
                let new_size = size + (u64::from(op.len) % 1024 + 1) * 512;
                if new_size > MAX_SIZE {
                    continue;
                }
                model.resize(new_size as usize, 0);
                f.truncate(new_size)
            }
        };
        if let Err(e) = r {
            panic!("{what} failed: {e}");
        }
        assert_reads_as(&f, &model, &what);
    }
    if let Err(e) = f.close() {
        panic!("final close failed: {e} ({opts:?})");
    }
    drop(f);
    match check_mem(&mem, Repair::None) {
        Ok(r) => assert!(r.is_clean(), "the image checks unclean after the program ({opts:?}): {r:?}"),
        Err(e) => panic!("check failed after the program ({opts:?}): {e}"),
    }
    assert_reads_as(&reopen(&mem, false), &model, "the final reopen");
});
