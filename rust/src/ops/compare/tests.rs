use std::path::Path;
use std::sync::Arc;

use super::status::{Chain, Flags};
use super::*;
use crate::create::{create_on, CreateOptions};
use crate::qcow_file::QcowFile;
use crate::storage::MemStorage;

fn image(size: u64, cluster_size: u64) -> QcowFile {
    let opts = CreateOptions { virtual_size: size, cluster_size, ..CreateOptions::default() };
    create_on(Arc::new(MemStorage::default()), &opts).unwrap()
}

fn extended(size: u64) -> QcowFile {
    let opts = CreateOptions { virtual_size: size, extended_l2: true, ..CreateOptions::default() };
    create_on(Arc::new(MemStorage::default()), &opts).unwrap()
}

fn no_progress(_: u64, _: u64) -> Result<()> {
    Ok(())
}

/// QEMU's loop over two open images (what `compare` does after opening them).
fn outcome(a: &QcowFile, b: &QcowFile, strict: bool, threads: usize) -> Result<Outcome, CompareError> {
    walked(a, b, strict, threads, true)
}

fn walked(a: &QcowFile, b: &QcowFile, strict: bool, threads: usize, skip: bool) -> Result<Outcome, CompareError> {
    let mut walk = Walk::new([Chain::new(a).unwrap(), Chain::new(b).unwrap()], strict);
    walk.skip_empty_stretches = skip;
    if strict && walk.sizes[0] != walk.sizes[1] {
        return Ok(Outcome::SizeMismatch);
    }
    let names = ["a".to_string(), "b".to_string()];
    run(walk, [a, b], &names, threads, &no_progress)
}

#[test]
fn equal_content_in_different_layouts_is_identical() {
    let mut a = image(8 << 20, 65536);
    let mut b = image(8 << 20, 512);
    a.write_at(&[7u8; 300_000], 1 << 20).unwrap();
    b.write_at(&[7u8; 300_000], 1 << 20).unwrap();
    // Zeros written as data on one side only are still equal content.
    a.write_at(&[0u8; 65536], 4 << 20).unwrap();
    for threads in [1, 4] {
        assert_eq!(outcome(&a, &b, false, threads).unwrap(), Outcome::Identical);
    }
    // Strict: `a` allocates whole 64 KiB clusters, `b` stops at the sector after the data.
    assert_eq!(outcome(&a, &b, true, 2).unwrap(), Outcome::StatusMismatch((1 << 20) + 300_032));
}

#[test]
fn a_difference_is_reported_at_the_start_of_its_sector() {
    let mut a = image(4 << 20, 65536);
    let mut b = image(4 << 20, 65536);
    a.write_at(&[1u8; 65536], 0).unwrap();
    b.write_at(&[1u8; 65536], 0).unwrap();
    b.write_at(&[2u8], 1000).unwrap();
    assert_eq!(outcome(&a, &b, false, 2).unwrap(), Outcome::ContentMismatch(512));
    // Data on one side only (the other unallocated): the first non-zero sector.
    let mut c = image(4 << 20, 65536);
    c.write_at(&[0u8; 65536], 3 << 20).unwrap();
    c.write_at(&[9u8], (3 << 20) + 5000).unwrap();
    assert_eq!(outcome(&image(4 << 20, 65536), &c, false, 2).unwrap(), Outcome::ContentMismatch((3 << 20) + 4608));
}

#[test]
fn the_first_difference_in_guest_order_wins() {
    let mut a = image(64 << 20, 65536);
    let mut b = image(64 << 20, 65536);
    let data = vec![3u8; 64 << 20];
    a.write_at(&data, 0).unwrap();
    b.write_at(&data, 0).unwrap();
    b.write_at(&[4u8], 60 << 20).unwrap();
    b.write_at(&[4u8], (10 << 20) + 513).unwrap();
    for threads in [1, 2, 8] {
        assert_eq!(outcome(&a, &b, false, threads).unwrap(), Outcome::ContentMismatch((10 << 20) + 512));
    }
}

