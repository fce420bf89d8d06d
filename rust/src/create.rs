//! Creating images as `qemu-img create -f qcow2` does: [`CreateOptions`] (its `-o` options,
//! defaults and value checks), the layout of the new image (`layout.rs`: QEMU's allocator
//! replayed, so that header, tables, file length and allocated ranges come out identical) and
//! the file handling (`files.rs`: a temporary file renamed over the target once complete).
//!
//! Differences from `qemu-img create`, on purpose: an existing file is replaced only once the
//! new image is complete and synced (QEMU truncates it first, and deletes it when a later
//! option check fails); relative data file names are created next to the image (QEMU creates
//! them relative to its working directory but opens them relative to the image).

mod files;
mod layout;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

pub(crate) use layout::refcount_metadata_clusters;
pub use layout::Preallocation;

use crate::backing::{check_plain_file_name, resolve_relative, BackingChoice};
use crate::error::{Error, IoContext, Result};
use crate::format::{
    AUTOCLEAR_DATA_FILE_RAW, COMPAT_LAZY_REFCOUNTS, COMPRESSION_ZSTD, EXT_BACKING_FORMAT, EXT_DATA_FILE,
    EXT_FEATURE_TABLE, INCOMPAT_COMPRESSION, INCOMPAT_DATA_FILE, INCOMPAT_EXTENDED_L2, MAX_BACKING_FILE_NAME,
    MIN_EXTENDED_L2_CLUSTER_BITS, QCOW_MAGIC, V2_HEADER_LEN,
};
use crate::header::{HeaderExtension, QcowHeader};
use crate::qcow_file::{OpenOptions, QcowFile};
use crate::storage::{FileStorage, Storage};
use layout::{Layout, Params};

/// `compat`: the image version.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Compat {
    /// `0.10`: a version 2 image (72-byte header; no lazy refcounts, extended L2, zstd, data
    /// file or refcount width other than 16).
    V2,
    /// `1.1` (the default): a version 3 image.
    #[default]
    V3,
}

/// `compression_type`: how compressed clusters are compressed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CompressionType {
    /// deflate (the default).
    #[default]
    Zlib,
    /// zstd (incompatible feature bit 3; version 3 only).
    Zstd,
}

fn bad_value(option: &str, value: &str, expected: &str) -> Error {
    Error::InvalidArgument(format!("Parameter '{option}' does not accept value '{value}' (expected {expected})"))
}

impl FromStr for Compat {
    type Err = Error;
    /// `"0.10"`/`"v2"` or `"1.1"`/`"v3"`, as `qemu-img create -o compat=`.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "0.10" | "v2" => Ok(Compat::V2),
            "1.1" | "v3" => Ok(Compat::V3),
            _ => Err(bad_value("compat", s, "'0.10' (or 'v2') or '1.1' (or 'v3')")),
        }
    }
}

impl fmt::Display for Compat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if *self == Compat::V2 { "0.10" } else { "1.1" })
    }
}

impl FromStr for Preallocation {
    type Err = Error;
    /// `"off"`, `"metadata"`, `"falloc"` or `"full"`.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "off" => Ok(Preallocation::Off),
            "metadata" => Ok(Preallocation::Metadata),
            "falloc" => Ok(Preallocation::Falloc),
            "full" => Ok(Preallocation::Full),
            _ => Err(bad_value("preallocation", s, "'off', 'metadata', 'falloc' or 'full'")),
        }
    }
}

impl FromStr for CompressionType {
    type Err = Error;
    /// `"zlib"` or `"zstd"`.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "zlib" => Ok(CompressionType::Zlib),
            "zstd" => Ok(CompressionType::Zstd),
            _ => Err(bad_value("compression_type", s, "'zlib' or 'zstd'")),
        }
    }
}

