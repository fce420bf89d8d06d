//! Round trips through the public Rust API: create, write, reopen, read; check and rebuild;
//! and a table of corrupt headers, one patched field each, with the exact error variant.

#![allow(clippy::unwrap_used)] // a test crate: a failed unwrap is a failed test
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;

use qcowrs::CreateOptions;
use qcowrs::{check_path, Error, OpenOptions, QcowFile, Repair};

fn create(dir: &tempfile::TempDir, name: &str, size: u64, cluster_size: u64, refcount_bits: u32) -> std::path::PathBuf {
    let p = dir.path().join(name);
    let opts = CreateOptions { virtual_size: size, cluster_size, refcount_bits, ..CreateOptions::default() };
    QcowFile::create(&p, &opts).unwrap().close().unwrap();
    p
}

#[test]
fn create_write_reopen_read_every_refcount_width() {
    let dir = tempfile::tempdir().unwrap();
    for (cs, bits) in [(512u64, 1u32), (4096, 2), (65536, 16), (65536, 64), (2 << 20, 8)] {
        let p = create(&dir, &format!("img-{cs}-{bits}.qcow2"), 8 << 20, cs, bits);
        let mut model = vec![0u8; 8 << 20];
        {
            let mut f = QcowFile::open(&p, OpenOptions { writable: true, ..OpenOptions::default() }).unwrap();
            for (i, off) in [0u64, 777, 65_000, 3 << 20, (8 << 20) - 5000].into_iter().enumerate() {
                let data = vec![u8::try_from(i + 1).unwrap(); 4000];
                f.seek(SeekFrom::Start(off)).unwrap();
                f.write_all(&data).unwrap();
                model[off as usize..off as usize + 4000].copy_from_slice(&data);
            }
            f.write_zeroes(1 << 20, 1 << 20).unwrap();
            f.close().unwrap();
        }
        let mut f = QcowFile::open_read_only(&p).unwrap();
        let mut back = Vec::new();
        f.read_to_end(&mut back).unwrap();
        assert!(back == model, "content differs for cluster size {cs}, refcount bits {bits}");
        let r = check_path(&p, Repair::None, false).unwrap();
        assert!(r.is_clean(), "{cs}/{bits}: {r:?}");
    }
}

#[test]
fn rebuild_after_losing_cluster0_refcount_keeps_content() {
    let dir = tempfile::tempdir().unwrap();
    let p = create(&dir, "r.qcow2", 4 << 20, 512, 16);
    {
        let mut f = QcowFile::open(&p, OpenOptions { writable: true, ..OpenOptions::default() }).unwrap();
        f.write_all(&vec![0x5a; 1 << 20]).unwrap();
        f.close().unwrap();
    }
    // Zero cluster 0's refcount (refblock 0 is right after the one-cluster reftable).
    let file = std::fs::OpenOptions::new().read(true).write(true).open(&p).unwrap();
    let mut rt = [0u8; 8];
    file.read_exact_at(&mut rt, 512).unwrap();
    file.write_all_at(&[0, 0], u64::from_be_bytes(rt)).unwrap();
    drop(file);
    assert!(check_path(&p, Repair::None, false).unwrap().counts.corruptions > 0);
    let mut f = QcowFile::open(&p, OpenOptions { writable: true, ..OpenOptions::default() }).unwrap();
    assert!(f.refcounts_stale());
    assert!(matches!(f.write_all(b"x").map_err(|e| e.into_inner()), Err(Some(_))));
    drop(f);
    let f = QcowFile::open(&p, OpenOptions { writable: true, rebuild: true, ..OpenOptions::default() }).unwrap();
    assert!(f.rebuild_report().is_some_and(|r| r.rebuilt));
    drop(f);
    let r = check_path(&p, Repair::None, false).unwrap();
    assert!(r.is_clean(), "{r:?}");
    let mut back = vec![0u8; 1 << 20];
    QcowFile::open_read_only(&p).unwrap().read_exact(&mut back).unwrap();
    assert!(back.iter().all(|&b| b == 0x5a));
}

#[test]
fn corrupt_headers_each_give_their_error() {
    let dir = tempfile::tempdir().unwrap();
    let good = create(&dir, "good.qcow2", 64 << 20, 65536, 16);
    let bytes = std::fs::read(&good).unwrap();
    type Check = fn(&Error) -> bool;
    let cases: Vec<(&str, usize, Vec<u8>, Check)> = vec![
        ("magic", 0, b"QFI\xfa".to_vec(), |e| matches!(e, Error::InvalidMagic(_))),
        ("version", 4, 4u32.to_be_bytes().to_vec(), |e| matches!(e, Error::UnsupportedVersion(4))),
        ("cluster_bits", 20, 22u32.to_be_bytes().to_vec(), |e| matches!(e, Error::InvalidClusterSize(_))),
        ("crypt_method", 32, 2u32.to_be_bytes().to_vec(), |e| matches!(e, Error::UnsupportedFeature(_))),
        ("l1_size", 36, 0u32.to_be_bytes().to_vec(), |e| matches!(e, Error::CorruptImage { .. })),
        ("l1_table_offset", 40, 0x30200u64.to_be_bytes().to_vec(), |e| matches!(e, Error::InvalidOffset { .. })),
        ("refcount_table_clusters", 56, 0u32.to_be_bytes().to_vec(), |e| {
            matches!(e, Error::InvalidRefcountTableSize(_))
        }),
        ("incompatible_features", 72, (1u64 << 40).to_be_bytes().to_vec(), |e| {
            matches!(e, Error::UnsupportedFeature(_))
        }),
        ("refcount_order", 96, 7u32.to_be_bytes().to_vec(), |e| matches!(e, Error::CorruptImage { .. })),
    ];
    for (field, off, patch, is_expected) in cases {
        let mut b = bytes.clone();
        b[off..off + patch.len()].copy_from_slice(&patch);
        let p = dir.path().join(format!("bad-{field}.qcow2"));
        std::fs::write(&p, &b).unwrap();
        let e = QcowFile::open_read_only(&p).unwrap_err();
        assert!(is_expected(&e), "{field}: got {e:?}");
        assert!(e.to_string().contains(field) || field == "magic" || field == "version", "{field}: message {e}");
        assert_eq!(std::fs::read(&p).unwrap(), b, "{field}: a read-only open changed the file");
    }
}
