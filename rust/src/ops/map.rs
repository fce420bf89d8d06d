//! `qemu-img map`: what every guest range of an image reads from, over its whole backing
//! chain, as the entries `qemu-img map --output=json` prints (same boundaries, same flags, same
//! merging).
//!
//! QEMU's rules, reproduced here (`qemu-img.c` `img_map`/`get_block_status`, `block/io.c`,
//! `qcow2_co_block_status`, file-posix `raw_co_block_status`; checked against qemu-img 10):
//!
//! * Each layer answers a *block status* for `[offset, offset+bytes)`: a run length and flags.
//!   A qcow2 layer: data clusters and allocated subclusters are `data` with an offset (in the
//!   image file or its external data file), zero clusters/subclusters are `zero` (with an
//!   offset when a host cluster is allocated: preallocated zero clusters, zero subclusters of
//!   an allocated cluster), compressed clusters are `data` + `compressed` with **no** offset.
//!   Unallocated subclusters of an allocated cluster carry the offset but no flag. A raw layer
//!   (a raw backing file) is `data` where the file has data and `zero` in its holes
//!   (`SEEK_DATA`/`SEEK_HOLE`), always with the offset.
//! * `present` = the layer's own answer had `data` or `zero`. Without either, the layer
//!   adds `zero` itself when it has no backing file or `offset` lies at or past the backing
//!   file's length; otherwise the backing file is asked for the same run (`depth` + 1).
//!   So a range no layer allocates has the depth of the bottom layer, `present: false`,
//!   `zero: true`, and the part of an overlay past a shorter backing file has the overlay's
//!   depth.
//! * A qcow2 layer whose file holds clear signs of `preallocation=metadata` (more clusters
//!   with a refcount than allocated file space: QEMU's `qcow2_detect_metadata_preallocation`)
//!   also asks its file about data clusters: holes there are reported `zero` + `data`.
//! * Lengths are QEMU's: a qcow2 image has `size / 512` whole sectors, a raw file
//!   `ceil(len / 512)`.
//! * Entries merge when flags, depth and file are the same and offsets are contiguous (or
//!   both absent). The map starts at `start_offset` and ends at `start_offset + max_length` or
//!   the image's end; when that is empty, qemu-img still prints one entry of length 0.
//!
//! Each layer caches the last run it found, so the work is proportional to the number of runs
//! in each layer (never to the number of guest clusters), and unallocated L1 ranges are
//! skipped as a whole. The entries are bounded by what the files can describe: more entries
//! than that means L2 tables shared by several L1 entries (a hostile image), which is refused.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::backing::{resolve_relative, BackingKind};
use crate::error::{Error, IoContext, Result};
use crate::format::{l1_entry_l2_offset, ClusterType, L2Entry, L2Geometry, SubclusterState};
use crate::qcow1::{Qcow1File, Qcow1State};
use crate::qcow_file::QcowFile;
use crate::refcount::RefcountView;
use crate::storage::Storage;

/// QEMU's sector: lengths of block nodes are whole sectors.
const SECTOR: u64 = 512;

/// Fewest entries a map may always hold, whatever the size of the files (the budget of
/// [`entry_limit`] is added to it).
const MIN_ENTRY_LIMIT: usize = 1 << 20;

/// One entry of `qemu-img map --output=json`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapEntry {
    /// Guest offset.
    pub start: u64,
    /// Bytes.
    pub length: u64,
    /// Layer that answered: 0 is the image, 1 its backing file, ...
    pub depth: u32,
    /// That layer allocates the range itself (QEMU's `BDRV_BLOCK_ALLOCATED`).
    pub present: bool,
    /// Reads as zeros.
    pub zero: bool,
    /// Holds data.
    pub data: bool,
    /// Compressed clusters.
    pub compressed: bool,
    /// Host offset of `start` in the file that holds it (see [`ImageMap::filename`]).
    pub offset: Option<u64>,
}