/// Options of [`QcowFile::create`], with `qemu-img create -f qcow2`'s defaults.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// Guest-visible size in bytes, rounded up to a multiple of 512 as `qemu-img` does. 0 with
    /// a backing file (and not `unsafe_backing`) takes the backing file's size.
    pub virtual_size: u64,
    /// Bytes per cluster (512 to 2 MiB, a power of two).
    pub cluster_size: u64,
    /// Refcount width in bits (1, 2, 4, ..., 64; 16 for compat 0.10).
    pub refcount_bits: u32,
    /// Backing file name, stored as given; a relative name is relative to the image's folder.
    pub backing_file: Option<String>,
    /// Backing file format ("qcow2" or "raw"). `qemu-img` 10 requires it with a backing file;
    /// the core allows `None` (the format is then probed to check the file) and stores none.
    pub backing_format: Option<String>,
    /// Compatible feature: lazy refcounts (compat 1.1 only).
    pub lazy_refcounts: bool,
    /// Incompatible feature: extended L2 entries (subclusters; 16 KiB clusters or more).
    pub extended_l2: bool,
    /// Image version.
    pub compat: Compat,
    /// Preallocation mode. With a backing file, only with `extended_l2`.
    pub preallocation: Preallocation,
    /// Compression type recorded in the header.
    pub compression_type: CompressionType,
    /// External data file, created (or replaced) with the image; the name is stored as given,
    /// relative to the image's folder.
    pub data_file: Option<String>,
    /// Autoclear feature "raw external data" (needs `data_file`; implies at least metadata
    /// preallocation).
    pub data_file_raw: bool,
    /// Do not open the backing file (`qemu-img create -u`); needs an explicit size.
    pub unsafe_backing: bool,
    /// Replace an existing file (`qemu-img create` does); `false` refuses with `EEXIST`.
    pub overwrite: bool,
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
            compat: Compat::V3,
            preallocation: Preallocation::Off,
            compression_type: CompressionType::Zlib,
            data_file: None,
            data_file_raw: false,
            unsafe_backing: false,
            overwrite: true,
        }
    }
}

/// The feature name table QEMU writes into new v3 images with clusters above 4 KiB.
pub(crate) fn feature_table() -> Vec<u8> {
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

/// The options after `qemu-img`'s checks.
#[derive(Clone, Copy, Debug)]
struct Checked {
    version: u32,
    cluster_bits: u32,
    refcount_order: u32,
    preallocation: Preallocation,
}

fn needs_v3(what: &str) -> Error {
    Error::InvalidArgument(format!("{what} only supported with compatibility level 1.1 and above (use compat='1.1')"))
}

/// `qcow2_co_create`'s checks, in its order, with its texts (option names as here).
fn check_options(o: &CreateOptions) -> Result<Checked> {
    let v2 = o.compat == Compat::V2;
    if o.extended_l2 && v2 {
        return Err(needs_v3("extended_l2: Extended L2 entries are"));
    }
    let cs = o.cluster_size;
    if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
        return Err(Error::InvalidClusterSize(format!(
            "Invalid parameter 'cluster_size' {cs}: Cluster size must be a power of two between 512 and 2048k"
        )));
    }
    let cluster_bits = cs.trailing_zeros();
    if o.extended_l2 && cluster_bits < MIN_EXTENDED_L2_CLUSTER_BITS {
        return Err(Error::InvalidClusterSize(format!(
            "Invalid parameter 'cluster_size' {cs}: Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"
        )));
    }
    if o.backing_file.is_some() && o.preallocation != Preallocation::Off && !o.extended_l2 {
        return Err(Error::InvalidArgument(
            "Backing file and preallocation can only be used at the same time if extended_l2 is on".into(),
        ));
    }
    if o.backing_format.is_some() && o.backing_file.is_none() {
        return Err(Error::InvalidArgument("Backing format cannot be used without backing file".into()));
    }
    if v2 && o.lazy_refcounts {
        return Err(needs_v3("lazy_refcounts: Lazy refcounts"));
    }
    if !o.refcount_bits.is_power_of_two() || o.refcount_bits > 64 {
        return Err(Error::UnsupportedFeature(format!(
            "Invalid parameter 'refcount_bits' {}: Refcount width must be a power of two and may not exceed 64 bits",
            o.refcount_bits
        )));
    }
    if v2 && o.refcount_bits != 16 {
        return Err(needs_v3("refcount_bits: Different refcount widths than 16 bits are"));
    }
    check_data_file_options(o, v2)?;
    if v2 && o.compression_type != CompressionType::Zlib {
        return Err(needs_v3("compression_type: Non-zlib compression type is"));
    }
    let preallocation = if o.data_file_raw && o.preallocation == Preallocation::Off {
        Preallocation::Metadata
    } else {
        o.preallocation
    };
    Ok(Checked {
        version: if v2 { 2 } else { 3 },
        cluster_bits,
        refcount_order: o.refcount_bits.trailing_zeros(),
        preallocation,
    })
}

