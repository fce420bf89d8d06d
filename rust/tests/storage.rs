//! The storage seam: images held in memory, and the recording storage's log of every write
//! and sync, checked against the flush ordering that makes a crash leave at worst leaks.

#![allow(clippy::unwrap_used)] // a test crate: a failed unwrap is a failed test

use std::path::Path;
use std::sync::Arc;

use qcowrs::{
    check_raw, create_on, replay, CreateOptions, MemStorage, OpenOptions, QcowFile, QcowHeader, QcowRawFile,
    RecordingStorage, Repair, StorageOp,
};

fn reopen(mem: &Arc<MemStorage>) -> QcowFile {
    QcowFile::open_storage(mem.clone(), Path::new("<memory>"), OpenOptions::default()).unwrap()
}

#[test]
fn an_image_in_memory_round_trips_and_checks_clean() {
    let mem = Arc::new(MemStorage::default());
    let opts = CreateOptions { virtual_size: 4 << 20, cluster_size: 4096, ..CreateOptions::default() };
    let mut f = create_on(mem.clone(), &opts).unwrap();
    let mut model = vec![0u8; 4 << 20];
    for (i, off) in [0u64, 5000, 1 << 20, (4 << 20) - 100].into_iter().enumerate() {
        let data = vec![u8::try_from(i + 1).unwrap(); 100];
        f.write_at(&data, off).unwrap();
        model[off as usize..off as usize + 100].copy_from_slice(&data);
    }
    f.discard(1 << 20, 4096).unwrap();
    model[1 << 20..(1 << 20) + 100].fill(0);
    f.close().unwrap();
    drop(f);
    let g = reopen(&mem);
    let mut back = vec![0u8; 4 << 20];
    assert_eq!(g.read_at(&mut back, 0).unwrap(), 4 << 20);
    assert!(back == model);
    let mut h = QcowHeader::read_from(&*mem).unwrap();
    let raw = QcowRawFile::new(mem.clone(), 4096, h.refcount_order, false).unwrap();
    let r = check_raw(&raw, &mut h, Repair::None, false).unwrap();
    assert!(r.is_clean(), "{r:?}");
}

/// Index of the last op satisfying `f`.
fn last(log: &[StorageOp], f: impl Fn(&StorageOp) -> bool) -> usize {
    log.iter().rposition(f).unwrap()
}

#[test]
fn a_flush_writes_data_then_l2_then_l1_each_synced() {
    let mem = Arc::new(MemStorage::default());
    let opts = CreateOptions { virtual_size: 64 << 20, ..CreateOptions::default() };
    create_on(mem.clone(), &opts).unwrap().close().unwrap();
    let base = mem.to_vec();
    let h = QcowHeader::read_from(&*mem).unwrap();
    let rec = Arc::new(RecordingStorage::new(mem.clone()));
    let opts = OpenOptions { writable: true, ..OpenOptions::default() };
    let mut f = QcowFile::open_storage(rec.clone(), Path::new("<memory>"), opts).unwrap();
    f.write_at(&[0x5a; 70_000], 3 << 20).unwrap();
    f.flush().unwrap();
    let log = rec.take_log();
    let is_write_in = |lo: u64, hi: u64| move |op: &StorageOp| matches!(op, StorageOp::Write { offset, .. } if (lo..hi).contains(offset));
    let l1 = (h.l1_table_offset, h.l1_table_offset + 8 * u64::from(h.l1_size));
    let l1_write = last(&log, is_write_in(l1.0, l1.1));
    // The L2 table is the one cluster-sized write right before the L1 entry's sync.
    let l2_write = last(
        &log[..l1_write],
        |op| matches!(op, StorageOp::Write { data, .. } if data.len() == 65536 && data[..8] != [0x5a; 8]),
    );
    let data_write =
        last(&log[..l2_write], |op| matches!(op, StorageOp::Write { data, .. } if data.first() == Some(&0x5a)));
    assert!(data_write < l2_write && l2_write < l1_write, "{data_write} {l2_write} {l1_write}");
    assert!(log[data_write..l2_write].contains(&StorageOp::Sync), "no sync between the data and the L2 table");
    assert!(log[l2_write..l1_write].contains(&StorageOp::Sync), "no sync between the L2 table and the L1 entry");
    assert_eq!(log.last(), Some(&StorageOp::Sync));
    // Every prefix of the log is an image that reads either nothing or the whole write.
    for cut in 0..=log.len() {
        let bytes = replay(&base, &log[..cut]).unwrap();
        let g = reopen(&Arc::new(MemStorage::new(bytes)));
        let mut b = vec![0u8; 70_000];
        g.read_at(&mut b, 3 << 20).unwrap();
        assert!(b.iter().all(|&x| x == 0) || b.iter().all(|&x| x == 0x5a), "prefix {cut} shows a torn write");
    }
}