/// The map of an image over its backing chain.
#[derive(Clone, Debug, Default)]
pub struct ImageMap {
    /// The entries, as qemu-img prints them.
    pub entries: Vec<MapEntry>,
    /// `files[d]`: the file that host offsets at depth `d` point into (the image file, its
    /// external data file, or a raw backing file), named as the open resolved it.
    pub files: Vec<PathBuf>,
}

impl ImageMap {
    /// The file an entry's `offset` points into (`None` when it has no offset), as qemu-img
    /// names it in its human output.
    pub fn filename(&self, e: &MapEntry) -> Option<&Path> {
        e.offset?;
        self.files.get(e.depth as usize).map(PathBuf::as_path)
    }
}

/// Maps `image` and its backing chain like `qemu-img map [--start-offset S] [--max-length L]`.
pub fn map_image(image: &QcowFile, start_offset: u64, max_length: Option<u64>) -> Result<ImageMap> {
    map_layers(BackingKind::Qcow2(image), start_offset, max_length)
}

/// [`map_image`] of a chain whose top is a qcow2 or a qcow version 1 image.
pub(crate) fn map_layers(top: BackingKind<'_>, start_offset: u64, max_length: Option<u64>) -> Result<ImageMap> {
    let mut chain = Chain::new(top);
    let end = start_offset.saturating_add(max_length.unwrap_or(u64::MAX)).min(chain.layers[0].len);
    let limit = chain.entry_limit();
    let mut entries = Vec::new();
    let mut curr = MapEntry { start: start_offset, ..MapEntry::default() };
    while curr.start + curr.length < end {
        let off = curr.start + curr.length;
        let next = chain.block_status(off, end - off)?;
        if next.length == 0 {
            return Err(Error::corrupt(format!("no block status at guest offset 0x{off:x}"), 0));
        }
        if mergeable(&curr, &next) {
            curr.length += next.length;
            continue;
        }
        if curr.length > 0 {
            if entries.len() >= limit {
                return Err(Error::corrupt(
                    format!(
                        "more than {limit} map entries from files of this size (at guest offset 0x{off:x}): L2 tables are used by several L1 entries"
                    ),
                    0,
                ));
            }
            entries.push(curr);
        }
        curr = next;
    }
    entries.push(curr);
    Ok(ImageMap { entries, files: chain.layers.iter().map(|l| l.host.path.clone()).collect() })
}

/// qemu-img's `entry_mergeable` (the file is the same exactly when depths are: one file per
/// layer holds its offsets).
fn mergeable(a: &MapEntry, b: &MapEntry) -> bool {
    a.length != 0
        && (a.zero, a.data, a.compressed, a.depth, a.present) == (b.zero, b.data, b.compressed, b.depth, b.present)
        && match (a.offset, b.offset) {
            (None, None) => true,
            (Some(x), Some(y)) => x.checked_add(a.length) == Some(y),
            _ => false,
        }
}

/// A block status (QEMU's `BDRV_BLOCK_*` flags and map), `host` being that of the run's start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Status {
    data: bool,
    zero: bool,
    compressed: bool,
    allocated: bool,
    host: Option<u64>,
}

impl Status {
    /// The same status `delta` bytes further into its run.
    fn at(self, delta: u64) -> Status {
        Status { host: self.host.map(|h| h + delta), ..self }
    }

    /// Whether `next`, found `delta` bytes after the start of a run of `self`, continues it.
    fn continued_by(self, next: Status, delta: u64) -> bool {
        next == self.at(delta)
    }
}

/// A run of one status: `[start, end)`.
#[derive(Clone, Copy, Debug)]
struct Run {
    start: u64,
    end: u64,
    status: Status,
}

impl Run {
    /// The status at `off` (inside the run) and how far it holds, at most `bytes`.
    fn answer(&self, off: u64, bytes: u64) -> (Status, u64) {
        (self.status.at(off - self.start), (self.end - off).min(bytes))
    }
}

