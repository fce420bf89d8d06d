//! `check_raw` without repair on arbitrary bytes (in memory): it may report anything or fail,
//! but must not panic, hang or change a byte.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use qcowrs::{MemStorage, Repair};
use qcowrs_fuzz::{check_mem};

fuzz_target!(|data: &[u8]| {
    let mem = Arc::new(MemStorage::new(data.to_vec()));
    if let Ok(report) = check_mem(&mem, Repair::None) {
        // Without repair nothing is fixed, and the exit code follows the counters.
        assert_eq!(report.counts.corruptions_fixed, 0, "{report:?}");
        assert_eq!(report.counts.leaks_fixed, 0, "{report:?}");
        assert!(!report.rebuilt, "{report:?}");
        assert_eq!(report.is_clean(), report.exit_code() == 0, "{report:?}");
    }
    assert!(mem.to_vec() == data, "a check without repair changed the image");
});
