//! `QcowFile`: a qcow2 image as a guest disk (`Read` + `Seek`).

use std::fs::{File, OpenOptions as FsOpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::cache::TableCache;
use crate::check::{self, CheckReport, Repair};
use crate::compression;
use crate::error::{Error, IoContext, Result};
use std::collections::BTreeSet;

use crate::bitmap::BitmapTracker;
use crate::format::{
    CompressedLayout, COMPAT_LAZY_REFCOUNTS, EXT_BACKING_FORMAT, EXT_FEATURE_TABLE, INCOMPAT_DIRTY,
    INCOMPAT_EXTENDED_L2, L1E_COPIED, L1E_OFFSET_MASK, L2E_COMPRESSED, L2E_COPIED, L2E_OFFSET_MASK, L2E_ZERO,
    QCOW_MAGIC,
};
use crate::header::HeaderExtension;
use crate::header::QcowHeader;
use crate::mapping::{map_entry, ClusterMapping, L2Geometry};
use crate::raw_file::QcowRawFile;
use crate::rebuild::{classify_l2, L2Kind};
use crate::refcount::RefcountManager;

/// Longest backing chain followed (a loop in the chain stops here).
pub const MAX_BACKING_DEPTH: u32 = 32;

/// Memory spent on cached L2 tables per open image.
const L2_CACHE_BYTES: u64 = 16 << 20;

/// How to open an image.
#[derive(Clone, Copy, Debug, Default)]
pub struct OpenOptions {
    /// Open read-write.
    pub writable: bool,
    /// Rebuild stale refcounts on open (needs `writable`).
    pub rebuild: bool,
}

/// A backing file: another qcow2 image or a raw file.
enum Backing {
    Qcow(Box<QcowFile>),
    Raw { file: File, len: u64 },
}

impl Backing {
    fn size(&self) -> u64 {
        match self {
            Backing::Qcow(q) => q.virtual_size(),
            Backing::Raw { len, .. } => *len,
        }
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        let n = match self {
            Backing::Qcow(q) => q.read_at(buf, offset)?,
            Backing::Raw { file, len } => {
                if offset >= *len {
                    0
                } else {
                    let want = usize::try_from(*len - offset).unwrap_or(usize::MAX).min(buf.len());
                    read_full_at(file, &mut buf[..want], offset, "backing file")?
                }
            }
        };
        buf[n..].fill(0);
        Ok(())
    }
}

fn read_full_at(file: &File, buf: &mut [u8], offset: u64, what: &str) -> Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io(format!("reading {what} at 0x{:x}", offset + done as u64), e)),
        }
    }
    Ok(done)
}

/// An L2 table: raw 64-bit words (two per entry with extended L2).
pub(crate) type L2Table = Arc<Vec<u64>>;

/// A qcow2 image opened as a guest disk.
pub struct QcowFile {
    raw: QcowRawFile,
    header: QcowHeader,
    path: PathBuf,
    l1_table: Vec<u64>,
    l2_cache: TableCache<L2Table>,
    geo: L2Geometry,
    data_file: Option<File>,
    backing: Option<Backing>,
    /// The last decompressed cluster: (host offset of its stream, contents).
    compressed_cache: Option<(u64, Vec<u8>)>,
    position: u64,
    refcounts_stale: bool,
    rebuild_report: Option<CheckReport>,
    /// Loaded on the first write (after a check that the refcounts can be trusted).
    refcounts: Option<RefcountManager>,
    /// L1 entries changed in memory and not yet written.
    l1_dirty: BTreeSet<usize>,
    /// We set the dirty bit (lazy refcounts) and must clear it on a clean close.
    set_dirty_bit: bool,
    /// Persistent bitmaps to update on close.
    bitmaps: Option<BitmapTracker>,
}

impl std::fmt::Debug for QcowFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QcowFile")
            .field("path", &self.path)
            .field("virtual_size", &self.header.size)
            .finish_non_exhaustive()
    }
}

fn resolve_relative(image: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        image.parent().map_or_else(|| p.to_path_buf(), |d| d.join(p))
    }
}

fn check_plain_file_name(name: &str, field: &str) -> Result<()> {
    if name.starts_with("json:") || name.contains("://") {
        return Err(Error::UnsupportedFeature(format!(
            "{field} '{name}' is a protocol or JSON name; only plain file names are supported"
        )));
    }
    Ok(())
}

impl QcowFile {
    /// Opens an image read-only.
    pub fn open_read_only<P: AsRef<Path>>(path: P) -> Result<Self> {
        Self::open(path, OpenOptions::default())
    }

    /// Opens an image.
    pub fn open<P: AsRef<Path>>(path: P, opts: OpenOptions) -> Result<Self> {
        Self::open_at_depth(path.as_ref(), opts, 0)
    }

    fn open_at_depth(path: &Path, opts: OpenOptions, depth: u32) -> Result<Self> {
        let mut rebuild_report = None;
        if opts.rebuild {
            if !opts.writable {
                return Err(Error::ReadOnly("a refcount rebuild on open needs a read-write open".into()));
            }
            rebuild_report = Self::rebuild_if_stale(path)?;
        }
        let file = FsOpenOptions::new()
            .read(true)
            .write(opts.writable)
            .open(path)
            .ctx(|| format!("opening '{}'", path.display()))?;
        crate::lock::lock_image(&file, opts.writable, &format!("'{}'", path.display()))?;
        let header = QcowHeader::read_from(&file)?;
        if opts.writable && header.is_corrupt() {
            return Err(Error::corrupt(
                "the image is marked corrupt (incompatible_features bit 1) and cannot be opened read-write; open it read-only, or repair it with check(repair=\"all\")",
                crate::header::field_offset::INCOMPATIBLE_FEATURES,
            ));
        }
        let mut raw = QcowRawFile::from(file, header.cluster_size(), header.refcount_order, opts.writable)?;
        let refcounts_stale = check::refcounts_stale(&mut raw, &header);
        let mut l1_bytes = vec![0u8; header.l1_size as usize * 8];
        raw.read_table_bytes(header.l1_table_offset, &mut l1_bytes, "l1_table_offset (L1 table)")?;
        let l1_table = l1_bytes.chunks_exact(8).map(crate::format::be_u64).collect();

        let data_file = match header.data_file() {
            Some(name) if header.has_data_file() => {
                check_plain_file_name(&name, "data file")?;
                let p = resolve_relative(path, &name);
                let f = FsOpenOptions::new()
                    .read(true)
                    .write(opts.writable)
                    .open(&p)
                    .ctx(|| format!("opening external data file '{}' of '{}'", p.display(), path.display()))?;
                crate::lock::lock_image(&f, opts.writable, &format!("external data file '{}'", p.display()))?;
                Some(f)
            }
            _ => None,
        };

        let backing = match &header.backing_file {
            Some(name) if !name.is_empty() => {
                Some(Self::open_backing(path, name, header.backing_format().as_deref(), depth)?)
            }
            _ => None,
        };

        let cluster_size = header.cluster_size();
        let geo = L2Geometry {
            cluster_bits: header.cluster_bits,
            extended: header.extended_l2(),
            data_file: header.has_data_file(),
            compressed: CompressedLayout::new(header.cluster_bits),
        };
        let capacity = usize::try_from((L2_CACHE_BYTES / cluster_size).max(16)).unwrap_or(16);
        Ok(QcowFile {
            raw,
            header,
            path: path.to_path_buf(),
            l1_table,
            l2_cache: TableCache::new(capacity),
            geo,
            data_file,
            backing,
            compressed_cache: None,
            position: 0,
            refcounts_stale,
            rebuild_report,
            refcounts: None,
            l1_dirty: BTreeSet::new(),
            set_dirty_bit: false,
            bitmaps: None,
        })
    }

