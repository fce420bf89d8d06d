//! `QcowFile`: a qcow2 image as a guest disk (`Read` + `Write` + `Seek`). It opens and locks
//! the image, holds the backing chain and the external data file, and executes the plans of
//! `mapping.rs`: reads here (`&self`, so one handle serves several threads at once), writes in
//! `qcow_file/write.rs` (`&mut self`, with the flush ordering).

mod bitmaps;
mod write;

use std::collections::VecDeque;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use crate::backing::{open_backing, open_backing_path, open_data_file, BackingChoice, BackingRead};
use crate::check::{self, Repair};
use crate::compression;
use crate::create::CreateOptions;
use crate::error::{Error, Result};
use crate::format::{ClusterType, SubclusterState};
use crate::header::QcowHeader;
use crate::mapping::{CachedTables, L2Tables, ReadPlan};
use crate::raw_file::QcowRawFile;
use crate::report::CheckReport;
use crate::storage::{FileStorage, Storage};
use crate::walk::{Event, Flow, Tree, Visitor, Walker};

pub(crate) use write::Writer;

/// Decompressed clusters kept per open image (for small reads inside one cluster).
const DECOMPRESSED_CACHE: usize = 4;

/// How to open an image.
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    /// Open read-write.
    pub writable: bool,
    /// Rebuild stale refcounts on open (needs `writable`).
    pub rebuild: bool,
    /// Which backing file to use.
    pub backing: BackingChoice,
    /// Read-only opens only: take no lock, so an image a running VM holds can be inspected
    /// (`qemu-img -U`); reads may then see a moving target. Applies to the whole chain.
    pub force_share: bool,
    /// A read-only view of an internal snapshot (its id, else its name): the disk as it was
    /// when the snapshot was taken, through the snapshot's L1 table, at its size.
    pub snapshot: Option<String>,
}

/// The header of a read-only view of snapshot `id_or_name`: its L1 table and size.
fn snapshot_view(raw: &QcowRawFile, mut h: QcowHeader, id_or_name: &str, writable: bool) -> Result<QcowHeader> {
    if writable {
        return Err(Error::ReadOnlyImage("a snapshot can only be opened read-only".into()));
    }
    let table = crate::snapshot::read_snapshot_table(raw, &h)?;
    let (_, sn) = crate::ops::snapshot::find(&table.snapshots, id_or_name).ok_or_else(|| {
        Error::InvalidArgument(format!("Failed to load snapshot: Can't find snapshot '{id_or_name}'"))
    })?;
    h.size = crate::ops::snapshot::disk_size(sn, h.size);
    h.l1_table_offset = sn.l1_table_offset;
    h.l1_size = sn.l1_size;
    h.validate_l1(raw.file_len())?;
    Ok(h)
}

/// A qcow2 image opened as a guest disk.
pub struct QcowFile {
    raw: QcowRawFile,
    header: QcowHeader,
    path: PathBuf,
    tables: L2Tables,
    /// The external data file, if the image has one.
    data: Option<QcowRawFile>,
    backing: Option<Box<dyn BackingRead>>,
    /// Recently decompressed clusters: (host offset of the stream, contents).
    decompressed: Mutex<VecDeque<(u64, Arc<Vec<u8>>)>>,
    /// The position of the `Read`/`Write`/`Seek` implementations.
    position: u64,
    refcounts_stale: bool,
    rebuild_report: Option<CheckReport>,
    /// Write state, set up by the first write.
    writer: Option<Writer>,
}

impl std::fmt::Debug for QcowFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QcowFile")
            .field("path", &self.path)
            .field("virtual_size", &self.header.size)
            .finish_non_exhaustive()
    }
}

impl QcowFile {
    /// Opens an image read-only.
    pub fn open_read_only<P: AsRef<Path>>(path: P) -> Result<Self> {
        Self::open(path, OpenOptions::default())
    }

    /// Opens an image (locking it as QEMU does).
    pub fn open<P: AsRef<Path>>(path: P, opts: OpenOptions) -> Result<Self> {
        let path = path.as_ref();
        if opts.rebuild && !opts.writable {
            return Err(Error::ReadOnlyImage("a refcount rebuild on open needs a read-write open".into()));
        }
        if opts.force_share && opts.writable {
            return Err(Error::ReadOnlyImage("force_share can only be used with read-only opens".into()));
        }
        let file = crate::backing::open_image_file(path, opts.writable, "image")?;
        if !opts.force_share {
            crate::lock::lock_image(&file, opts.writable, &format!("'{}'", path.display()))?;
        }
        Self::open_storage(Arc::new(FileStorage::new(file)), path, opts)
    }