fn check_data_file_options(o: &CreateOptions, v2: bool) -> Result<()> {
    if o.data_file_raw && o.data_file.is_none() {
        return Err(Error::InvalidArgument("data_file_raw: data-file-raw requires data-file (data_file)".into()));
    }
    if o.data_file_raw && o.backing_file.is_some() {
        return Err(Error::InvalidArgument("Backing file and data-file-raw cannot be used at the same time".into()));
    }
    if let Some(d) = &o.data_file {
        if v2 {
            return Err(needs_v3("data_file: External data files are"));
        }
        if d.is_empty() {
            return Err(Error::InvalidArgument(
                "Parameter 'data_file': expected a file name, got an empty string".into(),
            ));
        }
        check_plain_file_name(d, "data_file")?;
    }
    Ok(())
}

/// Checks the backing file options and returns the backing file's path (relative names are
/// relative to the image's folder).
fn check_backing(image: &Path, o: &CreateOptions) -> Result<Option<PathBuf>> {
    let Some(name) = &o.backing_file else { return Ok(None) };
    if name.is_empty() {
        return Err(Error::InvalidArgument("Expected backing file name, got empty string".into()));
    }
    if name.len() > MAX_BACKING_FILE_NAME as usize {
        return Err(Error::InvalidArgument(format!(
            "Parameter 'backing_file': the name is {} bytes, above QEMU's limit of {MAX_BACKING_FILE_NAME}",
            name.len()
        )));
    }
    check_plain_file_name(name, "backing_file")?;
    if let Some(f) = &o.backing_format {
        if f != "qcow2" && f != "raw" {
            return Err(bad_value("backing_format", f, "'qcow2' or 'raw': qcowrs reads qcow2 and raw backing files"));
        }
    }
    let path = resolve_relative(image, name);
    let same_inode = |a: std::fs::Metadata, b: std::fs::Metadata| {
        use std::os::unix::fs::MetadataExt;
        a.dev() == b.dev() && a.ino() == b.ino()
    };
    let same = match (std::fs::metadata(image), std::fs::metadata(&path)) {
        (Ok(a), Ok(b)) => same_inode(a, b),
        _ => false,
    };
    if path == image || same {
        return Err(Error::InvalidArgument(
            "Error: Trying to create an image with the same filename as the backing file".into(),
        ));
    }
    Ok(Some(path))
}

/// The backing file's virtual size, read as `qemu-img create` opens it: read-only, sharing
/// everything (a running VM may hold it), with the given format (probed if none).
fn backing_size(path: &Path, format: Option<&str>) -> Result<u64> {
    let context = |e: Error| e.prefixed(&format!("Could not open backing image '{}': ", path.display()));
    let file = crate::backing::open_image_file(path, false, "backing file").map_err(context)?;
    let storage = FileStorage::new(file);
    let len = storage.len().ctx(|| format!("reading the length of '{}'", path.display()))?;
    let mut magic = [0u8; 4];
    let n = storage.read_at(&mut magic, 0).ctx(|| format!("reading backing file '{}'", path.display()))?;
    let is_qcow2 = n == 4 && u32::from_be_bytes(magic) == QCOW_MAGIC;
    match format {
        Some("raw") => Ok(len),
        Some(_) | None if is_qcow2 => Ok(QcowHeader::read_from(&storage).map_err(context)?.size),
        None => Ok(len),
        Some(_) => Err(context(Error::InvalidMagic(
            "Image is not in qcow2 format: field 'magic' at 0x0 is not \"QFI\\xfb\" (backing_format='qcow2')".into(),
        ))),
    }
}

