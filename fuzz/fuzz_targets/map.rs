//! `allocated_ranges()` on arbitrary bytes (in memory, read-only): it must terminate, and what
//! it returns must be sorted, non-overlapping, non-empty, within the virtual size, of the
//! kinds "data"/"zero"/"compressed", merged, and agree with `map()` (checked over the first
//! 16 MiB).
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use qcowrs::{MemStorage, QcowFile};
use qcowrs_fuzz::{image_path, open_options, safe_to_open};

/// Guest bytes over which `allocated_ranges()` is compared with `map()`.
const MAX_COMPARE: u64 = 16 << 20;
/// `map()` calls at most per input.
const MAX_MAP_CALLS: u32 = 50_000;

fuzz_target!(|data: &[u8]| {
    let mem = Arc::new(MemStorage::new(data.to_vec()));
    if !safe_to_open(&mem) {
        return;
    }
    let Ok(f) = QcowFile::open_storage(mem.clone(), image_path(), open_options(false, false)) else { return };
    let Ok(ranges) = f.allocated_ranges() else { return };
    let size = f.virtual_size();
    let mut prev_end = 0u64;
    let mut prev_kind = "";
    for (i, &(start, len, kind)) in ranges.iter().enumerate() {
        assert!(len > 0, "range {i} {:?} is empty", ranges[i]);
        assert!(start >= prev_end, "range {i} {:?} overlaps or is out of order (previous end {prev_end})", ranges[i]);
        let end = start.checked_add(len).unwrap_or_else(|| panic!("range {i} {:?} overflows", ranges[i]));
        assert!(end <= size, "range {i} {:?} ends past the virtual size {size}", ranges[i]);
        assert!(["data", "zero", "compressed"].contains(&kind), "range {i} has kind {kind:?}");
        assert!(
            !(start == prev_end && kind == prev_kind),
            "range {i} {:?} should be merged with the previous",
            ranges[i]
        );
        prev_end = end;
        prev_kind = kind;
    }
    compare_with_map(&f, &ranges);
    assert!(mem.to_vec() == data, "allocated_ranges changed the image");
});

/// The kind `allocated_ranges()` gives guest offset `off` (None: not allocated here).
fn kind_at(ranges: &[(u64, u64, &'static str)], off: u64) -> Option<&'static str> {
    let i = ranges.partition_point(|r| r.0 + r.1 <= off);
    ranges.get(i).filter(|r| r.0 <= off).map(|r| r.2)
}

fn compare_with_map(f: &QcowFile, ranges: &[(u64, u64, &'static str)]) {
    let limit = f.virtual_size().min(MAX_COMPARE);
    let mut off = 0u64;
    let mut calls = 0u32;
    while off < limit && calls < MAX_MAP_CALLS {
        calls += 1;
        let Ok((plan, run)) = f.map(off, limit - off) else { return };
        assert!(run > 0 && run <= limit - off, "map({off}) returned a run of {run} (limit {limit})");
        // Every byte of the run has the plan's kind in allocated_ranges (checked at both ends
        // and at range boundaries inside the run).
        let end = off + run;
        let mut probe = off;
        loop {
            assert_eq!(
                kind_at(ranges, probe),
                plan.kind(),
                "map({off}) = {plan:?} for {run} bytes, but allocated_ranges() says otherwise at {probe}"
            );
            let i = ranges.partition_point(|r| r.0 + r.1 <= probe);
            let next = match ranges.get(i) {
                Some(r) if r.0 > probe => r.0,
                Some(r) => r.0 + r.1,
                None => end,
            };
            if next >= end {
                break;
            }
            probe = next;
        }
        off = end;
    }
}