    /// Opens the image held by `storage` (already locked if it is a file). `path` names it in
    /// messages and anchors relative backing and data file names.
    pub fn open_storage(storage: Arc<dyn Storage>, path: &Path, opts: OpenOptions) -> Result<Self> {
        Self::open_in_chain(storage, path, opts, &[])
    }

    /// Opens the image held by `storage` over `backing` (already open), whatever its header
    /// names (`opts.backing` is not used): chains whose files are not where their headers say,
    /// such as images in memory.
    pub fn open_storage_with_backing(
        storage: Arc<dyn Storage>,
        path: &Path,
        opts: OpenOptions,
        backing: Option<crate::backing::BackingImage>,
    ) -> Result<Self> {
        let mut f = Self::open_in_chain(storage, path, OpenOptions { backing: BackingChoice::Disabled, ..opts }, &[])?;
        f.backing = backing.map(|b| b.0);
        Ok(f)
    }

    /// Opens an image whose overlays (by file identity) are `chain`.
    pub(crate) fn open_in_chain(
        storage: Arc<dyn Storage>,
        path: &Path,
        opts: OpenOptions,
        chain: &[crate::backing::FileId],
    ) -> Result<Self> {
        let mut rebuild_report = None;
        if opts.rebuild {
            let mut h = QcowHeader::read_for_check(&*storage)?;
            let raw = QcowRawFile::new(Arc::clone(&storage), h.cluster_size(), h.refcount_order, true)?;
            rebuild_report = check::repair_if_stale(&raw, &mut h)?;
        }
        let header = QcowHeader::read_from(&*storage)?;
        if opts.writable && header.is_corrupt() {
            return Err(Error::corrupt(
                "the image is marked corrupt (incompatible_features bit 1) and cannot be opened read-write; open it read-only, or repair it with check(repair=\"all\")",
                crate::header::field_offset::INCOMPATIBLE_FEATURES,
            ));
        }
        let id = crate::backing::file_id(&*storage);
        let raw = QcowRawFile::new(storage, header.cluster_size(), header.refcount_order, opts.writable)?;
        let header = match &opts.snapshot {
            Some(name) => snapshot_view(&raw, header, name, opts.writable)?,
            None => header,
        };
        let refcounts_stale = check::refcounts_stale(&raw, &header);
        let tables = L2Tables::load(&raw, &header)?;
        let data = match header.data_file() {
            Some(name) if header.has_data_file() => {
                let (cs, order) = (header.cluster_size(), header.refcount_order);
                Some(open_data_file(path, id, &name, opts.writable, opts.force_share, cs, order)?)
            }
            _ => None,
        };
        let mut chain = chain.to_vec();
        chain.extend(id);
        let backing = match &opts.backing {
            BackingChoice::Disabled => None,
            BackingChoice::Path(p) => Some(open_backing_path(path, p, None, &chain, opts.force_share)?),
            BackingChoice::FromHeader => match &header.backing_file {
                Some(name) if !name.is_empty() => {
                    let format = header.backing_format();
                    Some(open_backing(path, name, format.as_deref(), &chain, opts.force_share)?)
                }
                _ => None,
            },
        };
        Ok(QcowFile {
            raw,
            header,
            path: path.to_path_buf(),
            tables,
            data,
            backing,
            decompressed: Mutex::new(VecDeque::new()),
            position: 0,
            refcounts_stale,
            rebuild_report,
            writer: None,
        })
    }

    /// Creates a new, empty v3 image at `path` (laid out as `qemu-img create` does: header,
    /// reftable, refblock, L1) and opens it read-write.
    pub fn create<P: AsRef<Path>>(path: P, opts: &CreateOptions) -> Result<Self> {
        crate::create::create(path.as_ref(), opts)
    }

