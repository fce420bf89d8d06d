//! `qemu-img info`: what an image's header, snapshot table and bitmap directory say, read as
//! leniently as QEMU reads them (no table is followed, so an image whose L1 table lies past the
//! end of the file is still described). The presentation (qemu-img's JSON keys and human
//! layout) is the Python side's job.

use std::path::Path;
use std::sync::Arc;

use crate::bitmap::{read_bitmap_directory, BitmapEntry};
use crate::error::Result;
use crate::format::AUTOCLEAR_BITMAPS;
use crate::header::QcowHeader;
use crate::qcow1::Qcow1Header;
use crate::raw_file::QcowRawFile;
use crate::snapshot::{read_snapshot_table_lenient, Snapshot};
use crate::storage::{FileStorage, Storage};

/// What `qemu-img info` reports about one qcow2 image (not its backing files).
#[derive(Clone, Debug)]
pub struct ImageInfo {
    /// The parsed header.
    pub header: QcowHeader,
    /// Length of the image file in bytes.
    pub file_length: u64,
    /// The internal snapshots (those that could be read).
    pub snapshots: Vec<Snapshot>,
    /// Why the snapshot table could not be read in full, if it could not.
    pub snapshot_error: Option<String>,
    /// The persistent bitmaps, when the bitmaps extension is consistent (as QEMU lists them).
    pub bitmaps: Vec<BitmapEntry>,
    /// Why the bitmaps are not listed although the image has a bitmaps extension: QEMU's
    /// warning (the autoclear bit was cleared), or the directory could not be read.
    pub bitmap_warning: Option<String>,
}

/// Describes the qcow2 image at `path`. Takes QEMU's shared read lock unless `force_share`.
pub fn image_info(path: &Path, force_share: bool) -> Result<ImageInfo> {
    let file = crate::backing::open_image_file(path, false, "image")?;
    if !force_share {
        crate::lock::lock_image(&file, false, &format!("'{}'", path.display()))?;
    }
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::new(file));
    let header = QcowHeader::read_for_check(&*storage)?;
    let raw = QcowRawFile::new(storage, header.cluster_size(), header.refcount_order, false)?;
    Ok(describe(&raw, header))
}

/// What `qemu-img info` reports about a qcow version 1 image: its header and backing file
/// name (no table is read, so a damaged image is still described; an encrypted one too).
/// Takes QEMU's shared read lock unless `force_share`.
pub fn qcow1_info(path: &Path, force_share: bool) -> Result<Qcow1Header> {
    let file = crate::backing::open_image_file(path, false, "image")?;
    if !force_share {
        crate::lock::lock_image(&file, false, &format!("'{}'", path.display()))?;
    }
    Qcow1Header::read_lenient(&FileStorage::new(file))
}

/// [`image_info`] on an image already open.
pub fn describe(raw: &QcowRawFile, header: QcowHeader) -> ImageInfo {
    let (table, damage) = read_snapshot_table_lenient(raw, &header, false);
    let (bitmaps, bitmap_warning) = match header.bitmaps() {
        None => (Vec::new(), None),
        Some(_) if header.autoclear_features & AUTOCLEAR_BITMAPS == 0 => (
            Vec::new(),
            Some(
                "a program lacking bitmap support modified this file, so all bitmaps are now considered inconsistent"
                    .to_string(),
            ),
        ),
        Some(_) => match read_bitmap_directory(raw, &header) {
            Ok(b) => (b, None),
            Err(e) => (Vec::new(), Some(format!("the bitmap directory cannot be read: {e}"))),
        },
    };
    ImageInfo {
        file_length: raw.file_len(),
        snapshots: table.snapshots,
        snapshot_error: damage.map(|d| d.reason),
        bitmaps,
        bitmap_warning,
        header,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::create::{create_on, CreateOptions};
    use crate::storage::MemStorage;

    #[test]
    fn a_new_image_has_no_snapshots_or_bitmaps() {
        let mem = Arc::new(MemStorage::default());
        let opts = CreateOptions { virtual_size: 1 << 30, ..CreateOptions::default() };
        drop(create_on(mem.clone(), &opts).unwrap());
        let h = QcowHeader::read_from(&*mem).unwrap();
        let raw = QcowRawFile::new(mem, h.cluster_size(), h.refcount_order, false).unwrap();
        let info = describe(&raw, h);
        assert_eq!(info.header.size, 1 << 30);
        assert!(info.snapshots.is_empty() && info.bitmaps.is_empty());
        assert!(info.snapshot_error.is_none() && info.bitmap_warning.is_none());
        // Header, reftable, refblock, then the L1 table (two entries for 1 GiB).
        assert_eq!(info.file_length, 0x30000 + 16);
    }
}
