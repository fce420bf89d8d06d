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

fn no_progress(_: u64, _: u64) -> Result<()> {
    Ok(())
}

/// QEMU's loop over two open images (what `compare` does after opening them).
fn outcome(a: &QcowFile, b: &QcowFile, strict: bool, threads: usize) -> Result<Outcome, CompareError> {
    let walk = Walk::new([Chain::new(a).unwrap(), Chain::new(b).unwrap()], strict);
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
fn qcow2_answers_are_qemus() {
    // At most INT_MAX bytes per answer; EOF only when the answer reaches the end.
    let big = image(5 << 30, 2 << 20);
    let mut c = Chain::new(&big).unwrap();
    assert_eq!(c.status(0, 5 << 30).unwrap(), (Flags::ZERO, 0x7fff_ffff));
    let (f, n) = c.status(4 << 30, 1 << 30).unwrap();
    assert_eq!((f, n), (Flags::ZERO.with(Flags::EOF), 1 << 30));
    // Compressed clusters one at a time; contiguous data clusters together.
    let mut q = image(1 << 20, 65536);
    assert!(q.write_compressed(0, &[1u8; 65536]).unwrap());
    assert!(q.write_compressed(65536, &[2u8; 65536]).unwrap());
    q.write_at(&[3u8; 3 * 65536], 4 * 65536).unwrap();
    let mut c = Chain::new(&q).unwrap();
    let compressed = Flags::DATA.with(Flags::COMPRESSED).with(Flags::ALLOCATED);
    assert_eq!(c.status(0, 1 << 20).unwrap(), (compressed, 65536));
    assert_eq!(c.status(65536, 1 << 20).unwrap(), (compressed, 65536));
    let data = Flags::DATA.with(Flags::OFFSET_VALID).with(Flags::ALLOCATED);
    assert_eq!(c.status(5 * 65536, 1 << 20).unwrap(), (data, 2 * 65536));
    assert_eq!(c.status(7 * 65536, 1 << 20).unwrap(), (Flags::ZERO.with(Flags::EOF), (1 << 20) - 7 * 65536));
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
