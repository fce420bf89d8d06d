//! Backing files: what an image shows where it holds nothing itself. A [`BackingRead`] is
//! another qcow2 image (read through its own `QcowFile`, so chains nest), a qcow version 1
//! image (`Qcow1File`, with its own chain) or a raw file; an
//! image may also be opened without its backing file, or with another one
//! ([`BackingChoice`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, IoContext, Result};
use crate::format::QCOW_MAGIC;
use crate::qcow1::Qcow1File;
use crate::qcow_file::{OpenOptions, QcowFile};
use crate::raw_file::QcowRawFile;
use crate::storage::{FileStorage, Storage};

/// Longest backing chain followed. Loops are found by file identity long before; this bounds
/// the recursion of a chain of distinct files.
pub const MAX_BACKING_DEPTH: usize = 256;

/// A file's identity (device, inode), to find loops in backing chains.
pub(crate) type FileId = (u64, u64);

/// The identity of the file behind a storage, if it is a file.
pub(crate) fn file_id(storage: &dyn Storage) -> Option<FileId> {
    use std::os::unix::fs::MetadataExt;
    let m = storage.file()?.metadata().ok()?;
    Some((m.dev(), m.ino()))
}

/// Opens a file qcowrs will read as an image, a backing file or a data file: only regular
/// files and block devices (a FIFO would block forever, a directory or a character device is
/// no disk image).
pub(crate) fn open_image_file(path: &Path, writable: bool, what: &str) -> Result<std::fs::File> {
    use std::os::unix::fs::FileTypeExt;
    let meta = std::fs::metadata(path).ctx(|| format!("opening {what} '{}'", path.display()))?;
    let ft = meta.file_type();
    let kind = if ft.is_dir() {
        Some("a directory")
    } else if ft.is_fifo() {
        Some("a FIFO")
    } else if ft.is_socket() {
        Some("a socket")
    } else if ft.is_char_device() {
        Some("a character device")
    } else {
        None
    };
    if let Some(kind) = kind {
        return Err(Error::UnsupportedFeature(format!("{what} '{}' is {kind}, not a disk image file", path.display())));
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(writable)
        .open(path)
        .ctx(|| format!("opening {what} '{}'", path.display()))
}

/// Which backing file an open uses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum BackingChoice {
    /// The one the header names (the default).
    #[default]
    FromHeader,
    /// None: what a backing file would supply reads as zeros (QEMU's `backing: null`).
    Disabled,
    /// This file instead (format probed: qcow2 or raw).
    Path(PathBuf),
}

/// Guest data below an image.
pub(crate) trait BackingRead: Send + Sync + std::fmt::Debug {
    /// Guest-visible size; reads past it return zeros.
    fn size(&self) -> u64;
    /// Fills `buf` with the guest data at `offset` (zeros past the end).
    fn read_into(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// What the backing file is, for code that needs more than its guest data (`map`).
    fn kind(&self) -> BackingKind<'_>;
}

/// A backing file as what it is.
pub(crate) enum BackingKind<'a> {
    /// A qcow2 image (with its own backing chain).
    Qcow2(&'a QcowFile),
    /// A qcow version 1 image (read-only, with its own backing chain).
    Qcow1(&'a Qcow1File),
    /// A raw file: guest offset = file offset.
    Raw {
        /// The file.
        storage: &'a dyn Storage,
        /// Its length when opened.
        len: u64,
        /// Its path as resolved from the overlay.
        path: &'a Path,
    },
}

impl BackingRead for QcowFile {
    fn size(&self) -> u64 {
        self.virtual_size()
    }
    fn read_into(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let n = self.read_at(buf, offset)?;
        buf[n..].fill(0);
        Ok(())
    }
    fn kind(&self) -> BackingKind<'_> {
        BackingKind::Qcow2(self)
    }
}

/// A raw backing file.
#[derive(Debug)]
struct RawBacking {
    storage: Arc<dyn Storage>,
    len: u64,
    name: PathBuf,
}

impl BackingRead for RawBacking {
    fn size(&self) -> u64 {
        self.len
    }
    fn read_into(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut n = 0;
        if offset < self.len {
            let want = usize::try_from(self.len - offset).unwrap_or(usize::MAX).min(buf.len());
            n = self
                .storage
                .read_at(&mut buf[..want], offset)
                .ctx(|| format!("reading backing file '{}' at 0x{offset:x}", self.name.display()))?;
        }
        buf[n..].fill(0);
        Ok(())
    }
    fn kind(&self) -> BackingKind<'_> {
        BackingKind::Raw { storage: &*self.storage, len: self.len, path: &self.name }
    }
}

