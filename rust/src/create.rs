//! Creating images: [`CreateOptions`] (with `qemu-img create`'s defaults) and the layout of an
//! empty image as `qemu-img create` makes it: header and feature table in cluster 0, the
//! reftable, the refblocks, then the L1 table (the file ends at the L1 table's last entry).

use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, IoContext, Result};
use crate::format::{
    RefcountGeometry, COMPAT_LAZY_REFCOUNTS, EXT_BACKING_FORMAT, EXT_FEATURE_TABLE, INCOMPAT_EXTENDED_L2, MAX_L1_BYTES,
    MIN_EXTENDED_L2_CLUSTER_BITS, QCOW_MAGIC,
};
use crate::header::{HeaderExtension, QcowHeader};
use crate::qcow_file::{OpenOptions, QcowFile};
use crate::raw_file::QcowRawFile;
use crate::storage::{FileStorage, Storage};

/// Options of [`QcowFile::create`], with `qemu-img create`'s defaults.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// Guest-visible size in bytes.
    pub virtual_size: u64,
    /// Bytes per cluster (512 to 2 MiB, a power of two).
    pub cluster_size: u64,
    /// Refcount width in bits (1, 2, 4, ..., 64).
    pub refcount_bits: u32,
    /// Backing file name (stored as given; relative names are resolved against the image).
    pub backing_file: Option<String>,
    /// Backing file format ("qcow2" or "raw").
    pub backing_format: Option<String>,
    /// Compatible feature: lazy refcounts.
    pub lazy_refcounts: bool,
    /// Incompatible feature: extended L2 entries (subclusters).
    pub extended_l2: bool,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            virtual_size: 0,
            cluster_size: 65536,
            refcount_bits: 16,
            backing_file: None,
            backing_format: None,
            lazy_refcounts: false,
            extended_l2: false,
        }
    }
}

/// The feature name table QEMU writes into new images.
fn feature_table() -> Vec<u8> {
    let names: [(u8, u8, &str); 8] = [
        (0, 0, "dirty bit"),
        (0, 1, "corrupt bit"),
        (0, 2, "external data file"),
        (0, 3, "compression type"),
        (0, 4, "extended L2 entries"),
        (1, 0, "lazy refcounts"),
        (2, 0, "bitmaps"),
        (2, 1, "raw external data"),
    ];
    let mut v = Vec::new();
    for (kind, bit, name) in names {
        let mut e = [0u8; 48];
        e[0] = kind;
        e[1] = bit;
        e[2..2 + name.len()].copy_from_slice(name.as_bytes());
        v.extend_from_slice(&e);
    }
    v
}

/// The header of a new, empty image (without its table offsets).
fn new_header(opts: &CreateOptions) -> Result<QcowHeader> {
    let cs = opts.cluster_size;
    if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
        return Err(Error::InvalidClusterSize(format!("cluster_size {cs} must be a power of two from 512 to 2 MiB")));
    }
    let cluster_bits = cs.trailing_zeros();
    if !opts.refcount_bits.is_power_of_two() || opts.refcount_bits > 64 {
        return Err(Error::UnsupportedFeature(format!(
            "refcount_bits {} must be a power of two up to 64",
            opts.refcount_bits
        )));
    }
    if opts.extended_l2 && cluster_bits < MIN_EXTENDED_L2_CLUSTER_BITS {
        return Err(Error::InvalidClusterSize(format!(
            "extended_l2 needs a cluster size of at least 16 KiB, not {cs}"
        )));
    }
    let mut extensions = Vec::new();
    if let Some(f) = &opts.backing_format {
        if opts.backing_file.is_none() {
            return Err(Error::UnsupportedFeature("backing_format given without backing_file".into()));
        }
        extensions.push(HeaderExtension { kind: EXT_BACKING_FORMAT, data: f.as_bytes().to_vec() });
    }
    extensions.push(HeaderExtension { kind: EXT_FEATURE_TABLE, data: feature_table() });
    let mut h = QcowHeader {
        magic: QCOW_MAGIC,
        version: 3,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits,
        size: opts.virtual_size,
        crypt_method: 0,
        l1_size: 0,
        l1_table_offset: 0,
        refcount_table_offset: cs,
        refcount_table_clusters: 1,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: if opts.extended_l2 { INCOMPAT_EXTENDED_L2 } else { 0 },
        compatible_features: if opts.lazy_refcounts { COMPAT_LAZY_REFCOUNTS } else { 0 },
        autoclear_features: 0,
        refcount_order: opts.refcount_bits.trailing_zeros(),
        header_length: 112,
        compression_type: 0,
        extra_header_bytes: vec![0u8; 7],
        extensions,
        backing_file: opts.backing_file.clone(),
    };
    h.l1_size =
        u32::try_from(h.l1_entries_needed()).ok().filter(|&n| u64::from(n) * 8 <= MAX_L1_BYTES).ok_or_else(|| {
            Error::UnsupportedFeature(format!("virtual size {} needs an L1 table above 32 MiB", opts.virtual_size))
        })?;
    Ok(h)
}