/// Everything decided before the file system is touched.
#[derive(Debug)]
struct Plan {
    layout: Layout,
    /// Header cluster contents (header, extensions, backing file name).
    header: Vec<u8>,
    /// Where the data file goes.
    data_path: Option<PathBuf>,
}

impl Plan {
    /// Checks `o` (for an image at `image`), reads the backing file's size if needed and lays
    /// the image out.
    fn new(image: &Path, o: &CreateOptions) -> Result<Self> {
        let c = check_options(o)?;
        let backing_path = check_backing(image, o)?;
        let mut size = o.virtual_size;
        if let Some(b) = &backing_path {
            if o.unsafe_backing {
                if size == 0 {
                    return Err(Error::InvalidArgument(
                        "Image creation needs a size parameter: unsafe_backing does not open the backing file".into(),
                    ));
                }
            } else {
                let backing = backing_size(b, o.backing_format.as_deref())?;
                if size == 0 {
                    size = backing;
                }
            }
        }
        let size = size.checked_next_multiple_of(512).filter(|&s| s <= i64::MAX as u64).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "Invalid image size specified ({size}). Must be between 0 and {}.",
                i64::MAX
            ))
        })?;
        let params = Params {
            cluster_bits: c.cluster_bits,
            refcount_order: c.refcount_order,
            extended_l2: o.extended_l2,
            data_file: o.data_file.is_some(),
            size,
            preallocation: c.preallocation,
        };
        let layout = Layout::build(&params)?;
        let header = header_bytes(o, &c, &layout, size)?;
        let data_path = o.data_file.as_deref().map(|d| resolve_relative(image, d));
        Ok(Plan { layout, header, data_path })
    }
}

/// The header cluster as QEMU's `qcow2_update_header` writes it for the final state.
fn header_bytes(o: &CreateOptions, c: &Checked, layout: &Layout, size: u64) -> Result<Vec<u8>> {
    let v3 = c.version == 3;
    let mut extensions = Vec::new();
    if let Some(f) = &o.backing_format {
        extensions.push(HeaderExtension { kind: EXT_BACKING_FORMAT, data: f.as_bytes().to_vec() });
    }
    if let Some(d) = &o.data_file {
        extensions.push(HeaderExtension { kind: EXT_DATA_FILE, data: d.as_bytes().to_vec() });
    }
    if v3 && o.cluster_size > 4096 {
        extensions.push(HeaderExtension { kind: EXT_FEATURE_TABLE, data: feature_table() });
    }
    let zstd = o.compression_type == CompressionType::Zstd;
    let incompatible = if o.data_file.is_some() { INCOMPAT_DATA_FILE } else { 0 }
        | if zstd { INCOMPAT_COMPRESSION } else { 0 }
        | if o.extended_l2 { INCOMPAT_EXTENDED_L2 } else { 0 };
    let h = QcowHeader {
        magic: QCOW_MAGIC,
        version: c.version,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits: c.cluster_bits,
        size,
        crypt_method: 0,
        l1_size: u32::try_from(layout.l1.len()).map_err(|_| Error::InvalidArgument("L1 table too large".into()))?,
        l1_table_offset: layout.l1_offset,
        refcount_table_offset: layout.reftable_offset,
        refcount_table_clusters: u32::try_from(layout.reftable_clusters())
            .map_err(|_| Error::InvalidArgument("refcount table too large".into()))?,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: if v3 { incompatible } else { 0 },
        compatible_features: if o.lazy_refcounts { COMPAT_LAZY_REFCOUNTS } else { 0 },
        autoclear_features: if o.data_file_raw { AUTOCLEAR_DATA_FILE_RAW } else { 0 },
        refcount_order: c.refcount_order,
        header_length: if v3 { 112 } else { V2_HEADER_LEN },
        compression_type: if zstd { COMPRESSION_ZSTD } else { 0 },
        extra_header_bytes: if v3 { vec![0u8; 7] } else { Vec::new() },
        extensions,
        backing_file: o.backing_file.clone(),
    };
    h.to_bytes().map_err(|_| {
        Error::InvalidArgument(format!(
            "the header, its extensions and the backing file name do not fit in cluster 0 ({} bytes; qemu-img: No space left on device)",
            o.cluster_size
        ))
    })
}

