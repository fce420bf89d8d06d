//! Helpers shared by the fuzz targets: every image lives in memory ([`MemStorage`]); no target
//! opens a real file (backing files are disabled, images naming an external data file are not
//! opened as guest disks).

use std::path::Path;
use std::sync::Arc;

use qcowrs::{check_raw, BackingChoice, CheckReport, MemStorage, OpenOptions, QcowHeader, QcowRawFile, Repair};

/// The name fuzzed images are opened under: a directory that does not exist, so that any
/// relative file name an image carries resolves to nothing.
pub const IMAGE_PATH: &str = "/nonexistent-qcowrs-fuzz/fuzzed.qcow2";

/// `Path` of [`IMAGE_PATH`].
pub fn image_path() -> &'static Path {
    Path::new(IMAGE_PATH)
}

/// Open options for a fuzzed image: never a backing file.
pub fn open_options(writable: bool, rebuild: bool) -> OpenOptions {
    OpenOptions { writable, rebuild, backing: BackingChoice::Disabled, ..OpenOptions::default() }
}

/// Whether `QcowFile::open_storage` may be called on the image: false if its header names an
/// external data file (which the open would look for on the real file system). If the header
/// does not even parse leniently, the open fails on it before any data file is looked at.
pub fn safe_to_open(mem: &MemStorage) -> bool {
    match QcowHeader::read_from_lenient(mem) {
        Ok(h) => !h.has_data_file() && h.data_file().is_none(),
        Err(_) => true,
    }
}

/// `check_raw` on an in-memory image, as `tests/malformed.rs` does it.
pub fn check_mem(mem: &Arc<MemStorage>, repair: Repair) -> qcowrs::Result<CheckReport> {
    let mut h = QcowHeader::read_from_lenient(&**mem)?;
    let raw = QcowRawFile::new(mem.clone(), h.cluster_size(), h.refcount_order, repair != Repair::None)?;
    check_raw(&raw, &mut h, repair, false)
}