#[test]
fn a_longer_image_must_read_as_zeros_past_the_shorter() {
    let a = image(1 << 20, 65536);
    let mut b = image(2 << 20, 65536);
    assert_eq!(outcome(&a, &b, false, 2).unwrap(), Outcome::Identical);
    b.write_at(&[0u8; 4096], 1 << 20).unwrap();
    assert_eq!(outcome(&a, &b, false, 2).unwrap(), Outcome::Identical);
    b.write_at(&[5u8], (3 << 19) + 7).unwrap();
    assert_eq!(outcome(&b, &a, false, 2).unwrap(), Outcome::ContentMismatch(3 << 19));
    assert_eq!(outcome(&a, &b, true, 2).unwrap(), Outcome::SizeMismatch);
}

#[test]
fn empty_images_with_other_l2_spans_differ_in_strict_mode_only() {
    // 64 KiB clusters: one answer per L2 table (512 MiB), the last one with EOF; 2 MiB
    // clusters: one answer for the whole GiB, with EOF at once (as qemu-img 10 says).
    let (a, b) = (image(1 << 30, 65536), image(1 << 30, 2 << 20));
    assert_eq!(outcome(&a, &b, false, 2).unwrap(), Outcome::Identical);
    assert_eq!(outcome(&a, &b, true, 2).unwrap(), Outcome::StatusMismatch(0));
}

#[test]
fn strict_mode_computes_its_way_over_empty_stretches_as_qemu_walks_them() {
    // Offsets qemu-img 10 reports for these pairs of empty images.
    let g = 1u64 << 30;
    assert_eq!(
        outcome(&image(5 * g, 65536), &image(5 * g, 2 << 20), true, 1).unwrap(),
        Outcome::StatusMismatch(3584 << 20)
    );
    assert_eq!(
        outcome(&image(64 * g, 65536), &image(64 * g, 2 << 20), true, 1).unwrap(),
        Outcome::StatusMismatch(62 * g + (g >> 1))
    );
    assert_eq!(
        outcome(&extended(192 * g), &image(192 * g, 2 << 20), true, 1).unwrap(),
        Outcome::StatusMismatch(190 * g + (16 << 20))
    );
    // The same answers as walking QEMU's loop, with data here and there.
    for (size, cs_a, cs_b, data) in [
        (5 * g, 65536, 2 << 20, None),
        (5 * g, 2 << 20, 1 << 20, Some(3 * g)),
        (3 * g + 512, 4096, 2 << 20, Some(g + 4096)),
        (9 * g, 1 << 20, 2 << 20, Some(8 * g)),
        (9 * g, 1 << 20, 1 << 20, Some(7 * g)),
        (700 << 20, 512, 65536, Some(650 << 20)),
    ] {
        let (mut a, mut b) = (image(size, cs_a), image(size, cs_b));
        if let Some(at) = data {
            a.write_at(&[1u8; 4096], at).unwrap();
            b.write_at(&[1u8; 4096], at).unwrap();
        }
        let fast = walked(&a, &b, true, 1, true).unwrap();
        assert_eq!(fast, walked(&a, &b, true, 1, false).unwrap(), "{size} {cs_a} {cs_b} {data:?}");
        assert_eq!(walked(&b, &a, true, 1, true).unwrap(), fast);
    }
}

#[test]
fn a_2_61_byte_disk_compares_at_once() {
    let (a, b) = (image(1 << 61, 2 << 20), image(1 << 61, 2 << 20));
    assert_eq!(outcome(&a, &b, false, 2).unwrap(), Outcome::Identical);
    assert_eq!(outcome(&a, &b, true, 2).unwrap(), Outcome::Identical);
    // 2^29 slices of 512 MiB against 2^28 of 1 GiB (4 KiB cache entries for both).
    let (c, d) = (image(1 << 58, 1 << 20), image(1 << 58, 2 << 20));
    assert_eq!(outcome(&c, &d, false, 2).unwrap(), Outcome::Identical);
    assert_eq!(outcome(&c, &d, true, 2).unwrap(), Outcome::StatusMismatch((1 << 58) - (1 << 30)));
}