/// A host file as QEMU's file-posix driver sees it: data and holes.
struct HostFile<'a> {
    storage: &'a dyn Storage,
    path: PathBuf,
    /// The last extent found: `[start, end)` and whether it is a hole.
    extent: Option<(u64, u64, bool)>,
}

/// What `lseek(SEEK_DATA/SEEK_HOLE)` says about an offset (file-posix `find_allocation`).
pub(crate) enum Allocation {
    /// In data, up to the next hole.
    Data { hole: u64 },
    /// In a hole, up to the next data.
    Hole { data: u64 },
    /// In the hole at the end of the file (or past the end).
    TrailingHole,
    /// Nothing learned: taken as data.
    Unknown,
}

pub(crate) fn find_allocation(file: Option<&File>, start: u64) -> Allocation {
    use nix::errno::Errno;
    use nix::unistd::{lseek, Whence};
    let (Some(f), Ok(s)) = (file, i64::try_from(start)) else { return Allocation::Unknown };
    match lseek(f, s, Whence::SeekData) {
        Err(Errno::ENXIO) => Allocation::TrailingHole,
        Ok(d) if d > s => Allocation::Hole { data: d.unsigned_abs() },
        Ok(d) if d == s => match lseek(f, s, Whence::SeekHole) {
            Err(Errno::ENXIO) => Allocation::TrailingHole,
            Ok(h) if h > s => Allocation::Data { hole: h.unsigned_abs() },
            _ => Allocation::Unknown,
        },
        _ => Allocation::Unknown,
    }
}

/// The extents of a raw file of `len` bytes as `lseek(SEEK_DATA/SEEK_HOLE)` reports them:
/// `(start, end, hole)`, in order, covering `[0, len)`. Without a file (or where the file
/// system cannot tell), everything is data.
pub(crate) fn raw_extents(storage: &dyn Storage, len: u64) -> Vec<(u64, u64, bool)> {
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    let mut off = 0;
    while off < len {
        let (end, hole) = match find_allocation(storage.file(), off) {
            Allocation::Data { hole } => (hole, false),
            Allocation::Hole { data } => (data, true),
            Allocation::TrailingHole => (len, true),
            Allocation::Unknown => (len, false),
        };
        let end = end.clamp(off + 1, len);
        match out.last_mut() {
            Some(last) if last.2 == hole => last.1 = end,
            _ => out.push((off, end, hole)),
        }
        off = end;
    }
    out
}

impl HostFile<'_> {
    /// QEMU's length of the file: whole sectors.
    fn len(&self) -> Result<u64> {
        let len = self.storage.len().ctx(|| format!("reading the length of '{}'", self.path.display()))?;
        Ok(len.div_ceil(SECTOR) * SECTOR)
    }

    /// file-posix block status at `off` (below the file's length): `(zero, bytes)`; data
    /// otherwise. The offset is always valid (it is `off`).
    fn status(&mut self, off: u64, bytes: u64) -> (bool, u64) {
        if let Some((s, e, hole)) = self.extent {
            if s <= off && off < e {
                return (hole, (e - off).min(bytes));
            }
        }
        let (end, hole) = match find_allocation(self.storage.file(), off) {
            Allocation::Data { hole } => (hole, false),
            Allocation::Hole { data } => (data, true),
            Allocation::TrailingHole => (u64::MAX, true),
            Allocation::Unknown => (u64::MAX, false),
        };
        self.extent = Some((off, end, hole));
        (hole, (end - off).min(bytes))
    }
}

/// One image of the chain.
struct Layer<'a> {
    /// The qcow2 image, or `None` for a raw file (then `host` is the layer) or a qcow v1 image.
    qcow: Option<&'a QcowFile>,
    /// The qcow version 1 image, if the layer is one.
    v1: Option<&'a Qcow1File>,
    /// QEMU's length of the layer.
    len: u64,
    /// The length of the layer below it, `None` at the bottom.
    below: Option<u64>,
    /// The file host offsets point into.
    host: HostFile<'a>,
    /// Whether QEMU would see metadata preallocation (asked lazily, as QEMU does).
    prealloc: Option<bool>,
    /// The last run of the L2 tables found.
    run: Option<Run>,
}

