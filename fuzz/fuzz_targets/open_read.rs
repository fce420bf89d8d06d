//! A read-only open of arbitrary bytes (in memory), then: the whole virtual disk read in
//! unaligned chunks (at most 64 MiB), `map()` over what was read (zero and unallocated runs
//! must read as zeros), `allocated_ranges()`. The bytes of the image must not change.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use qcowrs::{MemStorage, QcowFile, ReadPlan};
use qcowrs_fuzz::{image_path, open_options, safe_to_open};

/// Bytes of the virtual disk read at most.
const MAX_READ: u64 = 64 << 20;
/// An odd chunk size, so that reads start and end inside clusters.
const CHUNK: usize = (192 << 10) + 7;
/// `map()` calls at most per input.
const MAX_MAP_CALLS: u32 = 100_000;

fuzz_target!(|data: &[u8]| {
    let mem = Arc::new(MemStorage::new(data.to_vec()));
    if !safe_to_open(&mem) {
        return;
    }
    if let Ok(f) = QcowFile::open_storage(mem.clone(), image_path(), open_options(false, false)) {
        read_and_map(&f);
        let _ = f.allocated_ranges();
    }
    assert!(mem.to_vec() == data, "a read-only open changed the image");
});

fn read_and_map(f: &QcowFile) {
    let limit = f.virtual_size().min(MAX_READ);
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0u64;
    let mut map_calls = 0u32;
    while off < limit {
        let want = usize::try_from(limit - off).unwrap_or(CHUNK).min(CHUNK);
        let n = match f.read_at(&mut buf[..want], off) {
            Ok(n) => n,
            Err(_) => return,
        };
        assert_eq!(n, want, "read_at returned {n} of {want} bytes at {off} inside the virtual size");
        // Where map() says the data reads as zeros, read_at must have returned zeros.
        let mut pos = 0u64;
        while pos < n as u64 && map_calls < MAX_MAP_CALLS {
            map_calls += 1;
            let Ok((plan, run)) = f.map(off + pos, n as u64 - pos) else { break };
            assert!(run > 0, "map({}) returned an empty run", off + pos);
            assert!(
                run <= n as u64 - pos,
                "map({}) returned a run of {run} past the {} asked",
                off + pos,
                n as u64 - pos
            );
            if matches!(plan, ReadPlan::Zero | ReadPlan::Backing) {
                let s = &buf[pos as usize..(pos + run) as usize];
                assert!(
                    s.iter().all(|&b| b == 0),
                    "map() says {plan:?} at {} (+{run}) but read_at returned data",
                    off + pos
                );
            }
            pos += run;
        }
        off += n as u64;
    }
}