    /// Checks the image (no repair), as `qemu-img check`.
    pub fn check(&mut self) -> Result<CheckReport> {
        if self.raw.writable() && !self.refcounts_stale {
            self.flush()?;
        }
        let mut h = self.header.clone();
        check::check_raw(&self.raw, &mut h, Repair::None, false)
    }

    /// Rebuilds the refcount structure (and repairs what `qemu-img check -r all` would), then
    /// returns a check of the result.
    pub fn rebuild_refcounts(&mut self) -> Result<CheckReport> {
        if !self.raw.writable() {
            return Err(Error::ReadOnlyImage("rebuild_refcounts needs an image opened read-write".into()));
        }
        if !self.refcounts_stale {
            self.flush()?;
        }
        let report = check::check_raw(&self.raw, &mut self.header, Repair::All, true);
        self.reload()?;
        report
    }

    /// Re-reads the header, the L1 table and the refcounts after the image changed under the
    /// cached state (a repair).
    pub(crate) fn reload(&mut self) -> Result<()> {
        self.raw.refresh_len()?;
        self.header = QcowHeader::read_from(&**self.raw.storage())?;
        self.tables = L2Tables::load(&self.raw, &self.header)?;
        self.decompressed.get_mut().unwrap_or_else(PoisonError::into_inner).clear();
        self.refcounts_stale = check::refcounts_stale(&self.raw, &self.header);
        if let Some(w) = self.writer.as_mut() {
            w.reload(&self.raw, &self.header)?;
        }
        Ok(())
    }

    /// Whether the refcounts cannot be trusted (dirty bit, or cluster 0 has refcount 0): a
    /// write would need a rebuild first.
    pub fn refcounts_stale(&self) -> bool {
        self.refcounts_stale
    }

    /// The report of the repair done by `open(.., rebuild: true)`, if one was done.
    pub fn rebuild_report(&self) -> Option<&CheckReport> {
        self.rebuild_report.as_ref()
    }