/// An image opened to serve as a backing file (a qcow2 image with its own chain, or a raw
/// file), for the entry points that take open images instead of paths
/// ([`QcowFile::open_storage_with_backing`], `ops::rebase::rebase_image`,
/// `ops::commit::commit_images`).
#[derive(Debug)]
pub struct BackingImage(pub(crate) Box<dyn BackingRead>);

impl BackingImage {
    /// A qcow2 image (read through its own chain).
    pub fn qcow2(image: QcowFile) -> Self {
        BackingImage(Box::new(image))
    }

    /// A qcow version 1 image (read through its own chain).
    pub fn qcow1(image: Qcow1File) -> Self {
        BackingImage(Box::new(image))
    }

    /// A raw file on `storage` (its length read now); `name` names it in messages.
    pub fn raw(storage: Arc<dyn Storage>, name: &Path) -> Result<Self> {
        let len = storage.len().ctx(|| format!("reading the length of backing file '{}'", name.display()))?;
        Ok(BackingImage(Box::new(RawBacking { storage, len, name: name.to_path_buf() })))
    }

    /// Guest-visible size.
    pub fn size(&self) -> u64 {
        self.0.size()
    }
}

/// `name` resolved against the folder of `image` (as QEMU resolves relative backing names).
pub(crate) fn resolve_relative(image: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        image.parent().map_or_else(|| p.to_path_buf(), |d| d.join(p))
    }
}

/// Refuses protocol and JSON names (`nbd://...`, `json:{...}`): only plain file names.
pub(crate) fn check_plain_file_name(name: &str, field: &str) -> Result<()> {
    if name.starts_with("json:") || name.contains("://") {
        return Err(Error::UnsupportedFeature(format!(
            "{field} '{name}' is a protocol or JSON name; only plain file names are supported"
        )));
    }
    Ok(())
}

/// Opens the backing file `name` of `image` (read-only, locked like QEMU's), probing its
/// format unless `format` says it.
pub(crate) fn open_backing(
    image: &Path,
    name: &str,
    format: Option<&str>,
    chain: &[FileId],
    force_share: bool,
) -> Result<Box<dyn BackingRead>> {
    check_plain_file_name(name, "backing file")?;
    let p = resolve_relative(image, name);
    open_backing_path(image, &p, format, chain, force_share)
}

/// Opens `p` as the backing file of `image`.
/// `chain` holds the identities of the images above it (the loop check).
pub(crate) fn open_backing_path(
    image: &Path,
    p: &Path,
    format: Option<&str>,
    chain: &[FileId],
    force_share: bool,
) -> Result<Box<dyn BackingRead>> {
    if chain.len() >= MAX_BACKING_DEPTH {
        return Err(Error::corrupt(
            format!("backing chain deeper than {MAX_BACKING_DEPTH} images at '{}'", p.display()),
            crate::header::field_offset::BACKING_FILE_OFFSET,
        ));
    }
    let what = format!("backing file (of '{}')", image.display());
    open_layer(p, format, chain, force_share, &what, || {
        Error::corrupt(
            format!("backing chain loop: '{}' is already in the chain of '{}'", p.display(), image.display()),
            crate::header::field_offset::BACKING_FILE_OFFSET,
        )
    })
}

/// Opens `p` read-only as guest data, qcow2 or qcow (with its chain) or raw (`format`, or probed),
/// locked as QEMU locks an image it reads (unless `force_share`): a source of `convert`.
pub(crate) fn open_image_any(p: &Path, format: Option<&str>, force_share: bool) -> Result<Box<dyn BackingRead>> {
    open_layer(p, format, &[], force_share, "image", || Error::InvalidArgument("no chain to loop in".into()))
}

