//! `qemu-img commit`: an overlay's data written into its backing file (or a deeper base of
//! its chain), then the overlay emptied.
//!
//! What the overlay (and any image between it and the base) allocates is copied into the base
//! through the base's own write path (data as data, zero clusters as zeros); the base grows
//! first if it is smaller. Only then, once the base is flushed, is the overlay emptied (its
//! clusters unallocated, so it reads through to the base): a crash at any point leaves the
//! overlay's guest content unchanged (the copied ranges are ones the overlay still shadows,
//! and an emptied cluster reads the same data from the base). With a deeper base (`-b`) the
//! overlay is kept as it is (`-b` implies `-d`, as in qemu-img), and the images in between are
//! left stale, as QEMU leaves them.
//!
//! Speed: the chain is read by workers on every core while this thread writes into the base in
//! guest order (`ops/pipeline.rs`), and the base's data writes start their write-back at once
//! (write-behind: the device writes overlap the copy, little is left for the base's final
//! flush); the ordering of the base's flush is unchanged.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use crate::backing::{BackingChoice, BackingKind, BackingRead, FileId};
use crate::error::{Error, IoContext, Result};
use crate::ops::convert::layer_ids;
use crate::ops::map::map_image;
use crate::ops::pipeline;
use crate::qcow_file::{OpenOptions, QcowFile};
use crate::storage::{FileStorage, Storage};

/// Bytes copied at a time (at least one cluster of the base).
const CHUNK: u64 = 1 << 20;

/// Options of [`commit`].
#[derive(Clone, Debug, Default)]
pub struct CommitOptions {
    /// `-b`: the image of the chain to commit into (default: the overlay's backing file).
    pub base: Option<PathBuf>,
    /// `-d`: keep the overlay as it is (implied by `base`).
    pub drop: bool,
}

/// The image a commit writes into, already open for writing.
#[derive(Debug)]
pub enum CommitBase {
    /// A qcow2 image, opened writable.
    Qcow2(Box<QcowFile>),
    /// A raw file (locked by the caller if it is a file); `name` names it in messages.
    Raw {
        /// The file.
        storage: Arc<dyn Storage>,
        /// Its name, for messages.
        name: PathBuf,
    },
}

impl CommitBase {
    fn size(&self) -> Result<u64> {
        match self {
            CommitBase::Qcow2(f) => Ok(f.virtual_size()),
            CommitBase::Raw { storage, name } => {
                storage.len().ctx(|| format!("reading the length of '{}'", name.display()))
            }
        }
    }
    fn cluster_size(&self) -> u64 {
        match self {
            CommitBase::Qcow2(f) => f.cluster_size(),
            CommitBase::Raw { .. } => 512,
        }
    }
    fn grow(&mut self, size: u64) -> Result<()> {
        match self {
            CommitBase::Qcow2(f) => f.truncate(size),
            CommitBase::Raw { storage, name } => storage.set_len(size).ctx(|| format!("resizing '{}'", name.display())),
        }
    }
    fn write(&mut self, data: &[u8], off: u64) -> Result<()> {
        match self {
            CommitBase::Qcow2(f) => f.write_at(data, off),
            CommitBase::Raw { storage, name } => {
                storage.write_data_at(data, off).ctx(|| format!("writing '{}' at 0x{off:x}", name.display()))
            }
        }
    }
    fn zero(&mut self, off: u64, len: u64) -> Result<()> {
        match self {
            CommitBase::Qcow2(f) => f.write_zeroes(off, len),
            CommitBase::Raw { .. } => {
                let zeros = vec![0u8; usize::try_from(len.min(CHUNK)).unwrap_or(0)];
                let mut o = off;
                while o < off + len {
                    let n = (off + len - o).min(CHUNK);
                    self.write(&zeros[..usize::try_from(n).unwrap_or(0)], o)?;
                    o += n;
                }
                Ok(())
            }
        }
    }
    /// Everything written durable, the last op a sync: nothing of the base is in flight once
    /// the overlay changes (a qcow2 close ends with holes punched in freed clusters, synced
    /// here too).
    fn finish(self) -> Result<()> {
        match self {
            CommitBase::Qcow2(mut f) => {
                f.close()?;
                f.raw_file().sync()
            }
            CommitBase::Raw { storage, name } => storage.sync().ctx(|| format!("syncing '{}'", name.display())),
        }
    }
}

/// The path and format (qcow2: true, raw: false) of layer `depth` of the chain below `top`
/// (1: its backing file). A qcow version 1 base is refused: qcowrs reads that format only.
fn layer(top: &QcowFile, depth: usize) -> Result<(PathBuf, bool)> {
    let ended = || Error::InvalidArgument("backing chain ended".into());
    let mut cur: &dyn BackingRead = top.backing_file().ok_or_else(ended)?;
    for _ in 1..depth {
        cur = match cur.kind() {
            BackingKind::Qcow2(f) => f.backing_file(),
            BackingKind::Qcow1(f) => f.backing_file(),
            BackingKind::Raw { .. } => None,
        }
        .ok_or_else(ended)?;
    }
    match cur.kind() {
        BackingKind::Qcow2(f) => Ok((f.path().to_path_buf(), true)),
        BackingKind::Raw { path, .. } => Ok((path.to_path_buf(), false)),
        BackingKind::Qcow1(f) => Err(Error::UnsupportedFeature(format!(
            "the base '{}' is a qcow version 1 image, which qcowrs only reads; convert it to qcow2 first",
            f.path().display()
        ))),
    }
}