    /// The parsed header.
    pub fn header(&self) -> &QcowHeader {
        &self.header
    }
    /// The internal snapshots, in table order.
    pub fn snapshots(&self) -> Result<Vec<crate::snapshot::Snapshot>> {
        Ok(crate::snapshot::read_snapshot_table(&self.raw, &self.header)?.snapshots)
    }
    /// Guest-visible size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.header.size
    }
    /// Bytes per cluster.
    pub fn cluster_size(&self) -> u64 {
        self.header.cluster_size()
    }
    /// The path the image was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Whether the image was opened read-write.
    pub fn writable(&self) -> bool {
        self.raw.writable()
    }
    /// The table-level view of the host file.
    pub fn raw_file(&self) -> &QcowRawFile {
        &self.raw
    }
    /// The L2-table state (active L1, L2 cache).
    pub(crate) fn tables(&self) -> &L2Tables {
        &self.tables
    }
    /// QEMU's `cache=unsafe` for this image and its data file: writes are never synced.
    pub(crate) fn set_unsafe_cache(&mut self) {
        self.raw.set_unsafe_cache();
        if let Some(d) = self.data.as_mut() {
            d.set_unsafe_cache();
        }
    }
    /// The header after a header-only change written by an operation (`rebase`).
    pub(crate) fn replace_header(&mut self, h: QcowHeader) {
        self.header = h;
    }
    /// The open backing file, if any.
    pub(crate) fn backing_file(&self) -> Option<&dyn BackingRead> {
        self.backing.as_deref()
    }
    /// The external data file, if the image has one.
    pub(crate) fn data_file(&self) -> Option<&QcowRawFile> {
        self.data.as_ref()
    }

    /// Maps `guest_offset`: what it reads as, and for how many bytes (<= `max_len`, within the
    /// virtual size) that holds.
    pub fn map(&self, guest_offset: u64, max_len: u64) -> Result<(ReadPlan, u64)> {
        let max_len = max_len.min(self.virtual_size().saturating_sub(guest_offset));
        self.tables.read_plan(&self.raw, guest_offset, max_len)
    }

    /// Reads guest data at `offset` into `buf`; returns the bytes read, short only at the end
    /// of the virtual disk. Takes `&self`: reads from several threads run in parallel.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        let size = self.virtual_size();
        if offset >= size {
            return Ok(0);
        }
        let len = usize::try_from(size - offset).unwrap_or(usize::MAX).min(buf.len());
        let mut done = 0usize;
        while done < len {
            let off = offset + done as u64;
            let (plan, run) = self.tables.read_plan(&self.raw, off, (len - done) as u64)?;
            let run = usize::try_from(run).unwrap_or(usize::MAX).min(len - done).max(1);
            let chunk = &mut buf[done..done + run];
            match plan {
                ReadPlan::Backing => match &self.backing {
                    Some(b) => b.read_into(chunk, off)?,
                    None => chunk.fill(0),
                },
                ReadPlan::Zero => chunk.fill(0),
                ReadPlan::Data { host } => self.read_data(chunk, host, off)?,
                ReadPlan::Compressed { host, len: clen } => self.read_compressed(chunk, host, clen, off)?,
            }
            done += run;
        }
        Ok(len)
    }

    fn read_data(&self, chunk: &mut [u8], host: u64, guest: u64) -> Result<()> {
        if let Some(d) = &self.data {
            // A data file may be shorter than the disk: the rest reads as zeros.
            let n = d.read_at(chunk, host)?;
            chunk[n..].fill(0);
            return Ok(());
        }
        // QEMU reads zeros past the end of the file; qcowrs reports the truncation instead of
        // inventing data.
        let n = self.raw.read_at(chunk, host)?;
        if n < chunk.len() {
            return Err(Error::corrupt(
                format!(
                    "data for guest offset 0x{:x} lies past the end of the file (0x{:x}); the image is truncated",
                    guest + n as u64,
                    self.raw.file_len()
                ),
                host + n as u64,
            ));
        }
        Ok(())
    }

    /// Decompresses the cluster stored at `[host, host+clen)` into `out` (a whole cluster).
    fn decompress_into(&self, out: &mut [u8], host: u64, clen: u64, guest: u64) -> Result<()> {
        let mut input = vec![0u8; usize::try_from(clen).unwrap_or(0)];
        let n = self.raw.read_at(&mut input, host)?;
        input.truncate(n);
        compression::decompress(self.header.compression_type, &input, out).map_err(|why| {
            Error::corrupt(
                format!(
                    "compressed cluster for guest offset 0x{guest:x} (0x{clen:x} bytes) cannot be decompressed: {why}"
                ),
                host,
            )
        })
    }

    fn read_compressed(&self, chunk: &mut [u8], host: u64, clen: u64, guest: u64) -> Result<()> {
        let cs = self.cluster_size();
        let in_cluster = usize::try_from(guest & (cs - 1)).unwrap_or(0);
        if in_cluster == 0 && chunk.len() as u64 == cs {
            // A whole cluster: straight into the caller's buffer.
            return self.decompress_into(chunk, host, clen, guest);
        }
        let lock = || self.decompressed.lock().unwrap_or_else(PoisonError::into_inner);
        let hit = lock().iter().find(|(h, _)| *h == host).map(|(_, v)| Arc::clone(v));
        let data = match hit {
            Some(d) => d,
            None => {
                // Decompressed without the lock held: other threads decompress in parallel.
                let mut out = vec![0u8; usize::try_from(cs).unwrap_or(0)];
                self.decompress_into(&mut out, host, clen, guest)?;
                let d = Arc::new(out);
                let mut c = lock();
                if c.len() >= DECOMPRESSED_CACHE {
                    c.pop_front();
                }
                c.push_back((host, Arc::clone(&d)));
                d
            }
        };
        chunk.copy_from_slice(&data[in_cluster..in_cluster + chunk.len()]);
        Ok(())
    }

    /// What this image itself holds (depth 0 of `qemu-img map`): sorted, merged
    /// `(guest_offset, length, kind)` with kind "data", "zero" or "compressed". Unflushed
    /// writes are included.
    pub fn allocated_ranges(&self) -> Result<Vec<(u64, u64, &'static str)>> {
        let source = CachedTables { raw: &self.raw, tables: &self.tables };
        let walker = Walker::with_source(&self.raw, &self.header, &source);
        // A valid image maps each L2 entry once, so its ranges are bounded by the file's size;
        // more means tables repeat themselves (a hostile image), which is refused.
        let limit = (1usize << 20).max(usize::try_from(self.raw.file_len() / 8).unwrap_or(usize::MAX));
        let (size, geo) = (self.virtual_size(), self.tables.geometry());
        let mut v = RangeCollector { size, geo, table_ok: true, out: Vec::new(), limit };
        walker.walk_tree(
            Tree::Active,
            self.tables.l1_offset(),
            u32::try_from(self.tables.l1().len()).unwrap_or(u32::MAX),
            &mut v,
        )?;
        Ok(v.out)
    }
}

