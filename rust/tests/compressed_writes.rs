//! Compressed writes: clusters packed into shared host clusters (byte-granular allocation,
//! every host cluster touched counted once per compressed cluster), read back exactly, the
//! image clean; overwrites, copy-on-write from compressed clusters and discards keep it clean.

#![allow(clippy::unwrap_used)] // a test crate: a failed unwrap is a failed test

use std::path::Path;
use std::sync::Arc;

use qcowrs::{check_raw, create_on, CreateOptions, MemStorage, OpenOptions, QcowFile, QcowHeader, QcowRawFile, Repair};

/// A cluster of `cs` bytes that compresses to roughly `1 - noise` of its size.
fn cluster(seed: u64, cs: usize, noise: f64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..cs)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if ((x >> 11) % 1000) as f64 / 1000.0 < noise {
                (x >> 3) as u8
            } else {
                (i / 64) as u8 ^ seed as u8
            }
        })
        .collect()
}

fn clean(mem: &Arc<MemStorage>) {
    let mut h = QcowHeader::read_from(&**mem).unwrap();
    let raw = QcowRawFile::new(mem.clone(), h.cluster_size(), h.refcount_order, false).unwrap();
    let r = check_raw(&raw, &mut h, Repair::None, false).unwrap();
    assert!(r.is_clean(), "{r:?}");
}

fn run(cluster_size: u64, refcount_bits: u32, compression: u8, extended_l2: bool) {
    let cs = cluster_size as usize;
    let clusters = 40u64;
    // A partial last cluster where the cluster size allows one (sizes are whole sectors).
    let size = clusters * cluster_size - (cluster_size / 2) / 512 * 512;
    let mem = Arc::new(MemStorage::default());
    let opts =
        CreateOptions { virtual_size: size, cluster_size, refcount_bits, extended_l2, ..CreateOptions::default() };
    let mut f = create_on(mem.clone(), &opts).unwrap();
    if compression == 1 {
        drop(f);
        // zstd: set the header field and its incompatible bit by hand (create has no option).
        let mut b = mem.to_vec();
        let incompat = u64::from_be_bytes(b[72..80].try_into().unwrap()) | 8;
        b[72..80].copy_from_slice(&incompat.to_be_bytes());
        b[104] = 1;
        let m2 = Arc::new(MemStorage::new(b));
        return run_on(&m2, cs, size, clusters);
    }
    f.close().unwrap();
    drop(f);
    run_on(&mem, cs, size, clusters);
}

fn run_on(mem: &Arc<MemStorage>, cs: usize, size: u64, clusters: u64) {
    let opts = OpenOptions { writable: true, ..OpenOptions::default() };
    let mut f = QcowFile::open_storage(mem.clone(), Path::new("<mem>"), opts).unwrap();
    let mut model = vec![0u8; size as usize];
    let mut compressed = 0;
    for i in 0..clusters {
        let off = i * cs as u64;
        let n = (size - off).min(cs as u64) as usize;
        let noise = [0.0, 0.3, 0.6, 1.0][(i % 4) as usize];
        let data = cluster(i, cs, noise);
        if f.write_compressed(off, &data[..n]).unwrap() {
            compressed += 1;
        }
        model[off as usize..off as usize + n].copy_from_slice(&data[..n]);
    }
    assert!(compressed >= clusters / 2, "only {compressed} clusters compressed");
    f.flush().unwrap();
    let mut back = vec![0u8; size as usize];
    f.read_at(&mut back, 0).unwrap();
    assert!(back == model, "read back differs after compressed writes");
    // Overwrite parts: in place over compressed clusters means copy-on-write.
    for (i, off) in [(1u64, 100u64), (5, cs as u64 * 3 + 7), (9, cs as u64 * 8)] {
        let data = vec![i as u8; 3000];
        f.write_at(&data, off).unwrap();
        model[off as usize..off as usize + 3000].copy_from_slice(&data);
    }
    // Recompress one cluster over a compressed one, discard another.
    let data = cluster(99, cs, 0.0);
    f.write_compressed(cs as u64 * 12, &data).unwrap();
    model[cs * 12..cs * 13].copy_from_slice(&data);
    f.discard(cs as u64 * 14, cs as u64).unwrap();
    model[cs * 14..cs * 15].fill(0);
    f.close().unwrap();
    drop(f);
    clean(mem);
    let g = QcowFile::open_storage(mem.clone(), Path::new("<mem>"), OpenOptions::default()).unwrap();
    let mut back = vec![0u8; size as usize];
    g.read_at(&mut back, 0).unwrap();
    assert!(back == model, "read back differs after reopen");
}

#[test]
fn zlib_64k_clusters() {
    run(65536, 16, 0, false);
}

#[test]
fn zstd_64k_clusters() {
    run(65536, 16, 1, false);
}

#[test]
fn zlib_512_byte_clusters_1_bit_refcounts() {
    // 1-bit refcounts cannot count two compressed clusters in one host cluster: each gets its
    // own (as QEMU, whose alloc_bytes starts a new cluster at the refcount maximum).
    run(512, 1, 0, false);
}

#[test]
fn zlib_extended_l2() {
    run(65536, 64, 0, true);
}

#[test]
fn a_misaligned_or_partial_compressed_write_is_refused() {
    let mem = Arc::new(MemStorage::default());
    let opts = CreateOptions { virtual_size: 1 << 20, ..CreateOptions::default() };
    let mut f = create_on(mem, &opts).unwrap();
    assert!(f.write_compressed(512, &[0u8; 65536]).is_err());
    assert!(f.write_compressed(0, &[0u8; 4096]).is_err());
}