/// A [`Storage`] as a place to write a layout.
struct StorageSink<'a>(&'a dyn Storage);

impl layout::Sink for StorageSink<'_> {
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.0.write_at(buf, offset)
    }
    fn grow(&self, e: layout::Extend) -> std::io::Result<()> {
        match e.mode {
            layout::Grow::WriteZeros => layout::write_zeros(self, e.from, e.to - e.from),
            layout::Grow::Truncate | layout::Grow::Fallocate => {
                if self.0.len()? < e.to {
                    self.0.set_len(e.to)?;
                }
                Ok(())
            }
        }
    }
    fn sync(&self) -> std::io::Result<()> {
        self.0.sync()
    }
}

/// Creates an image at `path` as `qemu-img create -f qcow2` does (replacing an existing file
/// unless `opts.overwrite` is false) and opens it read-write. The new image is written to a
/// temporary file in the same folder and renamed over `path` once complete and synced; on any
/// error nothing is left behind and an existing file is untouched. An existing image (or data
/// file) that another process holds (QEMU, qemu-io, qcowrs) is refused with
/// [`Error::ImageLocked`].
pub(crate) fn create(path: &Path, opts: &CreateOptions) -> Result<QcowFile> {
    let plan = Plan::new(path, opts)?;
    let file = files::install(path, opts, &plan)?;
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::new(file));
    let open = |backing| OpenOptions { writable: true, rebuild: false, backing, ..OpenOptions::default() };
    match QcowFile::open_storage(Arc::clone(&storage), path, open(BackingChoice::FromHeader)) {
        // `unsafe_backing`: the backing file need not exist (yet); the handle then reads
        // without it.
        Err(_) if opts.unsafe_backing && opts.backing_file.is_some() => {
            QcowFile::open_storage(storage, path, open(BackingChoice::Disabled))
        }
        r => r,
    }
}

/// Creates an image on `storage` (an empty in-memory buffer, say) laid out as `qemu-img
/// create` does, and opens it read-write. A backing file named in `opts` is resolved against
/// the working directory; a data file needs [`QcowFile::create`].
pub fn create_on(storage: Arc<dyn Storage>, opts: &CreateOptions) -> Result<QcowFile> {
    if opts.data_file.is_some() {
        return Err(Error::InvalidArgument("data_file: an external data file needs QcowFile::create (a path)".into()));
    }
    let name = Path::new("<memory>");
    let plan = Plan::new(name, opts)?;
    plan.layout.write(&StorageSink(&*storage), &plan.header, None).ctx(|| "writing the new image".to_string())?;
    storage.sync().ctx(|| "syncing the new image".to_string())?;
    let backing = if opts.unsafe_backing { BackingChoice::Disabled } else { BackingChoice::FromHeader };
    QcowFile::open_storage(
        storage,
        name,
        OpenOptions { writable: true, rebuild: false, backing, ..OpenOptions::default() },
    )
}

#[cfg(test)]
mod tests;