    /// The seed's trigger, made precise: rebuilds when cluster 0's refcount is 0 (at the
    /// image's width), the refcount table is missing, or the dirty bit is set; with only the
    /// lazy-refcounts bit set, or on a v2 image, checks and repairs only if the check finds
    /// something wrong.
    fn rebuild_if_stale(path: &Path) -> Result<Option<CheckReport>> {
        let file =
            FsOpenOptions::new().read(true).write(true).open(path).ctx(|| format!("opening '{}'", path.display()))?;
        crate::lock::lock_image(&file, true, &format!("'{}'", path.display()))?;
        let mut h = QcowHeader::read_from_lenient(&file)?;
        if h.is_corrupt() {
            // Refused by the normal open below, with the reason.
            return Ok(None);
        }
        let mut raw = QcowRawFile::from(file, h.cluster_size(), h.refcount_order, true)?;
        if check::refcounts_stale(&mut raw, &h) {
            return Ok(Some(check::check_image(&mut raw, &mut h, Repair::All, true)?));
        }
        // Lazy refcounts (the seed's trigger) and v2 images (which have no dirty bit to mark an
        // interrupted repair) are checked, and repaired if the check finds anything.
        if h.lazy_refcounts() || h.version == 2 {
            let r = check::check_image(&mut raw, &mut h, Repair::None, false)?;
            if !r.is_clean() {
                return Ok(Some(check::check_image(&mut raw, &mut h, Repair::All, false)?));
            }
        }
        Ok(None)
    }

    /// Checks the image (no repair), as `qemu-img check`.
    pub fn check(&mut self) -> Result<CheckReport> {
        if self.raw.writable() && !self.refcounts_stale {
            self.flush()?;
        }
        let mut h = self.header.clone();
        check::check_file(&mut self.raw, &mut h, Repair::None, false)
    }

    /// Rebuilds the refcount structure (and repairs what `qemu-img check -r all` would), then
    /// returns a check of the result.
    pub fn rebuild_refcounts(&mut self) -> Result<CheckReport> {
        if !self.raw.writable() {
            return Err(Error::ReadOnly("rebuild_refcounts needs an image opened read-write".into()));
        }
        if !self.refcounts_stale {
            self.flush()?;
        }
        // Everything cached is dropped and re-read after the repair.
        self.refcounts = None;
        self.l1_dirty.clear();
        self.l2_cache.clear();
        let report = check::check_file(&mut self.raw, &mut self.header, Repair::All, true);
        self.reload()?;
        let report = report?;
        Ok(report)
    }

