//! `check_raw` with `Repair::All` on arbitrary bytes (in memory). The invariants:
//! * a repair that reports the image clean leaves an image that a fresh check finds clean, and
//!   that a second repair does not fail on;
//! * such an image, opened read-write (with `rebuild: true`), written and closed, has no
//!   corruptions or check errors (leaks are possible, see below);
//! * otherwise only: no panic, hang or runaway allocation.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use qcowrs::{MemStorage, QcowFile, Repair};
use qcowrs_fuzz::{check_mem, image_path, open_options, safe_to_open};

/// Host file size above which the image is not written to after the repair (a fuzzed
/// pointer far past the end would make the in-memory file huge; that is not a defect).
const MAX_FILE: usize = 64 << 20;

fuzz_target!(|data: &[u8]| {
    let mem = Arc::new(MemStorage::new(data.to_vec()));
    let Ok(first) = check_mem(&mem, Repair::All) else { return };
    let repaired_clean = first.is_clean();
    // A cluster two structures of the active tree share (a cross-link, repaired as QEMU does:
    // refcount 2, so both stay readable) is clean, but once a write copies it for one user the
    // other keeps an entry without OFLAG_COPIED at refcount 1, which QEMU's check (and ours)
    // reports; QEMU's own writes do the same. Known limitation (fuzz/RESULTS.md); such images
    // are only held to the repair invariants.
    let cross_linked = first.problems.list.iter().any(|p| p.kind == "cross-link");
    if repaired_clean {
        match check_mem(&mem, Repair::None) {
            Ok(r) => assert!(r.is_clean(), "repair reported clean: {first:?}\nbut a check then finds: {r:?}"),
            Err(e) => panic!("repair reported clean: {first:?}\nbut a check then fails: {e}"),
        }
        if let Err(e) = check_mem(&mem, Repair::All) {
            panic!("repair reported clean: {first:?}\nbut a second repair fails: {e}");
        }
    } else {
        let _ = check_mem(&mem, Repair::All);
    }
    if !safe_to_open(&mem) || mem.to_vec().len() > MAX_FILE {
        return;
    }
    let Ok(mut f) = QcowFile::open_storage(mem.clone(), image_path(), open_options(true, true)) else { return };
    let size = f.virtual_size();
    let mut wrote = true;
    for (off, len) in [(0u64, 700usize), (size / 2, 5000), (size.saturating_sub(100), 100)] {
        let len = len.min(usize::try_from(size.saturating_sub(off)).unwrap_or(0));
        if len > 0 && f.write_at(&vec![0x5a; len], off).is_err() {
            wrote = false;
            break;
        }
    }
    let closed = f.close().is_ok();
    drop(f);
    if repaired_clean && !cross_linked && wrote && closed {
        // Leaks are possible (and harmless): like qemu-img check, a check ignores refcounts of
        // clusters past the end of the file, so a nonzero one there is no leak until the file
        // grows over it, and the allocator (like QEMU's) does not reuse such a cluster.
        match check_mem(&mem, Repair::None) {
            Ok(r) => assert!(
                r.counts.check_errors == 0 && r.counts.corruptions == 0,
                "a clean repaired image, written and closed, checks: {r:?}"
            ),
            Err(e) => panic!("a clean repaired image, written and closed, fails the check: {e}"),
        }
    }
});