/// The image and its backing files, top first.
struct Chain<'a> {
    layers: Vec<Layer<'a>>,
}

impl<'a> Chain<'a> {
    fn new(top: BackingKind<'a>) -> Self {
        let mut layers = Vec::new();
        let mut next = Some(top);
        while let Some(kind) = next.take() {
            let layer = match kind {
                BackingKind::Qcow2(q) => {
                    next = q.backing_file().map(|b| b.kind());
                    let host = match (q.data_file(), q.header().data_file()) {
                        (Some(d), Some(name)) => (&**d.storage(), resolve_relative(q.path(), &name)),
                        _ => (&**q.raw_file().storage(), q.path().to_path_buf()),
                    };
                    let host = HostFile { storage: host.0, path: host.1, extent: None };
                    let len = q.virtual_size() / SECTOR * SECTOR;
                    Layer { qcow: Some(q), v1: None, len, below: None, host, prealloc: None, run: None }
                }
                BackingKind::Qcow1(q) => {
                    next = q.backing_file().map(|b| b.kind());
                    let host = HostFile { storage: &**q.storage(), path: q.path().to_path_buf(), extent: None };
                    Layer {
                        qcow: None,
                        v1: Some(q),
                        len: q.virtual_size(),
                        below: None,
                        host,
                        prealloc: None,
                        run: None,
                    }
                }
                BackingKind::Raw { storage, len, path } => {
                    let host = HostFile { storage, path: path.to_path_buf(), extent: None };
                    let len = len.div_ceil(SECTOR) * SECTOR;
                    Layer { qcow: None, v1: None, len, below: None, host, prealloc: None, run: None }
                }
            };
            if let Some(above) = layers.last_mut() {
                let above: &mut Layer<'_> = above;
                above.below = Some(layer.len);
            }
            layers.push(layer);
        }
        Chain { layers }
    }

    /// How many entries the files of the chain can describe: a qcow2 file at most two per
    /// L2 entry (per subcluster with extended L2), a file's extents one per sector.
    fn entry_limit(&self) -> usize {
        let mut budget = 0u64;
        for l in &self.layers {
            let host_len = l.host.storage.len().unwrap_or(0);
            budget = budget.saturating_add(host_len / SECTOR);
            if let Some(q) = l.v1 {
                budget = budget.saturating_add(q.file_len() / 4);
            }
            if let Some(q) = l.qcow {
                let file_len = q.raw_file().file_len();
                let per_byte = if q.header().extended_l2() { file_len.saturating_mul(4) } else { file_len / 4 };
                budget = budget.saturating_add(per_byte);
            }
        }
        MIN_ENTRY_LIMIT.saturating_add(usize::try_from(budget).unwrap_or(usize::MAX))
    }

    /// qemu-img's `get_block_status`: the entry at `off` (at most `bytes` long).
    fn block_status(&mut self, off: u64, bytes: u64) -> Result<MapEntry> {
        let mut bytes = bytes;
        let mut found = None;
        for (depth, layer) in self.layers.iter_mut().enumerate() {
            let (st, n) = layer.status(off, bytes)?;
            bytes = n;
            found = Some((depth, st));
            if st.data || st.zero {
                break;
            }
        }
        let (depth, st) = found.unwrap_or_default();
        let st = if st.data || st.zero { st } else { Status::default() };
        Ok(MapEntry {
            start: off,
            length: bytes,
            depth: u32::try_from(depth).unwrap_or(u32::MAX),
            present: st.allocated,
            zero: st.zero,
            data: st.data,
            compressed: st.compressed,
            offset: st.host,
        })
    }
}