    /// Re-reads the header and L1 table after another handle changed the image.
    fn reload(&mut self) -> Result<()> {
        self.raw.refresh_len()?;
        self.header = QcowHeader::read_from(self.raw.file())?;
        let mut l1_bytes = vec![0u8; self.header.l1_size as usize * 8];
        self.raw.read_table_bytes(self.header.l1_table_offset, &mut l1_bytes, "l1_table_offset (L1 table)")?;
        self.l1_table = l1_bytes.chunks_exact(8).map(crate::format::be_u64).collect();
        self.l2_cache.clear();
        self.compressed_cache = None;
        self.refcounts_stale = check::refcounts_stale(&mut self.raw, &self.header);
        self.refcounts = None;
        self.l1_dirty.clear();
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

    fn open_backing(image: &Path, name: &str, format: Option<&str>, depth: u32) -> Result<Backing> {
        check_plain_file_name(name, "backing file")?;
        if depth + 1 >= MAX_BACKING_DEPTH {
            return Err(Error::corrupt(
                format!("backing chain deeper than {MAX_BACKING_DEPTH} images at '{name}' (a loop?)"),
                crate::header::field_offset::BACKING_FILE_OFFSET,
            ));
        }
        let p = resolve_relative(image, name);
        let file = File::open(&p).ctx(|| format!("opening backing file '{}' of '{}'", p.display(), image.display()))?;
        crate::lock::lock_image(&file, false, &format!("backing file '{}'", p.display()))?;
        let is_qcow2 = match format {
            Some("qcow2") => true,
            Some("raw") => false,
            Some(other) => {
                return Err(Error::UnsupportedFeature(format!(
                    "backing file '{name}' has format '{other}'; qcowrs reads qcow2 and raw backing files"
                )))
            }
            None => {
                let mut magic = [0u8; 4];
                let n = read_full_at(&file, &mut magic, 0, "backing file")?;
                n == 4 && u32::from_be_bytes(magic) == QCOW_MAGIC
            }
        };
        if is_qcow2 {
            drop(file);
            Ok(Backing::Qcow(Box::new(Self::open_at_depth(&p, OpenOptions::default(), depth + 1)?)))
        } else {
            let len = file.metadata().ctx(|| format!("reading metadata of backing file '{}'", p.display()))?.len();
            Ok(Backing::Raw { file, len })
        }
    }

    /// The parsed header.
    pub fn header(&self) -> &QcowHeader {
        &self.header
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
    /// The table-level view of the host file.
    pub fn raw_file(&self) -> &QcowRawFile {
        &self.raw
    }

    /// The L2 table for L1 index `l1_index`, or `None` when the L1 entry is empty.
    pub(crate) fn l2_table(&mut self, l1_index: u64) -> Result<Option<L2Table>> {
        let Some(&l1e) = self.l1_table.get(usize::try_from(l1_index).unwrap_or(usize::MAX)) else {
            return Ok(None);
        };
        let l2_offset = l1e & L1E_OFFSET_MASK;
        if l2_offset == 0 {
            return Ok(None);
        }
        let cluster_size = self.cluster_size();
        let l1e_pos = self.header.l1_table_offset + l1_index * 8;
        if l2_offset & (cluster_size - 1) != 0 {
            return Err(Error::corrupt(
                format!("L1[{l1_index}] = 0x{l1e:x}: L2 table offset 0x{l2_offset:x} is not cluster aligned"),
                l1e_pos,
            ));
        }
        if let Some(t) = self.l2_cache.get(l2_offset) {
            return Ok(Some(Arc::clone(t)));
        }
        let mut buf = vec![0u8; usize::try_from(cluster_size).unwrap_or(0)];
        let what = format!("L2 table (L1[{l1_index}] at 0x{l1e_pos:x})");
        // L2 tables are always written whole: one that does not fit in the file is truncated.
        if l2_offset.checked_add(cluster_size).is_none_or(|end| end > self.raw.file_len()) {
            return Err(Error::offset(
                what,
                l2_offset,
                format!("lies (partly) past the end of the file (0x{:x}); the image is truncated", self.raw.file_len()),
            ));
        }
        self.raw.read_table_bytes(l2_offset, &mut buf, &what)?;
        let table: L2Table = Arc::new(buf.chunks_exact(8).map(crate::format::be_u64).collect());
        // Read-only tables are never dirty, so nothing is handed back.
        let _ = self.l2_cache.insert(l2_offset, Arc::clone(&table), false);
        Ok(Some(table))
    }

    /// Maps `guest_offset` and returns the mapping and the length (<= `max_len`, within the
    /// virtual size) over which it continues: contiguous data runs and same-kind runs are
    /// merged within one L2 table; compressed clusters are returned one at a time.
    pub fn map(&mut self, guest_offset: u64, max_len: u64) -> Result<(ClusterMapping, u64)> {
        let cluster_bits = self.header.cluster_bits;
        let cluster_size = self.cluster_size();
        let l2_entries = self.header.l2_entries();
        let stride = if self.geo.extended { 2 } else { 1 };
        let max_len = max_len.min(self.virtual_size().saturating_sub(guest_offset));
        let cluster_index = guest_offset >> cluster_bits;
        let l1_index = cluster_index / l2_entries;
        let table = self.l2_table(l1_index)?;
        let l2_span_end = (l1_index + 1) * l2_entries * cluster_size;
        let limit = max_len.min(l2_span_end - guest_offset);
        let Some(table) = table else {
            return Ok((ClusterMapping::Unallocated, limit));
        };
        let l2_offset = self.l1_table[usize::try_from(l1_index).unwrap_or(0)] & L1E_OFFSET_MASK;
        let mut off = guest_offset;
        let mut first: Option<ClusterMapping> = None;
        let mut len = 0u64;
        while len < limit {
            let l2_index = (off >> cluster_bits) % l2_entries;
            let i = usize::try_from(l2_index * stride).unwrap_or(0);
            let entry = table[i];
            let bitmap = if stride == 2 { table[i + 1] } else { 0 };
            let in_cluster = off & (cluster_size - 1);
            let where_ = || {
                (
                    format!("L2 entry {l2_index} (L2 table at 0x{l2_offset:x}) = 0x{entry:x}"),
                    l2_offset + l2_index * 8 * stride,
                )
            };
            let (m, run) = map_entry(&self.geo, entry, bitmap, in_cluster, &where_)?;
            let continues = match (first, m) {
                (None, _) => true,
                (Some(ClusterMapping::Data { host: h0 }), ClusterMapping::Data { host }) => host == h0 + len,
                (Some(ClusterMapping::Zero { .. }), ClusterMapping::Zero { .. })
                | (Some(ClusterMapping::Unallocated), ClusterMapping::Unallocated) => true,
                _ => false,
            };
            if !continues {
                break;
            }
            if first.is_none() {
                first = Some(m);
            }
            len += run;
            off += run;
            if matches!(m, ClusterMapping::Compressed { .. }) {
                break;
            }
        }
        Ok((first.unwrap_or(ClusterMapping::Unallocated), len.min(limit)))
    }

    /// Reads guest data at `offset` into `buf`; returns the bytes read, short only at the end
    /// of the virtual disk.
    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<usize> {
        let size = self.virtual_size();
        if offset >= size {
            return Ok(0);
        }
        let len = usize::try_from(size - offset).unwrap_or(usize::MAX).min(buf.len());
        let mut done = 0usize;
        while done < len {
            let off = offset + done as u64;
            let (m, run) = self.map(off, (len - done) as u64)?;
            let run = usize::try_from(run).unwrap_or(usize::MAX).min(len - done).max(1);
            let chunk = &mut buf[done..done + run];
            match m {
                ClusterMapping::Unallocated => match &mut self.backing {
                    Some(b) => b.read_at(chunk, off)?,
                    None => chunk.fill(0),
                },
                ClusterMapping::Zero { .. } => chunk.fill(0),
                ClusterMapping::Data { host } => {
                    match &self.data_file {
                        Some(f) => {
                            // A data file may be shorter than the disk: the rest reads as zeros.
                            let n = read_full_at(f, chunk, host, "external data file")?;
                            chunk[n..].fill(0);
                        }
                        None => {
                            // QEMU reads zeros past the end of the file; qcowrs reports the
                            // truncation instead of inventing data.
                            let n = self.raw.read_at(chunk, host)?;
                            if n < chunk.len() {
                                return Err(Error::corrupt(
                                    format!(
                                        "data for guest offset 0x{:x} lies past the end of the file (0x{:x}); the image is truncated",
                                        off + n as u64,
                                        self.raw.file_len()
                                    ),
                                    host + n as u64,
                                ));
                            }
                        }
                    }
                }
                ClusterMapping::Compressed { host, len: clen } => {
                    let in_cluster = usize::try_from(off & (self.cluster_size() - 1)).unwrap_or(0);
                    let data = self.decompressed_cluster(host, clen, off)?;
                    chunk.copy_from_slice(&data[in_cluster..in_cluster + run]);
                }
            }
            done += run;
        }
        Ok(len)
    }

    fn decompressed_cluster(&mut self, host: u64, clen: u64, guest: u64) -> Result<&[u8]> {
        let hit = matches!(&self.compressed_cache, Some((h, _)) if *h == host);
        if !hit {
            let cluster_size = usize::try_from(self.cluster_size()).unwrap_or(0);
            let mut input = vec![0u8; usize::try_from(clen).unwrap_or(0)];
            let n = self.raw.read_at(&mut input, host)?;
            input.truncate(n);
            let mut out = self.compressed_cache.take().map(|(_, v)| v).unwrap_or_default();
            out.resize(cluster_size, 0);
            compression::decompress(self.header.compression_type, &input, &mut out).map_err(|why| {
                Error::corrupt(format!("compressed cluster for guest offset 0x{guest:x} (0x{clen:x} bytes) cannot be decompressed: {why}"), host)
            })?;
            self.compressed_cache = Some((host, out));
        }
        Ok(self.compressed_cache.as_ref().map_or(&[][..], |(_, v)| v.as_slice()))
    }

    /// What this image itself holds (depth 0 of `qemu-img map`): sorted, merged
    /// `(guest_offset, length, kind)` with kind "data", "zero" or "compressed".
    pub fn allocated_ranges(&mut self) -> Result<Vec<(u64, u64, &'static str)>> {
        let mut out: Vec<(u64, u64, &'static str)> = Vec::new();
        let size = self.virtual_size();
        let l2_span = self.header.l2_entries() << self.header.cluster_bits;
        let mut off = 0u64;
        while off < size {
            let l1_index = off / l2_span;
            if self
                .l1_table
                .get(usize::try_from(l1_index).unwrap_or(usize::MAX))
                .is_none_or(|e| e & L1E_OFFSET_MASK == 0)
            {
                off = (l1_index + 1).saturating_mul(l2_span);
                continue;
            }
            let (m, run) = self.map(off, size - off)?;
            if let Some(kind) = m.kind() {
                match out.last_mut() {
                    Some(last) if last.2 == kind && last.0 + last.1 == off => last.1 += run,
                    _ => out.push((off, run, kind)),
                }
            }
            off += run.max(1);
        }
        Ok(out)
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

fn punch_hole(file: &File, offset: u64, len: u64) {
    use nix::fcntl::{fallocate, FallocateFlags};
    let (Ok(off), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else { return };
    // Best effort: a file system without hole punching keeps the bytes (the cluster is free
    // either way).
    let _ = fallocate(file, FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE, off, l);
}

impl QcowFile {
    /// Creates a new, empty v3 image (laid out as `qemu-img create` does: header, reftable,
    /// refblock, L1) and opens it read-write.
    pub fn create<P: AsRef<Path>>(path: P, opts: &CreateOptions) -> Result<Self> {
        let path = path.as_ref();
        let cs = opts.cluster_size;
        if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
            return Err(Error::InvalidClusterSize(format!(
                "cluster_size {cs} must be a power of two from 512 to 2 MiB"
            )));
        }
        let cluster_bits = cs.trailing_zeros();
        if !opts.refcount_bits.is_power_of_two() || opts.refcount_bits > 64 {
            return Err(Error::UnsupportedFeature(format!(
                "refcount_bits {} must be a power of two up to 64",
                opts.refcount_bits
            )));
        }
        if opts.extended_l2 && cluster_bits < crate::format::MIN_EXTENDED_L2_CLUSTER_BITS {
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
        let l1_entries = h.l1_entries_needed();
        h.l1_size = u32::try_from(l1_entries)
            .ok()
            .filter(|&n| u64::from(n) * 8 <= crate::format::MAX_L1_BYTES)
            .ok_or_else(|| {
                Error::UnsupportedFeature(format!("virtual size {} needs an L1 table above 32 MiB", opts.virtual_size))
            })?;
        let l1_clusters = (l1_entries * 8).div_ceil(cs);
        let geo = crate::format::RefcountGeometry { cluster_bits, refcount_order: h.refcount_order };
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
        h.refcount_table_clusters =
            u32::try_from(rt).map_err(|_| Error::InvalidRefcountTableSize("too large".into()))?;
        h.l1_table_offset = (1 + rt + rb) * cs;
        let used = 1 + rt + rb + l1_clusters;
        let header_bytes = h.to_bytes()?;
        let file = FsOpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .ctx(|| format!("creating '{}'", path.display()))?;
        crate::lock::lock_image(&file, true, &format!("'{}'", path.display()))?;
        let mut raw = QcowRawFile::from(file, cs, h.refcount_order, true)?;
        let reftable: Vec<u64> = (0..rb).map(|i| (1 + rt + i) * cs).collect();
        raw.write_pointer_table(cs, &reftable, 0)?;
        for i in 0..rb {
            let first = i * geo.refblock_entries();
            let counts: Vec<u64> = (first..(first + geo.refblock_entries()).min(used)).map(|_| 1).collect();
            raw.write_refcount_block((1 + rt + i) * cs, &counts)?;
        }
        // The L1 table: zeros up to its last entry (like QEMU, the file may end mid-cluster).
        raw.write_at(&vec![0u8; usize::try_from(l1_entries * 8).unwrap_or(0).max(8)], h.l1_table_offset, "L1 table")?;
        raw.write_at(&header_bytes, 0, "header")?;
        raw.sync()?;
        drop(raw);
        Self::open(path, OpenOptions { writable: true, rebuild: false })
    }

    /// Prepares the first write: the refcounts must be trustworthy, since the allocator hands
    /// out clusters whose refcount is 0.
    fn prepare_write(&mut self) -> Result<()> {
        if !self.raw.writable() {
            return Err(Error::ReadOnly(format!("'{}' is opened read-only", self.path.display())));
        }
        if self.refcounts_stale {
            return Err(Error::RefcountRebuildRequired(
                "the refcounts are stale (dirty bit set, or cluster 0 has refcount 0): open with rebuild=True or call rebuild_refcounts()".into(),
            ));
        }
        if self.refcounts.is_some() {
            return Ok(());
        }
        let report = check::check_image(&mut self.raw, &mut self.header, Repair::None, false)?;
        if report.counts.corruptions > 0 || report.counts.check_errors > 0 {
            return Err(Error::RefcountRebuildRequired(format!(
                "the image has {} corruption(s) and {} check error(s) (refcounts or OFLAG_COPIED disagree with the tables); repair it (check(repair=\"all\")) before writing",
                report.counts.corruptions, report.counts.check_errors
            )));
        }
        self.refcounts = Some(RefcountManager::load(&mut self.raw, &self.header)?);
        if self.header.lazy_refcounts() && !self.header.is_dirty() {
            self.write_incompatible(self.header.incompatible_features | INCOMPAT_DIRTY)?;
            self.set_dirty_bit = true;
        }
        // Enabled persistent bitmaps: flagged in_use now, updated and unflagged on close.
        self.bitmaps = BitmapTracker::start(&mut self.raw, &self.header)?;
        // A writer must clear autoclear bits it does not maintain (bit 1, raw external data,
        // is kept: qcowrs writes data at its guest offset).
        let keep = crate::format::AUTOCLEAR_DATA_FILE_RAW | crate::format::AUTOCLEAR_BITMAPS;
        if self.header.autoclear_features & !keep != 0 {
            let v = self.header.autoclear_features & keep;
            self.raw.write_at(
                &v.to_be_bytes(),
                crate::header::field_offset::AUTOCLEAR_FEATURES,
                "header (autoclear_features)",
            )?;
            self.raw.sync()?;
            self.header.autoclear_features = v;
        }
        Ok(())
    }

    fn write_incompatible(&mut self, v: u64) -> Result<()> {
        self.raw.write_at(
            &v.to_be_bytes(),
            crate::header::field_offset::INCOMPATIBLE_FEATURES,
            "header (incompatible_features)",
        )?;
        self.raw.sync()?;
        self.header.incompatible_features = v;
        Ok(())
    }

    fn rc(&mut self) -> Result<&mut RefcountManager> {
        self.refcounts.as_mut().ok_or_else(|| Error::RefcountRebuildRequired("refcounts not loaded".into()))
    }

    /// Allocates one cluster; returns its host offset.
    fn alloc_cluster(&mut self) -> Result<u64> {
        let cb = self.header.cluster_bits;
        let rc =
            self.refcounts.as_mut().ok_or_else(|| Error::RefcountRebuildRequired("refcounts not loaded".into()))?;
        Ok(rc.alloc(&mut self.raw, &mut self.header, 1)? << cb)
    }

    /// Defers dropping the references a removed L2 entry held.
    fn free_entry_clusters(&mut self, entry: u64) -> Result<()> {
        let cb = self.header.cluster_bits;
        match classify_l2(entry, self.geo.extended, self.geo.data_file) {
            L2Kind::Normal | L2Kind::ZeroAlloc if !self.geo.data_file => {
                let c = (entry & L2E_OFFSET_MASK) >> cb;
                self.rc()?.free_later(c);
            }
            L2Kind::Compressed => {
                let (off, len) = self.geo.compressed.decode(entry & !(L2E_COPIED | L2E_COMPRESSED));
                for c in (off >> cb)..=((off + len - 1) >> cb) {
                    self.rc()?.free_later(c);
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Inserts an L2 table into the cache; a dirty table evicted by it is written back after
    /// the refcounts it depends on.
    fn cache_l2(&mut self, offset: u64, table: L2Table, dirty: bool) -> Result<()> {
        if let Some((k, t)) = self.l2_cache.insert(offset, table, dirty) {
            self.write_refcounts_durably()?;
            self.write_l2(k, &t)?;
        }
        Ok(())
    }

    fn write_l2(&mut self, offset: u64, t: &[u64]) -> Result<()> {
        let mut buf = Vec::with_capacity(t.len() * 8);
        for w in t {
            buf.extend_from_slice(&w.to_be_bytes());
        }
        self.raw.write_at(&buf, offset, "L2 table")
    }

    /// Refblocks and reftable on disk and synced (together with the guest data written so far).
    fn write_refcounts_durably(&mut self) -> Result<()> {
        if let Some(rc) = self.refcounts.as_mut() {
            if rc.is_dirty() {
                rc.write_dirty_blocks(&mut self.raw)?;
            }
        }
        self.raw.sync()?;
        if let Some(f) = &self.data_file {
            f.sync_data().ctx(|| "flushing the external data file".into())?;
        }
        Ok(())
    }

    /// The L2 table for `l1_index`, made private to the active image (allocated, or copied if
    /// shared with a snapshot). Returns its host offset.
    fn l2_for_write(&mut self, l1_index: u64) -> Result<u64> {
        let i = usize::try_from(l1_index).map_err(|_| Error::InvalidClusterIndex("L1 index".into()))?;
        let l1e = *self.l1_table.get(i).ok_or_else(|| {
            Error::InvalidClusterIndex(format!("L1 index {l1_index} beyond l1_size {}", self.header.l1_size))
        })?;
        let old = l1e & L1E_OFFSET_MASK;
        if old != 0 && l1e & L1E_COPIED != 0 {
            if self.l2_cache.get(old).is_none() {
                self.l2_table(l1_index)?;
            }
            return Ok(old);
        }
        let table: Vec<u64> = if old == 0 {
            vec![0u64; usize::try_from(self.cluster_size() / 8).unwrap_or(0)]
        } else {
            self.l2_table(l1_index)?.map(|t| (*t).clone()).unwrap_or_default()
        };
        let new = self.alloc_cluster()?;
        self.cache_l2(new, Arc::new(table), true)?;
        self.l1_table[i] = new | L1E_COPIED;
        self.l1_dirty.insert(i);
        if old != 0 {
            let cb = self.header.cluster_bits;
            self.rc()?.free_later(old >> cb);
        }
        Ok(new)
    }

    /// The (entry, bitmap) of a cluster; zeros when its L2 table is absent.
    fn l2_entry(&mut self, cluster_index: u64) -> Result<(u64, u64)> {
        let l2_entries = self.header.l2_entries();
        let stride = if self.geo.extended { 2 } else { 1 };
        let Some(t) = self.l2_table(cluster_index / l2_entries)? else { return Ok((0, 0)) };
        let i = usize::try_from((cluster_index % l2_entries) * stride).unwrap_or(0);
        Ok((t[i], if stride == 2 { t[i + 1] } else { 0 }))
    }

    fn set_l2_entry(&mut self, cluster_index: u64, entry: u64, bitmap: u64) -> Result<()> {
        let l2_entries = self.header.l2_entries();
        let stride = if self.geo.extended { 2 } else { 1 };
        let l2 = self.l2_for_write(cluster_index / l2_entries)?;
        let i = usize::try_from((cluster_index % l2_entries) * stride).unwrap_or(0);
        let t = self.l2_cache.get_mut(l2).ok_or_else(|| Error::corrupt("L2 table vanished from the cache", l2))?;
        let t = Arc::make_mut(t);
        t[i] = entry;
        if stride == 2 {
            t[i + 1] = bitmap;
        }
        Ok(())
    }

    fn check_guest_range(&self, offset: u64, len: u64, what: &str) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.virtual_size() => Ok(()),
            _ => Err(Error::offset(
                "guest offset",
                offset,
                format!(
                    "{what} of 0x{len:x} bytes extends past the virtual size 0x{:x}; grow the disk with truncate()",
                    self.virtual_size()
                ),
            )),
        }
    }

    /// Writes guest data at `offset` (copy-on-write where clusters are shared, compressed,
    /// zero or backed). Metadata is cached and reaches the disk on `flush()`.
    pub fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_guest_range(offset, buf.len() as u64, "write")?;
        if buf.is_empty() {
            return Ok(());
        }
        self.prepare_write()?;
        self.compressed_cache = None;
        if let Some(b) = self.bitmaps.as_mut() {
            b.note(offset, buf.len() as u64);
        }
        let cs = self.cluster_size();
        let mut done = 0usize;
        while done < buf.len() {
            let off = offset + done as u64;
            let in_cluster = usize::try_from(off & (cs - 1)).unwrap_or(0);
            let n = (usize::try_from(cs).unwrap_or(0) - in_cluster).min(buf.len() - done);
            self.write_cluster(off, &buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    /// Writes `data` (within one cluster) at guest offset `off`.
    fn write_cluster(&mut self, off: u64, data: &[u8]) -> Result<()> {
        let cs = self.cluster_size();
        let cb = self.header.cluster_bits;
        let ci = off >> cb;
        let cluster_start = ci << cb;
        let in_cluster = off - cluster_start;
        let (entry, bitmap) = self.l2_entry(ci)?;
        let kind = classify_l2(entry, self.geo.extended, self.geo.data_file);
        let l1e = self.l1_table[usize::try_from(ci / self.header.l2_entries()).unwrap_or(0)];
        let private = entry & L2E_COPIED != 0 && l1e & L1E_COPIED != 0;
        let fully_allocated = !self.geo.extended || bitmap & 0xffff_ffff == 0xffff_ffff;
        let host = entry & L2E_OFFSET_MASK;
        if kind == L2Kind::Normal && private && fully_allocated {
            return self.write_host(data, host + in_cluster);
        }
        // Extended L2: only the subclusters the write touches are allocated (as QEMU does);
        // the others keep their state (backing file, zero).
        if self.geo.extended && (kind == L2Kind::Unallocated || (kind == L2Kind::Normal && private)) {
            return self.write_subclusters(ci, in_cluster, data, entry, bitmap, kind);
        }
        // Build the whole cluster as the guest sees it, with the new data over it.
        let mut full = vec![0u8; usize::try_from(cs).unwrap_or(0)];
        if data.len() as u64 != cs {
            let n = self.read_at(&mut full, cluster_start)?;
            full[n..].fill(0);
        }
        let s = usize::try_from(in_cluster).unwrap_or(0);
        full[s..s + data.len()].copy_from_slice(data);
        let reuse = matches!(kind, L2Kind::Normal | L2Kind::ZeroAlloc) && private;
        let target = if self.geo.data_file {
            cluster_start
        } else if reuse {
            host
        } else {
            self.alloc_cluster()?
        };
        self.write_host(&full, target)?;
        let new_bitmap = if self.geo.extended { 0xffff_ffff } else { 0 };
        self.set_l2_entry(ci, target | L2E_COPIED, new_bitmap)?;
        if !reuse && !self.geo.data_file {
            self.free_entry_clusters(entry)?;
        }
        Ok(())
    }

    /// Writes `data` at `in_cluster` of cluster `ci` (extended L2, private or unallocated),
    /// allocating only the subclusters it touches.
    fn write_subclusters(
        &mut self,
        ci: u64,
        in_cluster: u64,
        data: &[u8],
        entry: u64,
        bitmap: u64,
        kind: L2Kind,
    ) -> Result<()> {
        let cb = self.header.cluster_bits;
        let sc_bits = cb - crate::format::SUBCLUSTERS.trailing_zeros();
        let cluster_start = ci << cb;
        let len = data.len() as u64;
        let (first, last) = (in_cluster >> sc_bits, (in_cluster + len - 1) >> sc_bits);
        let (start, end) = (first << sc_bits, (last + 1) << sc_bits);
        let mut buf = vec![0u8; usize::try_from(end - start).unwrap_or(0)];
        if in_cluster != start || in_cluster + len != end {
            // Edge subclusters: what the guest sees there now (backing, zeros or data).
            let n = self.read_at(&mut buf, cluster_start + start)?;
            buf[n..].fill(0);
        }
        let s = usize::try_from(in_cluster - start).unwrap_or(0);
        buf[s..s + data.len()].copy_from_slice(data);
        let host = if kind != L2Kind::Unallocated {
            entry & L2E_OFFSET_MASK
        } else if self.geo.data_file {
            cluster_start
        } else {
            self.alloc_cluster()?
        };
        self.write_host(&buf, host + start)?;
        let mask = ((1u64 << (last - first + 1)) - 1) << first;
        self.set_l2_entry(ci, host | L2E_COPIED, (bitmap | mask) & !(mask << 32))
    }

    /// Zeroes `[off, off+n)` inside one cluster of an extended-L2 image: whole subclusters get
    /// their zero bit, partial ones are written.
    fn zero_subclusters(&mut self, off: u64, n: u64) -> Result<()> {
        let cb = self.header.cluster_bits;
        let sc_bits = cb - crate::format::SUBCLUSTERS.trailing_zeros();
        let ci = off >> cb;
        let in_cluster = off - (ci << cb);
        let mut first_full = in_cluster.div_ceil(1 << sc_bits);
        let mut end_full = (in_cluster + n) >> sc_bits;
        // A partial edge subcluster that already reads as zeros is zeroed whole (as QEMU).
        let (entry0, bitmap0) = self.l2_entry(ci)?;
        let no_backing = self.backing.is_none();
        let reads_zero = |sc: u64| -> bool {
            let compressed = classify_l2(entry0, true, self.geo.data_file) == L2Kind::Compressed;
            !compressed && (bitmap0 >> (32 + sc) & 1 == 1 || (bitmap0 >> sc & 1 == 0 && no_backing))
        };
        if in_cluster % (1 << sc_bits) != 0 && reads_zero(in_cluster >> sc_bits) {
            first_full = in_cluster >> sc_bits;
        }
        let end = in_cluster + n;
        if end % (1 << sc_bits) != 0 && reads_zero(end >> sc_bits) {
            end_full = (end >> sc_bits) + 1;
        }
        if first_full >= end_full {
            return self.write_cluster(off, &vec![0u8; usize::try_from(n).unwrap_or(0)]);
        }
        let head = (first_full << sc_bits).saturating_sub(in_cluster);
        let tail = end.saturating_sub(end_full << sc_bits);
        if head > 0 {
            self.write_cluster(off, &vec![0u8; usize::try_from(head).unwrap_or(0)])?;
        }
        if tail > 0 {
            self.write_cluster(off + n - tail, &vec![0u8; usize::try_from(tail).unwrap_or(0)])?;
        }
        let (entry, bitmap) = self.l2_entry(ci)?;
        let kind = classify_l2(entry, true, self.geo.data_file);
        let l1e = self.l1_table[usize::try_from(ci / self.header.l2_entries()).unwrap_or(0)];
        let private = entry & L2E_COPIED != 0 && l1e & L1E_COPIED != 0;
        if !(kind == L2Kind::Unallocated || (kind == L2Kind::Normal && private)) {
            let (b0, b1) = ((first_full << sc_bits).max(in_cluster), (end_full << sc_bits).min(end));
            let zeros = vec![0u8; usize::try_from(b1 - b0).unwrap_or(0)];
            return self.write_cluster((ci << cb) + b0, &zeros);
        }
        let mask = ((1u64 << (end_full - first_full)) - 1) << first_full;
        self.set_l2_entry(ci, entry, (bitmap & !mask) | (mask << 32))
    }

    fn write_host(&mut self, data: &[u8], host: u64) -> Result<()> {
        use std::os::unix::fs::FileExt;
        match &self.data_file {
            Some(f) => f.write_all_at(data, host).ctx(|| format!("writing the external data file at 0x{host:x}")),
            None => self.raw.write_at(data, host, "guest data"),
        }
    }

    /// Makes whole clusters read as zeros (the zero flag on v3; no data written) and writes
    /// zeros into partial ones.
    pub fn write_zeroes(&mut self, offset: u64, length: u64) -> Result<()> {
        self.zero_range(offset, length, false)
    }

    /// Frees the whole clusters of the range (on v3 they then read as zeros; on v2 they read
    /// from the backing file, or as zeros without one); partial clusters are left unchanged.
    /// Freed clusters are punched out of the host file on `flush()`.
    pub fn discard(&mut self, offset: u64, length: u64) -> Result<()> {
        self.zero_range(offset, length, true)
    }

    fn zero_range(&mut self, offset: u64, length: u64, discard: bool) -> Result<()> {
        self.check_guest_range(offset, length, if discard { "discard" } else { "write_zeroes" })?;
        if length == 0 {
            return Ok(());
        }
        self.prepare_write()?;
        self.compressed_cache = None;
        if let Some(b) = self.bitmaps.as_mut() {
            b.note(offset, length);
        }
        let cs = self.cluster_size();
        let end = offset + length;
        let mut off = offset;
        while off < end {
            let cluster_start = off & !(cs - 1);
            let n = (cluster_start + cs).min(end) - off;
            let whole = off == cluster_start && (n == cs || off + n == self.virtual_size());
            if whole && !self.geo.data_file && (self.header.version >= 3 || self.backing.is_none() || discard) {
                self.zero_cluster(off >> self.header.cluster_bits, discard)?;
            } else if !discard && self.geo.extended {
                self.zero_subclusters(off, n)?;
            } else if !discard {
                let zeros = vec![0u8; usize::try_from(n).unwrap_or(0)];
                self.write_cluster(off, &zeros)?;
            }
            off += n;
        }
        Ok(())
    }

    fn zero_cluster(&mut self, ci: u64, discard: bool) -> Result<()> {
        let (entry, bitmap) = self.l2_entry(ci)?;
        let kind = classify_l2(entry, self.geo.extended, self.geo.data_file);
        let (new_entry, new_bitmap) = if self.header.version < 3 {
            (0, 0)
        } else if self.geo.extended {
            (0, 0xffff_ffffu64 << 32)
        } else {
            (L2E_ZERO, 0)
        };
        let reads_zero_already = match kind {
            L2Kind::ZeroPlain => true,
            L2Kind::Unallocated => {
                self.backing.is_none() && (!self.geo.extended || bitmap == new_bitmap || bitmap == 0)
            }
            _ => false,
        };
        if reads_zero_already && !(discard && kind == L2Kind::Unallocated && new_entry != 0 && self.backing.is_some()) {
            return Ok(());
        }
        if (entry, bitmap) == (new_entry, new_bitmap) {
            return Ok(());
        }
        self.set_l2_entry(ci, new_entry, new_bitmap)?;
        self.free_entry_clusters(entry)
    }

    /// Grows the virtual size (shrinking is refused). The L1 table is reallocated if it must
    /// grow; the header switches to it in one write.
    pub fn truncate(&mut self, new_size: u64) -> Result<()> {
        if new_size < self.virtual_size() {
            return Err(Error::UnsupportedFeature(format!(
                "shrinking the virtual size from {} to {new_size} bytes would drop guest data; only growing is supported",
                self.virtual_size()
            )));
        }
        if new_size == self.virtual_size() {
            return Ok(());
        }
        if self.header.autoclear_features & crate::format::AUTOCLEAR_BITMAPS != 0 && self.header.bitmaps().is_some() {
            return Err(Error::UnsupportedFeature(
                "the image has persistent bitmaps, which cannot follow a resize (QEMU refuses too)".into(),
            ));
        }
        self.prepare_write()?;
        let mut grown = self.header.clone();
        grown.size = new_size;
        let needed = grown.l1_entries_needed();
        if needed > u64::from(self.header.l1_size) {
            let entries = u32::try_from(needed)
                .ok()
                .filter(|&n| u64::from(n) * 8 <= crate::format::MAX_L1_BYTES)
                .ok_or_else(|| Error::UnsupportedFeature(format!("size {new_size} needs an L1 table above 32 MiB")))?;
            self.flush()?;
            let cs = self.cluster_size();
            let cb = self.header.cluster_bits;
            let clusters = (u64::from(entries) * 8).div_ceil(cs);
            let first = {
                let rc = self
                    .refcounts
                    .as_mut()
                    .ok_or_else(|| Error::RefcountRebuildRequired("refcounts not loaded".into()))?;
                rc.alloc(&mut self.raw, &mut self.header, clusters)?
            };
            let mut l1 = self.l1_table.clone();
            l1.resize(entries as usize, 0);
            let mut buf = vec![0u8; usize::try_from(clusters * cs).unwrap_or(0)];
            for (c, e) in buf.chunks_exact_mut(8).zip(&l1) {
                c.copy_from_slice(&e.to_be_bytes());
            }
            self.write_refcounts_durably()?;
            self.raw.write_at(&buf, first << cb, "new L1 table")?;
            self.raw.sync()?;
            let mut commit = [0u8; 12];
            commit[..4].copy_from_slice(&entries.to_be_bytes());
            commit[4..].copy_from_slice(&(first << cb).to_be_bytes());
            self.raw.write_at(&commit, crate::header::field_offset::L1_SIZE, "header (l1_size, l1_table_offset)")?;
            self.raw.sync()?;
            let old = (self.header.l1_table_offset >> cb, (u64::from(self.header.l1_size) * 8).div_ceil(cs));
            self.header.l1_size = entries;
            self.header.l1_table_offset = first << cb;
            self.l1_table = l1;
            for k in 0..old.1 {
                self.rc()?.free_later(old.0 + k);
            }
        }
        // The new area reads as zeros even where a longer backing file has data (as QEMU).
        // Those zero entries are made durable before the header exposes the area.
        let old_size = self.virtual_size();
        self.header.size = new_size;
        let backing_end = self.backing.as_ref().map_or(0, Backing::size).min(new_size);
        if backing_end > old_size {
            self.write_zeroes(old_size, backing_end - old_size)?;
        }
        self.flush()?;
        self.raw.write_at(&new_size.to_be_bytes(), crate::header::field_offset::SIZE, "header (size)")?;
        self.raw.sync()
    }

    /// Makes everything written so far durable, in an order that leaves only leaks after a
    /// crash at any point: guest data and refcounts (synced) before L2 tables (synced) before
    /// L1 entries (synced); references dropped before the refcounts of what they pointed at.
    pub fn flush(&mut self) -> Result<()> {
        if !self.raw.writable() || self.refcounts.is_none() {
            return Ok(());
        }
        self.write_refcounts_durably()?;
        let dirty_l2 = self.l2_cache.dirty_keys();
        if !dirty_l2.is_empty() {
            for k in &dirty_l2 {
                if let Some(t) = self.l2_cache.get(*k).cloned() {
                    self.write_l2(*k, &t)?;
                }
                self.l2_cache.mark_clean(*k);
            }
            self.raw.sync()?;
        }
        if !self.l1_dirty.is_empty() {
            let l1_offset = self.header.l1_table_offset;
            for i in std::mem::take(&mut self.l1_dirty) {
                let e = self.l1_table[i];
                self.raw.write_at(&e.to_be_bytes(), l1_offset + 8 * i as u64, "L1 entry")?;
            }
            self.raw.sync()?;
        }
        let has_frees = self.refcounts.as_ref().is_some_and(RefcountManager::has_pending_frees);
        if has_frees {
            let freed = {
                let rc = self
                    .refcounts
                    .as_mut()
                    .ok_or_else(|| Error::RefcountRebuildRequired("refcounts not loaded".into()))?;
                rc.apply_frees(&mut self.raw, &mut self.header)?
            };
            self.write_refcounts_durably()?;
            let cs = self.cluster_size();
            let cb = self.header.cluster_bits;
            for c in freed {
                punch_hole(self.raw.file(), c << cb, cs);
            }
        }
        Ok(())
    }

    /// Flushes and, if this handle set the dirty bit (lazy refcounts), clears it.
    pub fn close(&mut self) -> Result<()> {
        self.flush()?;
        if let Some(tracker) = self.bitmaps.take() {
            let cb = self.header.cluster_bits;
            let (raw, header, refcounts, data_file) =
                (&mut self.raw, &mut self.header, &mut self.refcounts, &self.data_file);
            let rc = refcounts.as_mut().ok_or_else(|| Error::RefcountRebuildRequired("refcounts not loaded".into()))?;
            let rc_cell = std::cell::RefCell::new(rc);
            tracker.finish(raw, &mut |raw| Ok(rc_cell.borrow_mut().alloc(raw, header, 1)? << cb), &mut |raw| {
                let mut rc = rc_cell.borrow_mut();
                if rc.is_dirty() {
                    rc.write_dirty_blocks(raw)?;
                }
                raw.sync()?;
                if let Some(f) = data_file {
                    f.sync_data().ctx(|| "flushing the external data file".into())?;
                }
                Ok(())
            })?;
        }
        if self.set_dirty_bit {
            self.write_incompatible(self.header.incompatible_features & !INCOMPAT_DIRTY)?;
            self.set_dirty_bit = false;
        }
        self.refcounts = None;
        Ok(())
    }
}

impl Drop for QcowFile {
    fn drop(&mut self) {
        // Best effort; callers that care use `close()` and see its errors.
        let _ = self.close();
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