fn base_depth(path: &Path, top: &QcowFile, base: Option<&Path>) -> Result<usize> {
    let Some(b) = base else { return Ok(1) };
    use std::os::unix::fs::MetadataExt;
    let id: Option<FileId> = std::fs::metadata(b).ok().map(|m| (m.dev(), m.ino()));
    let layers = layer_ids(top);
    match layers.iter().position(|ids| id.is_some() && ids.first() == id.as_ref()) {
        Some(d) if d > 0 => Ok(d),
        _ => Err(Error::InvalidArgument(format!(
            "Did not find '{}' in the backing chain of '{}'",
            b.display(),
            path.display()
        ))),
    }
}

/// Commits the overlay at `path` (see the module documentation); `progress(done, total)`.
pub fn commit(path: &Path, opts: &CommitOptions, progress: &dyn Fn(u64, u64) -> Result<()>) -> Result<()> {
    // The chain is read without locks: this process takes the write locks itself below (the
    // base through its writable open, the overlay through a second, writable handle).
    let view = QcowFile::open(path, OpenOptions { force_share: true, ..OpenOptions::default() })?;
    if view.backing_file().is_none() {
        return Err(Error::InvalidArgument("Image does not have a backing file".into()));
    }
    let depth = base_depth(path, &view, opts.base.as_deref())?;
    let keep_top = opts.drop || opts.base.is_some();
    let mut top = if keep_top {
        None
    } else {
        let o = OpenOptions { writable: true, backing: BackingChoice::Disabled, ..OpenOptions::default() };
        Some(QcowFile::open(path, o)?)
    };
    let (base_path, qcow2) = layer(&view, depth)?;
    let base = if qcow2 {
        let f = QcowFile::open(&base_path, OpenOptions { writable: true, ..OpenOptions::default() })?;
        f.set_write_behind();
        CommitBase::Qcow2(Box::new(f))
    } else {
        let file = crate::backing::open_image_file(&base_path, true, "base image")?;
        crate::lock::lock_image(&file, true, &format!("'{}'", base_path.display()))?;
        let file = FileStorage::new(file);
        file.set_write_behind();
        CommitBase::Raw { storage: Arc::new(file), name: base_path }
    };
    commit_images(&view, depth, base, top.as_mut(), progress)?;
    if let Some(t) = top.as_mut() {
        t.close()?;
    }
    Ok(())
}

/// Commits open images (on any storage; [`commit`] without the opening): `view` is the top of
/// the chain opened with its backing chain, `base` layer `depth` of that chain (1: its backing
/// file) opened for writing, `top` the top image opened writable if it is to be emptied.
/// Everything the layers above the base allocate is copied into the base (grown first if
/// smaller), the base is closed and synced, and only then is `top` emptied (and flushed).
pub fn commit_images(
    view: &QcowFile,
    depth: usize,
    mut base: CommitBase,
    top: Option<&mut QcowFile>,
    progress: &dyn Fn(u64, u64) -> Result<()>,
) -> Result<()> {
    if base.size()? < view.virtual_size() {
        base.grow(view.virtual_size())?;
    }
    copy_above(view, depth, &mut base, progress)?;
    base.finish()?;
    if let Some(t) = top {
        t.make_empty()?;
    }
    Ok(())
}

/// A piece of the copy: data to read from the chain and write, or zeros.
#[derive(Clone, Copy, Debug)]
struct Item {
    start: u64,
    end: u64,
    data: bool,
}

/// Copies into `base` everything the layers above it allocate: the chain is read by workers
/// on every core (`read_at(&self)`), a chunk at a time, while this thread writes the chunks
/// into the base in guest order.
fn copy_above(
    view: &QcowFile,
    depth: usize,
    base: &mut CommitBase,
    progress: &dyn Fn(u64, u64) -> Result<()>,
) -> Result<()> {
    let map = map_image(view, 0, None)?;
    let chunk = CHUNK.max(base.cluster_size());
    let mut items: Vec<Item> = Vec::new();
    for e in map.entries.iter().filter(|e| (e.depth as usize) < depth && e.length > 0) {
        let end = e.start + e.length;
        if !e.data {
            items.push(Item { start: e.start, end, data: false });
            continue;
        }
        // Chunks end on multiples of `chunk`, so that they cover whole clusters of the base.
        let mut off = e.start;
        while off < end {
            let next = ((off / chunk + 1) * chunk).min(end);
            items.push(Item { start: off, end: next, data: true });
            off = next;
        }
    }
    let total: u64 = items.iter().map(|i| i.end - i.start).sum();
    let mut done = 0;
    progress(0, total)?;
    let pool: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());
    let read = |i: usize| -> Result<Option<Vec<u8>>> {
        let it = items[i];
        if !it.data {
            return Ok(None);
        }
        let mut buf = pool.lock().unwrap_or_else(PoisonError::into_inner).pop().unwrap_or_default();
        buf.resize(usize::try_from(it.end - it.start).unwrap_or(0), 0);
        let got = view.read_at(&mut buf, it.start)?;
        buf[got..].fill(0);
        Ok(Some(buf))
    };
    pipeline::run_in_order(items.len(), pipeline::workers(0), read, |i, buf| {
        let it = items[i];
        match buf {
            Some(b) => {
                base.write(&b, it.start)?;
                pool.lock().unwrap_or_else(PoisonError::into_inner).push(b);
            }
            None => base.zero(it.start, it.end - it.start)?,
        }
        done += it.end - it.start;
        progress(done, total)
    })
}
