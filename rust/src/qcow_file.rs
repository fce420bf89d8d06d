//! `QcowFile`: a qcow2 image as a guest disk (`Read` + `Seek`).

use std::fs::{File, OpenOptions as FsOpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::cache::TableCache;
use crate::check::{self, CheckReport, Repair};
use crate::compression;
use crate::error::{Error, IoContext, Result};
use crate::format::{CompressedLayout, L1E_OFFSET_MASK, QCOW_MAGIC};
use crate::header::QcowHeader;
use crate::mapping::{map_entry, ClusterMapping, L2Geometry};
use crate::raw_file::QcowRawFile;

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
        let header = QcowHeader::read_from(&file)?;
        if opts.writable && header.is_corrupt() {
            return Err(Error::corrupt(
                "the image is marked corrupt (incompatible_features bit 1) and cannot be opened read-write; open it read-only, or repair it with check(repair=\"all\")",
                crate::header::field_offset::INCOMPATIBLE_FEATURES,
            ));
        }
        let mut raw = QcowRawFile::from(file, header.cluster_size(), header.refcount_order, opts.writable)?;
        let refcounts_stale = opts.writable && check::refcounts_stale(&mut raw, &header);
        let mut l1_bytes = vec![0u8; header.l1_size as usize * 8];
        raw.read_table_bytes(header.l1_table_offset, &mut l1_bytes, "l1_table_offset (L1 table)")?;
        let l1_table = l1_bytes.chunks_exact(8).map(crate::format::be_u64).collect();

        let data_file = match header.data_file() {
            Some(name) if header.has_data_file() => {
                check_plain_file_name(&name, "data file")?;
                let p = resolve_relative(path, &name);
                Some(
                    FsOpenOptions::new()
                        .read(true)
                        .write(opts.writable)
                        .open(&p)
                        .ctx(|| format!("opening external data file '{}' of '{}'", p.display(), path.display()))?,
                )
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
        })
    }

    /// The seed's trigger, made precise: rebuilds when cluster 0's refcount is 0 (at the
    /// image's width), the refcount table is missing, or the dirty bit is set; with only the
    /// lazy-refcounts bit set, checks and repairs only if the check finds something wrong.
    fn rebuild_if_stale(path: &Path) -> Result<Option<CheckReport>> {
        let file =
            FsOpenOptions::new().read(true).write(true).open(path).ctx(|| format!("opening '{}'", path.display()))?;
        let mut h = QcowHeader::read_from_lenient(&file)?;
        if h.is_corrupt() {
            // Refused by the normal open below, with the reason.
            return Ok(None);
        }
        let mut raw = QcowRawFile::from(file, h.cluster_size(), h.refcount_order, true)?;
        if check::refcounts_stale(&mut raw, &h) {
            return Ok(Some(check::check_image(&mut raw, &mut h, Repair::All, true)?));
        }
        if h.lazy_refcounts() {
            let r = check::check_image(&mut raw, &mut h, Repair::None, false)?;
            if !r.is_clean() {
                return Ok(Some(check::check_image(&mut raw, &mut h, Repair::All, false)?));
            }
        }
        Ok(None)
    }

    /// Checks the image (no repair), as `qemu-img check`.
    pub fn check(&mut self) -> Result<CheckReport> {
        check::check_path(&self.path, Repair::None, false)
    }

    /// Rebuilds the refcount structure (and repairs what `qemu-img check -r all` would), then
    /// returns a check of the result.
    pub fn rebuild_refcounts(&mut self) -> Result<CheckReport> {
        if !self.raw.writable() {
            return Err(Error::ReadOnly("rebuild_refcounts needs an image opened read-write".into()));
        }
        let report = check::check_path(&self.path, Repair::All, true)?;
        self.reload()?;
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
