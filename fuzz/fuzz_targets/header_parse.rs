//! `QcowHeader::parse` on arbitrary bytes (cluster 0); where it parses: `validate`,
//! `validate_refcount_table`, the accessors, and the `to_bytes` round trip
//! (parse(to_bytes(h)) == h up to the recomputed backing name fields; to_bytes is idempotent).
#![no_main]

use libfuzzer_sys::fuzz_target;
use qcowrs::{MemStorage, QcowHeader};

/// The header with the fields `to_bytes` recomputes cleared.
fn normalized(h: &QcowHeader) -> QcowHeader {
    let mut h = h.clone();
    h.backing_file_offset = 0;
    h.backing_file_size = 0;
    if h.backing_file.as_deref() == Some("") {
        h.backing_file = None;
    }
    h
}

fuzz_target!(|data: &[u8]| {
    // The same bytes as a whole (tiny) image file: reads cluster 0, validates against its length.
    let _ = QcowHeader::read_from(&MemStorage::new(data.to_vec()));

    let Ok(h) = QcowHeader::parse(data) else { return };
    // Validate against the real length and against a few other file lengths. The refcount
    // table fields are validated only after the rest, as `read_from` does: on a header with an
    // unchecked cluster_bits, `validate_refcount_table` panics (a shift overflow; see
    // fuzz/RESULTS.md and tests/data/fuzz-header_parse-reftable-cluster-bits-shift-overflow.qcow2).
    for file_len in [data.len() as u64, 0, 1 << 20, 1 << 40, u64::MAX] {
        if h.validate(file_len).is_ok() {
            let _ = h.validate_refcount_table(file_len);
        }
    }
    let _ = (h.refcount_bits(), h.is_dirty(), h.is_corrupt(), h.lazy_refcounts(), h.extended_l2());
    let _ = (h.has_data_file(), h.data_file_raw(), h.backing_format(), h.data_file(), h.bitmaps());
    let _ = (h.crypto_header(), h.feature_names());
    let _ = (h.cluster_size(), h.l2_entry_size(), h.l2_entries(), h.l1_entries_needed());
    let Ok(bytes) = h.to_bytes() else { return };
    let h2 = match QcowHeader::parse(&bytes) {
        Ok(h2) => h2,
        Err(e) => panic!("to_bytes() of a parsed header does not parse again: {e}\n{h:?}"),
    };
    assert_eq!(normalized(&h), normalized(&h2), "to_bytes/parse round trip changed the header");
    let again = h2.to_bytes().expect("to_bytes of a re-parsed header");
    assert_eq!(bytes, again, "to_bytes is not idempotent");
});