/// Opens a qcow2 image's internal snapshot `snapshot` (id, else name) as a read-only layer
/// (`qemu-img convert -l`).
pub(crate) fn open_image_snapshot(
    p: &Path,
    format: Option<&str>,
    force_share: bool,
    snapshot: &str,
) -> Result<Box<dyn BackingRead>> {
    if format.is_some_and(|f| f != "qcow2") {
        return Err(Error::InvalidArgument(
            "Failed to load snapshot: only qcow2 images have internal snapshots".into(),
        ));
    }
    let file = open_image_file(p, false, "image")?;
    if !force_share {
        crate::lock::lock_image(&file, false, &format!("'{}'", p.display()))?;
    }
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::new(file));
    let opts = OpenOptions { force_share, snapshot: Some(snapshot.to_string()), ..OpenOptions::default() };
    Ok(Box::new(QcowFile::open_in_chain(storage, p, opts, &[])?))
}

fn open_layer(
    p: &Path,
    format: Option<&str>,
    chain: &[FileId],
    force_share: bool,
    what: &str,
    in_loop: impl Fn() -> Error,
) -> Result<Box<dyn BackingRead>> {
    let file = open_image_file(p, false, what)?;
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::new(file));
    if let Some(id) = file_id(&*storage) {
        if chain.contains(&id) {
            return Err(in_loop());
        }
    }
    if let (Some(f), false) = (storage.file(), force_share) {
        let name =
            if what == "image" { format!("'{}'", p.display()) } else { format!("backing file '{}'", p.display()) };
        crate::lock::lock_image(f, false, &name)?;
    }
    let layer = match format {
        Some("qcow2") => Layer::Qcow2,
        Some("qcow") => Layer::Qcow1,
        Some("raw") => Layer::Raw,
        Some(other) => {
            return Err(Error::UnsupportedFeature(format!(
                "backing file '{}' has format '{other}'; qcowrs reads qcow2, qcow and raw backing files",
                p.display()
            )))
        }
        None => probe(&*storage, p)?,
    };
    match layer {
        Layer::Qcow2 => {
            let opts = OpenOptions { force_share, ..OpenOptions::default() };
            Ok(Box::new(QcowFile::open_in_chain(storage, p, opts, chain)?))
        }
        Layer::Qcow1 => Ok(Box::new(Qcow1File::open_in_chain(storage, p, chain, force_share)?)),
        Layer::Raw => {
            let len = storage.len().ctx(|| format!("reading the length of backing file '{}'", p.display()))?;
            Ok(Box::new(RawBacking { storage, len, name: p.to_path_buf() }))
        }
    }
}

/// The formats of an image layer.
enum Layer {
    Qcow2,
    Qcow1,
    Raw,
}

/// QEMU's probe among the formats qcowrs reads: the magic with version 1 is qcow, with any
/// other version qcow2 (whose open refuses versions it does not know), else raw.
fn probe(storage: &dyn Storage, p: &Path) -> Result<Layer> {
    let mut head = [0u8; 8];
    let n = storage.read_at(&mut head, 0).ctx(|| format!("reading '{}'", p.display()))?;
    Ok(if n >= 4 && u32::from_be_bytes([head[0], head[1], head[2], head[3]]) == QCOW_MAGIC {
        if crate::qcow1::is_qcow1(&head[..n]) {
            Layer::Qcow1
        } else {
            Layer::Qcow2
        }
    } else {
        Layer::Raw
    })
}

/// The external data file of an image, opened for the image's mode and locked. It may not be
/// the image itself (`image_id`).
pub(crate) fn open_data_file(
    image: &Path,
    image_id: Option<FileId>,
    name: &str,
    writable: bool,
    force_share: bool,
    cluster_size: u64,
    refcount_order: u32,
) -> Result<QcowRawFile> {
    check_plain_file_name(name, "data file")?;
    let p = resolve_relative(image, name);
    let f = open_image_file(&p, writable, &format!("external data file (of '{}')", image.display()))?;
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::new(f));
    if image_id.is_some() && file_id(&*storage) == image_id {
        return Err(Error::corrupt(
            format!("the external data file '{}' is the image itself", p.display()),
            crate::header::field_offset::INCOMPATIBLE_FEATURES,
        ));
    }
    if let (Some(f), false) = (storage.file(), force_share) {
        crate::lock::lock_image(f, writable, &format!("external data file '{}'", p.display()))?;
    }
    QcowRawFile::new(storage, cluster_size, refcount_order, writable)
}