impl Layer<'_> {
    /// QEMU's `bdrv_block_status` of this layer alone at `off` (below its length).
    fn status(&mut self, off: u64, bytes: u64) -> Result<(Status, u64)> {
        let bytes = bytes.min(self.len.saturating_sub(off));
        if let Some(q) = self.v1 {
            return self.v1_status(q, off, bytes);
        }
        let Some(q) = self.qcow else {
            let (zero, n) = self.host.status(off, bytes);
            return Ok((Status { data: !zero, zero, compressed: false, allocated: true, host: Some(off) }, n));
        };
        let run = match self.run {
            Some(r) if r.start <= off && off < r.end => r,
            _ => {
                let r = qcow2_run(q, off, self.len)?;
                self.run = Some(r);
                r
            }
        };
        let (mut st, mut n) = run.answer(off, bytes);
        if st.data || st.zero {
            st.allocated = true;
        } else if self.below.is_none_or(|below| off >= below) {
            st.zero = true;
        }
        if st.data && !st.zero && st.host.is_some() && self.metadata_preallocated(q) {
            (st.zero, n) = self.host_zero(st.host.unwrap_or(0), n)?;
        }
        Ok((st, n))
    }

    /// `qcow_co_block_status` (plus the block layer's allocated and zero flags): plain
    /// clusters are data with their offset, compressed ones data + compressed without one.
    fn v1_status(&mut self, q: &Qcow1File, off: u64, bytes: u64) -> Result<(Status, u64)> {
        let (state, end) = q.run(off, off + bytes)?;
        let st = match state {
            Qcow1State::Data { host } => Status { data: true, allocated: true, host: Some(host), ..Status::default() },
            Qcow1State::Compressed { .. } => {
                Status { data: true, compressed: true, allocated: true, ..Status::default() }
            }
            Qcow1State::Unallocated => {
                Status { zero: self.below.is_none_or(|below| off >= below), ..Status::default() }
            }
        };
        Ok((st, end - off))
    }

    /// `block/io.c`'s recursion into the file for a preallocated image: whether the data at
    /// `host` reads as zeros in the file, and for how long.
    fn host_zero(&mut self, host: u64, n: u64) -> Result<(bool, u64)> {
        let total = self.host.len()?;
        if host >= total {
            return Ok((true, n));
        }
        let (zero, file_n) = self.host.status(host, n.min(total - host));
        if zero && host + file_n == total {
            return Ok((true, n));
        }
        Ok((zero, file_n))
    }

    fn metadata_preallocated(&mut self, q: &QcowFile) -> bool {
        *self.prealloc.get_or_insert_with(|| detect_metadata_preallocation(q))
    }
}

/// QEMU's `qcow2_detect_metadata_preallocation`: more clusters have a refcount than the file
/// has space allocated (by 10%, or 2 clusters).
pub(crate) fn detect_metadata_preallocation(q: &QcowFile) -> bool {
    use std::os::unix::fs::MetadataExt;
    let raw = q.raw_file();
    let Some(meta) = raw.storage().file().and_then(|f| f.metadata().ok()) else { return false };
    let cs = raw.cluster_size();
    let real_clusters = meta.blocks().saturating_mul(512) / cs;
    let threshold = (real_clusters.saturating_mul(10) / 9).max(real_clusters + 2);
    let end_cluster = meta.len().div_ceil(cs);
    let mut view = RefcountView::load(raw, q.header());
    let mut count = 0u64;
    for c in 0..end_cluster {
        if count >= threshold {
            break;
        }
        match view.get(raw, c) {
            Ok(r) => count += u64::from(r != 0),
            Err(_) => return false,
        }
    }
    count >= threshold
}

/// The driver status of one L2 entry at `in_cluster` and where, in its cluster, it ends.
fn entry_status(geo: L2Geometry, e: L2Entry, in_cluster: u64) -> std::result::Result<(Status, u64), String> {
    let (state, end) = geo.read_state(e, in_cluster).map_err(|d| d.to_string())?;
    let ty = geo.cluster_type(e);
    if ty == ClusterType::Compressed {
        return Ok((Status { data: true, compressed: true, ..Status::default() }, end));
    }
    let host = matches!(ty, ClusterType::Normal | ClusterType::ZeroAlloc).then(|| e.host_offset() + in_cluster);
    let st = match state {
        SubclusterState::Data => Status { data: true, host, ..Status::default() },
        SubclusterState::Zero => Status { zero: true, host, ..Status::default() },
        SubclusterState::Unallocated => Status { host, ..Status::default() },
    };
    Ok((st, end))
}