/// Collects `allocated_ranges`: a visitor of the active tree.
struct RangeCollector {
    size: u64,
    geo: crate::format::L2Geometry,
    table_ok: bool,
    out: Vec<(u64, u64, &'static str)>,
    limit: usize,
}

impl RangeCollector {
    fn push(&mut self, start: u64, len: u64, kind: &'static str) {
        let len = len.min(self.size.saturating_sub(start));
        if len == 0 {
            return;
        }
        match self.out.last_mut() {
            Some(last) if last.2 == kind && last.0 + last.1 == start => last.1 += len,
            _ => self.out.push((start, len, kind)),
        }
    }
}

impl Visitor for RangeCollector {
    fn visit(&mut self, event: Event<'_>) -> Result<Flow> {
        let cs = self.geo.cluster_size();
        match event {
            Event::L1Entry { index, at, entry, .. } => {
                let l2 = crate::format::l1_entry_l2_offset(entry);
                if l2 % cs != 0 {
                    return Err(Error::corrupt(
                        format!("L1[{index}] = 0x{entry:x}: L2 table offset 0x{l2:x} is not cluster aligned"),
                        at,
                    ));
                }
            }
            Event::L2Table { offset, len, .. } => {
                self.table_ok = len == cs;
                if !self.table_ok {
                    return Err(Error::offset(
                        "L2 table",
                        offset,
                        "lies (partly) past the end of the file; the image is truncated",
                    ));
                }
            }
            Event::L2Entry { guest, at, entry, .. } => {
                if guest >= self.size {
                    return Ok(Flow::Continue);
                }
                if self.out.len() >= self.limit {
                    return Err(Error::corrupt(
                        format!(
                            "more than {} allocated ranges from a file of this size: L2 tables are used by several L1 entries",
                            self.limit
                        ),
                        at,
                    ));
                }
                if self.geo.cluster_type(entry) == ClusterType::Compressed {
                    self.geo
                        .read_state(entry, 0)
                        .map_err(|d| Error::corrupt(format!("L2 entry 0x{:x}: {d}", entry.entry), at))?;
                    self.push(guest, cs, "compressed");
                    return Ok(Flow::Continue);
                }
                let mut in_cluster = 0;
                while in_cluster < cs {
                    let (state, end) = self
                        .geo
                        .read_state(entry, in_cluster)
                        .map_err(|d| Error::corrupt(format!("L2 entry 0x{:x}: {d}", entry.entry), at))?;
                    match state {
                        SubclusterState::Data => self.push(guest + in_cluster, end - in_cluster, "data"),
                        SubclusterState::Zero => self.push(guest + in_cluster, end - in_cluster, "zero"),
                        SubclusterState::Unallocated => {}
                    }
                    in_cluster = end;
                }
            }
            Event::Unreadable { offset, error, .. } => {
                return Err(Error::corrupt(format!("a table at 0x{offset:x} cannot be read: {error}"), offset))
            }
            _ => {}
        }
        Ok(Flow::Continue)
    }
}

impl Read for QcowFile {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.read_at(buf, self.position)?;
        self.position += n as u64;
        Ok(n)
    }
}

impl Seek for QcowFile {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        let new = match pos {
            SeekFrom::Start(o) => Some(o),
            SeekFrom::End(d) => self.virtual_size().checked_add_signed(d),
            SeekFrom::Current(d) => self.position.checked_add_signed(d),
        };
        match new {
            Some(p) => {
                self.position = p;
                Ok(p)
            }
            None => Err(io::Error::new(io::ErrorKind::InvalidInput, "seek to a negative or overflowing offset")),
        }
    }
}

impl io::Write for QcowFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_at(buf, self.position)?;
        self.position += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(QcowFile::flush(self)?)
    }
}

impl Drop for QcowFile {
    fn drop(&mut self) {
        // Best effort; callers that care use `close()` and see its errors.
        let _ = self.close();
    }
}
