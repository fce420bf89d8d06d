//! Property test: random corruptions of a valid image's metadata never panic, hang or
//! allocate out of proportion; a read-only open, a full read, `allocated_ranges`, a check and a
//! repair each either work or return an `Error`.

#![allow(clippy::unwrap_used)] // a test crate: a failed unwrap is a failed test

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::Arc;

use proptest::prelude::*;
use qcowrs::{check_raw, CreateOptions, MemStorage, OpenOptions, QcowFile, QcowHeader, QcowRawFile, Repair};

/// A small valid image: 512-byte clusters (so a few KiB of metadata), data spread out.
fn base_image() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("base.qcow2");
    let opts =
        CreateOptions { virtual_size: 1 << 20, cluster_size: 512, refcount_bits: 16, ..CreateOptions::default() };
    let mut f = QcowFile::create(&p, &opts).unwrap();
    for (i, off) in [0u64, 5000, 70_000, 300_000, 1_000_000].into_iter().enumerate() {
        f.seek(SeekFrom::Start(off)).unwrap();
        f.write_all(&vec![u8::try_from(i + 1).unwrap(); 3000]).unwrap();
    }
    f.write_zeroes(600_000, 4096).unwrap();
    f.close().unwrap();
    drop(f);
    std::fs::read(&p).unwrap()
}

fn check_mem(mem: &Arc<MemStorage>, repair: Repair) -> qcowrs::Result<qcowrs::CheckReport> {
    let mut h = QcowHeader::read_from_lenient(&**mem)?;
    let raw = QcowRawFile::new(mem.clone(), h.cluster_size(), h.refcount_order, repair != Repair::None)?;
    check_raw(&raw, &mut h, repair, false)
}

/// Everything a user may do with an image, on an in-memory copy (the storage seam).
fn exercise(bytes: &[u8]) {
    let mem = Arc::new(MemStorage::new(bytes.to_vec()));
    if let Ok(f) = QcowFile::open_storage(mem.clone(), Path::new("<fuzzed>"), OpenOptions::default()) {
        let mut buf = vec![0u8; 64 << 10];
        let size = f.virtual_size().min(4 << 20);
        let mut off = 0;
        while off < size {
            match f.read_at(&mut buf, off) {
                Ok(0) | Err(_) => break,
                Ok(n) => off += n as u64,
            }
        }
        let _ = f.allocated_ranges();
    }
    assert_eq!(mem.to_vec(), bytes, "a read-only open changed the image");
    let _ = check_mem(&mem, Repair::None);
    assert_eq!(mem.to_vec(), bytes, "a check without repair changed the image");
    if check_mem(&mem, Repair::All).is_ok() {
        let opts = OpenOptions { writable: true, rebuild: true, ..OpenOptions::default() };
        if let Ok(mut f) = QcowFile::open_storage(mem.clone(), Path::new("<fuzzed>"), opts) {
            let _ = f.write_at(b"after repair", 0);
            let _ = f.close();
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, .. ProptestConfig::default() })]

    #[test]
    fn corrupted_metadata_never_panics(
        patches in proptest::collection::vec((0usize..4096, any::<u8>()), 1..12),
        interesting in proptest::collection::vec((prop::sample::select(vec![20usize, 24, 36, 40, 48, 56, 60, 64, 72, 96, 100]), any::<u64>()), 0..3),
    ) {
        let mut img = base_image_cached().clone();
        let len = img.len();
        for (off, v) in patches {
            // Metadata lives in the first few KiB at 512-byte clusters.
            let o = off % len.min(4096);
            img[o] = v;
        }
        for (field, v) in interesting {
            let b = v.to_be_bytes();
            let w = if [20usize, 36, 56, 60, 96, 100].contains(&field) { 4 } else { 8 };
            img[field..field + w].copy_from_slice(&b[8 - w..]);
        }
        exercise(&img);
    }
}

fn base_image_cached() -> &'static Vec<u8> {
    static BASE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BASE.get_or_init(base_image)
}