#[test]
fn l2_tables_named_twice_are_refused() {
    let mut f = image(1 << 30, 65536);
    f.write_at(&[1u8; 512], 0).unwrap();
    f.flush().unwrap();
    let (raw, h) = (f.raw_file().clone(), f.header().clone());
    drop(f);
    let l1 = raw.read_u64_table(h.l1_table_offset, u64::from(h.l1_size), "L1").unwrap();
    raw.write_u64_table(h.l1_table_offset, &vec![l1[0]; l1.len()], "L1").unwrap();
    let f = QcowFile::open_storage(Arc::clone(raw.storage()), Path::new("mem"), crate::OpenOptions::default()).unwrap();
    let err = Chain::new(&f).err().unwrap();
    assert!(err.to_string().contains("is named by L1[0] and L1[1]"), "{err}");
}

#[test]
fn qcow2_answers_are_qemus() {
    // At most INT_MAX bytes per answer; EOF only when the answer reaches the end.
    let big = image(5 << 30, 2 << 20);
    let mut c = Chain::new(&big).unwrap();
    assert_eq!(c.status(0, 5 << 30, false).unwrap(), (Flags::ZERO, 0x7fff_ffff));
    let (f, n) = c.status(4 << 30, 1 << 30, false).unwrap();
    assert_eq!((f, n), (Flags::ZERO.with(Flags::EOF), 1 << 30));
    // Compressed clusters one at a time; contiguous data clusters together.
    let mut q = image(1 << 20, 65536);
    assert!(q.write_compressed(0, &[1u8; 65536]).unwrap());
    assert!(q.write_compressed(65536, &[2u8; 65536]).unwrap());
    q.write_at(&[3u8; 3 * 65536], 4 * 65536).unwrap();
    let mut c = Chain::new(&q).unwrap();
    let compressed = Flags::DATA.with(Flags::COMPRESSED).with(Flags::ALLOCATED);
    assert_eq!(c.status(0, 1 << 20, false).unwrap(), (compressed, 65536));
    assert_eq!(c.status(65536, 1 << 20, false).unwrap(), (compressed, 65536));
    let data = Flags::DATA.with(Flags::OFFSET_VALID).with(Flags::ALLOCATED);
    assert_eq!(c.status(5 * 65536, 1 << 20, false).unwrap(), (data, 2 * 65536));
    assert_eq!(c.status(7 * 65536, 1 << 20, false).unwrap(), (Flags::ZERO.with(Flags::EOF), (1 << 20) - 7 * 65536));
}

#[test]
fn compare_opens_like_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let (a, missing) = (dir.path().join("a.qcow2"), dir.path().join("missing"));
    let raw = dir.path().join("a.raw");
    let opts = CreateOptions { virtual_size: 1 << 20, ..CreateOptions::default() };
    drop(QcowFile::create(&a, &opts).unwrap());
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    let run = |x: &Path, y: &Path, o: &CompareOptions| compare(x, y, o, &no_progress);
    let c = run(&a, &raw, &CompareOptions::default()).unwrap();
    assert_eq!((c.outcome, c.sizes), (Outcome::Identical, [1 << 20, 1 << 20]));
    let strict = CompareOptions { strict: true, ..CompareOptions::default() };
    assert_eq!(run(&a, &raw, &strict).unwrap().outcome, Outcome::StatusMismatch(0));
    let e = run(&a, &missing, &CompareOptions::default()).unwrap_err();
    assert_eq!(e.stage, Stage::Open);
    let m = missing.display();
    assert!(e.to_string().starts_with(&format!("Could not open '{m}': Could not open '{m}': ")), "{e}");
    let foo = CompareOptions { format_a: Some("foo".into()), ..CompareOptions::default() };
    let e = run(&missing, &a, &foo).unwrap_err();
    assert_eq!(e.to_string(), format!("Could not open '{m}': Unknown driver 'foo'"));
    let qcow2 = CompareOptions { format_b: Some("qcow2".into()), ..CompareOptions::default() };
    let e = run(&a, &raw, &qcow2).unwrap_err();
    assert!(e.to_string().ends_with(&format!("Could not open '{}': Image is not in qcow2 format", raw.display())));
}