/// The run of one driver status starting at `off` (below `len`): within one L2 table, or over
/// every following unallocated L1 entry.
fn qcow2_run(q: &QcowFile, off: u64, len: u64) -> Result<Run> {
    let (raw, tables) = (q.raw_file(), q.tables());
    let geo = tables.geometry();
    let (cb, cs, per, span) = (geo.cluster_bits, geo.cluster_size(), geo.entries_per_table(), geo.bytes_per_table());
    let l1 = tables.l1();
    let l1_index = off / span;
    let empty = |i: u64| usize::try_from(i).ok().and_then(|i| l1.get(i)).is_none_or(|&e| l1_entry_l2_offset(e) == 0);
    let Some((l2_offset, table)) = tables.l2_table(raw, l1_index)? else {
        let mut i = l1_index + 1;
        while i < l1.len() as u64 && i.saturating_mul(span) < len && empty(i) {
            i += 1;
        }
        let end = if i >= l1.len() as u64 { len } else { i.saturating_mul(span).min(len) };
        return Ok(Run { start: off, end, status: Status::default() });
    };
    let table_end = (l1_index + 1).saturating_mul(span).min(len);
    let entry_bytes = 8 * geo.words_per_entry() as u64;
    let mut pos = off;
    let mut first: Option<Status> = None;
    while pos < table_end {
        let l2_index = (pos >> cb) % per;
        let in_cluster = pos & (cs - 1);
        if in_cluster == 0 && first == Some(Status::default()) {
            // Inside an unallocated run: skip empty entries without classifying each.
            let w = geo.words_per_entry();
            let from = usize::try_from(l2_index).unwrap_or(usize::MAX).saturating_mul(w);
            let empty = table.get(from..).unwrap_or_default().chunks(w).take_while(|c| c.iter().all(|&x| x == 0));
            let skip = empty.count() as u64;
            if skip > 0 {
                pos += skip << cb;
                continue;
            }
        }
        let e = geo.entry_at(&table, usize::try_from(l2_index).unwrap_or(0));
        let (st, end) = entry_status(geo, e, in_cluster).map_err(|d| {
            Error::corrupt(
                format!("L2 entry {l2_index} (L2 table at 0x{l2_offset:x}) = 0x{:x}: {d}", e.entry),
                l2_offset + l2_index * entry_bytes,
            )
        })?;
        match first {
            None => first = Some(st),
            Some(f) if f.continued_by(st, pos - off) => {}
            Some(_) => break,
        }
        pos += end - in_cluster;
    }
    Ok(Run { start: off, end: pos.min(table_end), status: first.unwrap_or_default() })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::create::{create_on, CreateOptions};
    use crate::storage::MemStorage;

    fn image(size: u64, cluster_size: u64, extended: bool) -> QcowFile {
        let opts =
            CreateOptions { virtual_size: size, cluster_size, extended_l2: extended, ..CreateOptions::default() };
        create_on(Arc::new(MemStorage::default()), &opts).unwrap()
    }

    fn e(start: u64, length: u64, present: bool, zero: bool, data: bool, offset: Option<u64>) -> MapEntry {
        MapEntry { start, length, depth: 0, present, zero, data, compressed: false, offset }
    }

    #[test]
    fn an_empty_disk_is_one_entry_and_empty_ranges_one_of_length_zero() {
        let f = image(1 << 40, 65536, false);
        let m = map_image(&f, 0, None).unwrap();
        assert_eq!(m.entries, vec![e(0, 1 << 40, false, true, false, None)]);
        let m = map_image(&f, 5 << 40, None).unwrap();
        assert_eq!(m.entries, vec![e(5 << 40, 0, false, false, false, None)]);
        let m = map_image(&f, 100, Some(0)).unwrap();
        assert_eq!(m.entries, vec![e(100, 0, false, false, false, None)]);
    }

    #[test]
    fn data_zero_and_holes_merge_as_qemu_img() {
        let mut f = image(8 << 20, 65536, false);
        f.write_at(&[1u8; 3 * 65536], 65536).unwrap();
        f.write_at(&[1u8; 2 * 65536], 6 * 65536).unwrap();
        // Zeroing written clusters sets the zero flag (their host clusters are freed).
        f.write_zeroes(6 * 65536, 2 * 65536).unwrap();
        f.write_at(&[2u8; 65536], 1 << 20).unwrap();
        let m = map_image(&f, 0, None).unwrap();
        let host = m.entries[1].offset.unwrap();
        let host2 = m.entries[5].offset.unwrap();
        assert_eq!(
            m.entries,
            vec![
                e(0, 65536, false, true, false, None),
                e(65536, 3 * 65536, true, false, true, Some(host)),
                e(4 * 65536, 2 * 65536, false, true, false, None),
                e(6 * 65536, 2 * 65536, true, true, false, None),
                e(8 * 65536, (1 << 20) - 8 * 65536, false, true, false, None),
                e(1 << 20, 65536, true, false, true, Some(host2)),
                e((1 << 20) + 65536, (7 << 20) - 65536, false, true, false, None),
            ]
        );
        // A window: offsets follow the start.
        let m = map_image(&f, 65536 + 100, Some(1000)).unwrap();
        assert_eq!(m.entries, vec![e(65536 + 100, 1000, true, false, true, Some(host + 100))]);
    }

    #[test]
    fn unallocated_subclusters_of_an_allocated_cluster_keep_the_offset() {
        let mut f = image(1 << 20, 65536, true);
        f.write_at(&[1u8; 2048], 4096).unwrap();
        let m = map_image(&f, 0, None).unwrap();
        let host = m.entries[1].offset.unwrap() - 4096;
        assert_eq!(
            m.entries,
            vec![
                e(0, 4096, false, true, false, Some(host)),
                e(4096, 2048, true, false, true, Some(host + 4096)),
                e(6144, 65536 - 6144, false, true, false, Some(host + 6144)),
                e(65536, (1 << 20) - 65536, false, true, false, None),
            ]
        );
    }

    #[test]
    fn shared_l2_tables_are_refused_not_mapped_without_bound() {
        // 8 TiB: an L1 of 16384 entries, all pointing at one L2 table of alternating data
        // and zero entries (134 M entries for qemu-img).
        let mut f = image(1 << 43, 65536, false);
        f.write_at(&[1u8; 512], 0).unwrap();
        f.flush().unwrap();
        let (raw, h) = (f.raw_file().clone(), f.header().clone());
        drop(f);
        let l1 = raw.read_u64_table(h.l1_table_offset, u64::from(h.l1_size), "L1").unwrap();
        assert_eq!(l1.len(), 16384);
        let l2_offset = l1[0] & crate::format::L1E_OFFSET_MASK;
        let data = crate::format::L2E_OFFSET_MASK & (1 << 20);
        let table: Vec<u64> = (0..8192).map(|i| if i % 2 == 0 { data } else { crate::format::L2E_ZERO }).collect();
        raw.write_u64_table(l2_offset, &table, "L2").unwrap();
        raw.write_u64_table(h.l1_table_offset, &vec![l2_offset; l1.len()], "L1").unwrap();
        let f =
            QcowFile::open_storage(Arc::clone(raw.storage()), Path::new("mem"), crate::OpenOptions::default()).unwrap();
        let err = map_image(&f, 0, None).unwrap_err();
        assert!(err.to_string().contains("map entries"), "{err}");
        // A window of it maps.
        let m = map_image(&f, 0, Some(4 * 65536)).unwrap();
        assert_eq!(m.entries.len(), 4);
        assert_eq!(m.entries[2], e(2 * 65536, 65536, true, false, true, Some(1 << 20)));
    }
}