/// Writes an empty image laid out as `qemu-img create` does onto `storage` (which must be
/// empty).
fn write_layout(storage: Arc<dyn Storage>, opts: &CreateOptions) -> Result<()> {
    let mut h = new_header(opts)?;
    let cs = opts.cluster_size;
    let l1_entries = u64::from(h.l1_size);
    let l1_clusters = (l1_entries * 8).div_ceil(cs);
    let geo = RefcountGeometry { cluster_bits: h.cluster_bits, refcount_order: h.refcount_order };
    // Header, reftable, refblocks, L1; refblocks and reftable sized to a fixed point.
    let (mut rt, mut rb) = (1u64, 1u64);
    loop {
        let used = 1 + rt + rb + l1_clusters;
        let rb2 = used.div_ceil(geo.refblock_entries());
        let rt2 = (rb2 * 8).div_ceil(cs);
        if (rb2, rt2) == (rb, rt) {
            break;
        }
        (rb, rt) = (rb2, rt2);
    }
    h.refcount_table_clusters = u32::try_from(rt).map_err(|_| Error::InvalidRefcountTableSize("too large".into()))?;
    h.l1_table_offset = (1 + rt + rb) * cs;
    let used = 1 + rt + rb + l1_clusters;
    let header_bytes = h.to_bytes()?;
    let raw = QcowRawFile::new(storage, cs, h.refcount_order, true)?;
    let reftable: Vec<u64> = (0..rb).map(|i| (1 + rt + i) * cs).collect();
    raw.write_u64_table(cs, &reftable, "refcount table")?;
    for i in 0..rb {
        let first = i * geo.refblock_entries();
        let counts: Vec<u64> = (first..(first + geo.refblock_entries()).min(used)).map(|_| 1).collect();
        raw.write_refcount_block((1 + rt + i) * cs, &counts)?;
    }
    // The L1 table: zeros up to its last entry (like QEMU, the file may end mid-cluster).
    raw.write_at(&vec![0u8; usize::try_from(l1_entries * 8).unwrap_or(0).max(8)], h.l1_table_offset, "L1 table")?;
    raw.write_at(&header_bytes, 0, "header")?;
    raw.sync()
}

/// Creates a new, empty v3 image at `path` (which must not exist) and opens it read-write.
pub(crate) fn create(path: &Path, opts: &CreateOptions) -> Result<QcowFile> {
    // Validate before anything touches the file system.
    new_header(opts)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .ctx(|| format!("creating '{}'", path.display()))?;
    crate::lock::lock_image(&file, true, &format!("'{}'", path.display()))?;
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::new(file));
    write_layout(Arc::clone(&storage), opts)?;
    QcowFile::open_storage(storage, path, OpenOptions { writable: true, ..OpenOptions::default() })
}

/// Creates a new, empty v3 image on `storage` (an empty in-memory buffer, say) and opens it
/// read-write. A backing file named in `opts` is resolved against the working directory.
pub fn create_on(storage: Arc<dyn Storage>, opts: &CreateOptions) -> Result<QcowFile> {
    write_layout(Arc::clone(&storage), opts)?;
    QcowFile::open_storage(storage, Path::new("<memory>"), OpenOptions { writable: true, ..OpenOptions::default() })
}
