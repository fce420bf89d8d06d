//! QEMU's block status, exactly as `qemu-img compare` sees it: `bdrv_block_status_above(bs,
//! NULL, offset, bytes)` over an image's whole chain, flags *and* the length of the answer.
//!
//! `qemu-img map` merges what it is told, so `ops/map.rs` may answer in longer runs; compare
//! does not merge, and in strict mode it compares the flags of both images at every offset it
//! asks, `BDRV_BLOCK_EOF` included ("this answer reaches the end of the image"). So the
//! lengths must be QEMU's (checked against qemu-img 10):
//!
//! * qcow2 (`qcow2_co_block_status`, `qcow2_get_host_offset`, `count_contiguous_subclusters`):
//!   at most `INT_MAX` bytes per answer; never past the end of the L2 slice (the whole table,
//!   or 4 KiB of it when QEMU's 32 MiB L2 cache cannot hold the tables of the whole disk); an
//!   empty L1 entry, or one past the L1 table, answers "unallocated" up to the end of the
//!   slice; otherwise subclusters of the same type (normal, zero with or without a host
//!   cluster, unallocated with or without one) whose host clusters follow each other; a
//!   compressed cluster is always answered alone. A bad entry is refused where an answer
//!   starts; after that only unreadable subcluster bitmaps are (a misaligned one ends it).
//!   Flags: data, zero, offset-valid (a host cluster), compressed. The block layer adds
//!   allocated (data or zero), and zero where nothing is allocated and there is no backing
//!   file or the offset is past its end; for an image that looks metadata-preallocated it asks
//!   the host file about data clusters (a hole there is zero, and ends the answer).
//! * raw, and the host file (file-posix): `lseek(SEEK_DATA/SEEK_HOLE)` extents; a trailing
//!   hole (or a file system that cannot tell) answers all that was asked. Always allocated and
//!   offset-valid.
//! * the chain: the image first; where it allocates nothing the backing file is asked for the
//!   same run, and so on; a backing file shorter than the offset answers zero + allocated. The
//!   EOF flag of a backing file is dropped unless the answer reaches the end of the top image
//!   (but that of an unallocated bottom layer is kept, as QEMU keeps it).
//!
//! Each node caches its last run, so asking again inside it (compare asks every 2 MiB while it
//! reads) costs nothing, and the work is proportional to the runs, not to the clusters.

use crate::backing::{resolve_relative, BackingKind, BackingRead};
use crate::error::{Error, IoContext, Result};
use crate::format::{l1_entry_l2_offset, ClusterType, L2Defect, L2Entry, L2Geometry, SubclusterState};
use crate::ops::map::{detect_metadata_preallocation, find_allocation, Allocation};
use crate::qcow1::{Qcow1File, Qcow1State};
use crate::qcow_file::QcowFile;
use crate::storage::Storage;

/// QEMU's sector: node lengths are whole sectors.
const SECTOR: u64 = 512;
/// `qcow2_co_block_status` asks `qcow2_get_host_offset` for at most `INT_MAX` bytes.
pub(crate) const QCOW2_MAX_BYTES: u64 = 0x7fff_ffff;
/// QEMU's default largest L2 cache (`DEFAULT_L2_CACHE_MAX_SIZE`).
const L2_CACHE_MAX: u64 = 32 << 20;

/// `BDRV_BLOCK_*` flags (QEMU's values).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Flags(u8);

impl Flags {
    pub(crate) const DATA: Flags = Flags(0x01);
    pub(crate) const ZERO: Flags = Flags(0x02);
    pub(crate) const OFFSET_VALID: Flags = Flags(0x04);
    pub(crate) const ALLOCATED: Flags = Flags(0x10);
    pub(crate) const EOF: Flags = Flags(0x20);
    pub(crate) const COMPRESSED: Flags = Flags(0x80);

    pub(crate) fn has(self, f: Flags) -> bool {
        self.0 & f.0 == f.0
    }
    pub(crate) fn with(self, f: Flags) -> Flags {
        Flags(self.0 | f.0)
    }
    fn without(self, f: Flags) -> Flags {
        Flags(self.0 & !f.0)
    }
    fn when(self, cond: bool, f: Flags) -> Flags {
        if cond {
            self.with(f)
        } else {
            self
        }
    }
}

/// A file as QEMU's file-posix driver sees it (a raw image, a raw backing file, or the file
/// that holds a qcow2 image's clusters).
pub(crate) struct FileNode<'a> {
    storage: &'a dyn Storage,
    /// QEMU's length: the file's, in whole sectors.
    len: u64,
    /// The last extent found: `[start, end)` and whether it is a hole (`end` is `u64::MAX`
    /// where QEMU answers "all that was asked").
    extent: Option<(u64, u64, bool)>,
}

impl<'a> FileNode<'a> {
    pub(crate) fn new(storage: &'a dyn Storage, file_len: u64) -> Self {
        FileNode { storage, len: file_len.div_ceil(SECTOR) * SECTOR, extent: None }
    }

    /// `bdrv_co_block_status` of the node: (flags, bytes).
    fn status(&mut self, off: u64, bytes: u64) -> (Flags, u64) {
        if off >= self.len {
            return (Flags::EOF, 0);
        }
        let bytes = bytes.min(self.len - off);
        let (end, hole) = match self.extent {
            Some((s, e, hole)) if s <= off && off < e => (e, hole),
            _ => {
                let (end, hole) = match find_allocation(self.storage.file(), off) {
                    Allocation::Data { hole } => (hole, false),
                    Allocation::Hole { data } => (data, true),
                    Allocation::TrailingHole => (u64::MAX, true),
                    Allocation::Unknown => (u64::MAX, false),
                };
                self.extent = Some((off, end, hole));
                (end, hole)
            }
        };
        let n = (end - off).min(bytes);
        let kind = if hole { Flags::ZERO } else { Flags::DATA };
        let flags = kind.with(Flags::OFFSET_VALID).with(Flags::ALLOCATED).when(off + n == self.len, Flags::EOF);
        (flags, n)
    }
}

/// QEMU's subcluster type, as far as block status tells them apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SubType {
    state: SubclusterState,
    /// A host cluster backs it (normal, zero-alloc, unallocated-alloc): offset-valid, and
    /// runs need contiguous host clusters.
    hosted: bool,
    compressed: bool,
}

/// A run of one subcluster type: `[start, end)`; `end` is where it stops if `definite`, else
/// only how far it was looked at.
#[derive(Clone, Copy, Debug)]
struct Run {
    start: u64,
    end: u64,
    definite: bool,
    ty: SubType,
    /// Host offset of `start` (hosted types).
    host: u64,
}

/// One qcow2 image of a chain.
pub(crate) struct QcowNode<'a> {
    q: &'a QcowFile,
    /// QEMU's length: whole sectors of the virtual size.
    len: u64,
    /// The length of the backing file, if there is one.
    backing_len: Option<u64>,
    /// The file data clusters live in (asked about holes when metadata is preallocated).
    host: FileNode<'a>,
    prealloc: Option<bool>,
    run: Option<Run>,
    /// The last stretch of empty L1 entries found: `[start, end)`.
    empty: Option<(u64, u64)>,
}

impl QcowNode<'_> {
    /// `bdrv_co_block_status` of the node. `bulk`: a stretch of empty L1 entries is answered
    /// in one piece (not one L2 slice at a time, nor `INT_MAX` bytes): the same flags, a
    /// longer answer, for callers that only need to know what reads as zeros.
    fn status(&mut self, off: u64, bytes: u64, bulk: bool) -> Result<(Flags, u64)> {
        if off >= self.len {
            return Ok((Flags::EOF, 0));
        }
        let bytes = bytes.min(self.len - off);
        if bulk {
            if let Some(end) = self.empty_l1_end(off) {
                let n = end.min(off + bytes) - off;
                let zero = self.backing_len.is_none_or(|b| off >= b);
                let flags = Flags::default().when(zero, Flags::ZERO).when(off + n == self.len, Flags::EOF);
                return Ok((flags, n));
            }
        }
        let limit = off + bytes.min(QCOW2_MAX_BYTES);
        let run = match self.run {
            Some(r) if r.start <= off && off < r.end && (r.definite || limit <= r.end) => r,
            _ => {
                let r = qcow2_run(self.q, off, limit, self.len)?;
                self.run = Some(r);
                r
            }
        };
        let mut n = run.end.min(limit) - off;
        let ty = run.ty;
        let data = ty.compressed || ty.state == SubclusterState::Data;
        let mut flags = Flags::default()
            .when(data, Flags::DATA)
            .when(ty.state == SubclusterState::Zero, Flags::ZERO)
            .when(ty.hosted, Flags::OFFSET_VALID)
            .when(ty.compressed, Flags::COMPRESSED);
        if data || ty.state == SubclusterState::Zero {
            flags = flags.with(Flags::ALLOCATED);
        } else if self.backing_len.is_none_or(|b| off >= b) {
            flags = flags.with(Flags::ZERO);
        }
        // BDRV_BLOCK_RECURSE: the host file is asked whether the data clusters of a
        // metadata-preallocated image are holes (read as zeros). The flag itself is cleared
        // once used (QEMU 9 and later), so it never shows.
        if data && ty.hosted && self.metadata_preallocated() {
            let (file_flags, file_n) = self.host.status(run.host + (off - run.start), n);
            if file_flags.has(Flags::EOF) && (file_n == 0 || file_flags.has(Flags::ZERO)) {
                flags = flags.with(Flags::ZERO);
            } else {
                n = file_n;
                flags = flags.when(file_flags.has(Flags::ZERO), Flags::ZERO);
            }
        }
        Ok((flags.when(off + n == self.len, Flags::EOF), n))
    }

    /// Where the stretch of empty L1 entries (or of guest offsets past the L1 table) that
    /// holds `off` ends (at most the node's length); `None` if `off`'s L1 entry names an L2
    /// table.
    fn empty_l1_end(&mut self, off: u64) -> Option<u64> {
        if let Some((s, e)) = self.empty {
            if s <= off && off < e {
                return Some(e);
            }
        }
        let tables = self.q.tables();
        let (l1, span) = (tables.l1(), tables.geometry().bytes_per_table());
        let empty =
            |i: u64| usize::try_from(i).ok().and_then(|i| l1.get(i)).is_none_or(|&e| l1_entry_l2_offset(e) == 0);
        let first = off / span;
        if !empty(first) {
            return None;
        }
        let mut i = first + 1;
        while i < l1.len() as u64 && i.saturating_mul(span) < self.len && empty(i) {
            i += 1;
        }
        let end = if i >= l1.len() as u64 { self.len } else { i.saturating_mul(span).min(self.len) };
        self.empty = Some((first * span, end));
        Some(end)
    }

    fn metadata_preallocated(&mut self) -> bool {
        let q = self.q;
        *self.prealloc.get_or_insert_with(|| detect_metadata_preallocation(q))
    }
}

/// The guest bytes one L2 slice maps: a whole L2 table, unless QEMU's default L2 cache
/// (32 MiB, `read_cache_sizes`) cannot hold the tables of the whole disk; then the cache
/// entries, hence the slices, are 4 KiB (or the cluster, if smaller).
fn slice_bytes(geo: L2Geometry, len: u64) -> u64 {
    let cs = geo.cluster_size();
    let entry_bytes = 8 * geo.words_per_entry() as u64;
    let max_cache = len.div_ceil(cs).saturating_mul(entry_bytes).div_ceil(cs).saturating_mul(cs);
    let cache_entry = if max_cache > L2_CACHE_MAX { cs.min(4096) } else { cs };
    cache_entry / entry_bytes * cs
}

/// `qcow2_get_host_offset` from `off`, looking no further than `limit` (the bytes asked for)
/// nor past the L2 slice.
fn qcow2_run(q: &QcowFile, off: u64, limit: u64, len: u64) -> Result<Run> {
    let (raw, tables) = (q.raw_file(), q.tables());
    let geo = tables.geometry();
    let (cb, cs, per, span) = (geo.cluster_bits, geo.cluster_size(), geo.entries_per_table(), geo.bytes_per_table());
    let l1_index = off / span;
    let slice = slice_bytes(geo, len);
    let slice_end = (off / slice + 1).saturating_mul(slice);
    let unallocated = SubType { state: SubclusterState::Unallocated, hosted: false, compressed: false };
    let Some((l2_offset, table)) = tables.l2_table(raw, l1_index)? else {
        return Ok(Run { start: off, end: slice_end, definite: true, ty: unallocated, host: 0 });
    };
    let bound = limit.min(slice_end);
    let mut pos = off;
    let mut first: Option<(SubType, Option<u64>)> = None;
    let mut definite = false;
    while pos < bound {
        let l2_index = (pos >> cb) % per;
        let cluster = pos & !(cs - 1);
        let e = geo.entry_at(&table, usize::try_from(l2_index).unwrap_or(0));
        let (ty, host, end) = match classify(geo, e, pos - cluster) {
            Ok(c) => c,
            // QEMU refuses any bad entry where it starts, only bitmaps it cannot read after.
            Err(d)
                if first.is_none() || matches!(d, L2Defect::AllocatedAndZero | L2Defect::UnallocatedWithAllocBits) =>
            {
                let at = l2_offset + l2_index * 8 * geo.words_per_entry() as u64;
                let what = format!("L2 entry {l2_index} (L2 table at 0x{l2_offset:x}) = 0x{:x}: {d}", e.entry);
                return Err(Error::corrupt(what, at));
            }
            // A misaligned host offset cannot continue a run.
            Err(_) => {
                definite = true;
                break;
            }
        };
        if let Some((t, start_host)) = first {
            // Host clusters must follow each other (`count_contiguous_subclusters`).
            let contiguous = start_host.zip(host).is_none_or(|(h, s)| s == h + (pos - off));
            if t != ty || !contiguous {
                definite = true;
                break;
            }
        } else {
            first = Some((ty, host));
        }
        pos = cluster + end;
        // A compressed cluster is answered alone; a type change inside a cluster ends the run.
        if ty.compressed || end < cs {
            definite = true;
            break;
        }
    }
    let (ty, host) = first.unwrap_or((unallocated, None));
    Ok(Run { start: off, end: pos, definite: definite || pos >= slice_end, ty, host: host.unwrap_or(0) })
}

/// QEMU's subcluster type at `in_cluster` (`qcow2_get_subcluster_type`), the host offset of
/// that byte (types with a host cluster) and where the same type ends in the cluster.
fn classify(geo: L2Geometry, e: L2Entry, in_cluster: u64) -> Result<(SubType, Option<u64>, u64), L2Defect> {
    let ty = geo.cluster_type(e);
    if ty == ClusterType::Compressed {
        let ty = SubType { state: SubclusterState::Data, hosted: false, compressed: true };
        return Ok((ty, None, geo.cluster_size()));
    }
    let (state, end) = geo.read_state(e, in_cluster)?;
    let hosted = matches!(ty, ClusterType::Normal | ClusterType::ZeroAlloc);
    Ok((SubType { state, hosted, compressed: false }, hosted.then(|| e.host_offset() + in_cluster), end))
}

/// Refuses an image whose active L1 table names one L2 table more than once: a damaged image
/// (`qemu-img check` counts the references) whose few clusters would describe more guest data
/// than the file holds, to be read again and again.
fn refuse_shared_l2_tables(q: &QcowFile) -> Result<()> {
    let tables = q.tables();
    let mut named: Vec<(u64, usize)> =
        tables.l1().iter().enumerate().map(|(i, &e)| (l1_entry_l2_offset(e), i)).filter(|&(o, _)| o != 0).collect();
    named.sort_unstable();
    for w in named.windows(2) {
        if w[0].0 == w[1].0 {
            let (offset, first, second) = (w[0].0, w[0].1, w[1].1);
            return Err(Error::corrupt(
                format!("the L2 table at 0x{offset:x} is named by L1[{first}] and L1[{second}]"),
                tables.l1_offset() + 8 * second as u64,
            ));
        }
    }
    Ok(())
}

/// A node of a chain.
pub(crate) enum Node<'a> {
    Qcow2(QcowNode<'a>),
    Qcow1(Qcow1Node<'a>),
    Raw(FileNode<'a>),
}

/// A qcow version 1 image as `qcow_co_block_status` answers: one cluster at a time (the
/// run found is cached); plain clusters data + offset, compressed ones data + compressed.
pub(crate) struct Qcow1Node<'a> {
    q: &'a Qcow1File,
    len: u64,
    backing_len: Option<u64>,
    /// The last run found: its state, `[start, end)`.
    run: Option<(Qcow1State, u64, u64)>,
}

impl Qcow1Node<'_> {
    /// `bulk`: an unallocated run is answered whole, not a cluster at a time.
    fn status(&mut self, off: u64, bytes: u64, bulk: bool) -> Result<(Flags, u64)> {
        if off >= self.len {
            return Ok((Flags::EOF, 0));
        }
        let (state, _, end) = match self.run {
            Some(r) if r.1 <= off && off < r.2 => r,
            _ => {
                let (st, end) = self.q.run(off, self.len)?;
                let r = (st, off, end);
                self.run = Some(r);
                r
            }
        };
        let cs = self.q.header().cluster_size();
        let cluster_end = (off / cs + 1) * cs;
        let unallocated = state == Qcow1State::Unallocated;
        let limit = if bulk && unallocated { end } else { end.min(cluster_end) };
        let n = limit.min(off.saturating_add(bytes)).min(self.len) - off;
        let flags = match state {
            Qcow1State::Data { .. } => Flags::DATA.with(Flags::OFFSET_VALID).with(Flags::ALLOCATED),
            Qcow1State::Compressed { .. } => Flags::DATA.with(Flags::COMPRESSED).with(Flags::ALLOCATED),
            Qcow1State::Unallocated => Flags::default().when(self.backing_len.is_none_or(|b| off >= b), Flags::ZERO),
        };
        Ok((flags.when(off + n == self.len, Flags::EOF), n))
    }
}

impl Node<'_> {
    fn status(&mut self, off: u64, bytes: u64, bulk: bool) -> Result<(Flags, u64)> {
        match self {
            Node::Qcow2(n) => n.status(off, bytes, bulk),
            Node::Qcow1(n) => n.status(off, bytes, bulk),
            Node::Raw(n) => Ok(n.status(off, bytes)),
        }
    }

    fn len(&self) -> u64 {
        match self {
            Node::Qcow2(n) => n.len,
            Node::Qcow1(n) => n.len,
            Node::Raw(n) => n.len,
        }
    }
}

/// An image and its backing files, top first, asked as `bdrv_block_status_above(bs, NULL)`.
pub(crate) struct Chain<'a> {
    nodes: Vec<Node<'a>>,
}

impl<'a> Chain<'a> {
    /// The chain of `image` (qcow2 with its backing files, or raw).
    pub(crate) fn new(image: &'a dyn BackingRead) -> Result<Self> {
        let mut nodes: Vec<Node<'a>> = Vec::new();
        let mut next = Some(image.kind());
        while let Some(kind) = next.take() {
            let node = match kind {
                BackingKind::Qcow2(q) => {
                    next = q.backing_file().map(|b| b.kind());
                    let (storage, path) = match (q.data_file(), q.header().data_file()) {
                        (Some(d), Some(name)) => (&**d.storage(), resolve_relative(q.path(), &name)),
                        _ => (&**q.raw_file().storage(), q.path().to_path_buf()),
                    };
                    let file_len = storage.len().ctx(|| format!("reading the length of '{}'", path.display()))?;
                    let host = FileNode::new(storage, file_len);
                    refuse_shared_l2_tables(q)?;
                    let len = q.virtual_size() / SECTOR * SECTOR;
                    Node::Qcow2(QcowNode { q, len, backing_len: None, host, prealloc: None, run: None, empty: None })
                }
                BackingKind::Qcow1(q) => {
                    next = q.backing_file().map(|b| b.kind());
                    Node::Qcow1(Qcow1Node { q, len: q.virtual_size(), backing_len: None, run: None })
                }
                BackingKind::Raw { storage, len, .. } => Node::Raw(FileNode::new(storage, len)),
            };
            match nodes.last_mut() {
                Some(Node::Qcow2(above)) => above.backing_len = Some(node.len()),
                Some(Node::Qcow1(above)) => above.backing_len = Some(node.len()),
                _ => {}
            }
            nodes.push(node);
        }
        Ok(Chain { nodes })
    }

    /// For an image without backing file whose L1 entry at `off` is empty: where that
    /// stretch of empty L1 entries ends and the bytes of one L2 slice (QEMU answers one slice
    /// at a time there, at most `INT_MAX` bytes, all with the same flags).
    pub(crate) fn empty_stretch(&mut self, off: u64) -> Option<(u64, u64)> {
        match self.nodes.as_mut_slice() {
            [Node::Qcow2(n)] => {
                let end = n.empty_l1_end(off)?;
                Some((end, slice_bytes(n.q.tables().geometry(), n.len)))
            }
            _ => None,
        }
    }

    /// QEMU's length of the image (`blk_getlength`).
    pub(crate) fn len(&self) -> u64 {
        self.nodes.first().map_or(0, Node::len)
    }

    /// `bdrv_block_status_above(bs, NULL, off, bytes)`: the flags at `off` and how many bytes
    /// (at most `bytes`) they hold for. `bulk`: stretches of empty L1 entries are answered in
    /// one piece (the flags are QEMU's, the lengths may be longer).
    pub(crate) fn status(&mut self, off: u64, bytes: u64, bulk: bool) -> Result<(Flags, u64)> {
        let Some((top, below)) = self.nodes.split_first_mut() else { return Ok((Flags::EOF, 0)) };
        let (mut flags, mut n) = top.status(off, bytes, bulk)?;
        if n == 0 || flags.has(Flags::ALLOCATED) {
            return Ok((flags, n));
        }
        let eof = flags.has(Flags::EOF).then_some(off + n);
        let mut bytes = n;
        for node in below {
            (flags, n) = node.status(off, bytes, bulk)?;
            if n == 0 {
                // A shorter backing file: its zeros past the end count as allocated there.
                (flags, n) = (Flags::ZERO.with(Flags::ALLOCATED), bytes);
                break;
            }
            if flags.has(Flags::ALLOCATED) {
                flags = flags.without(Flags::EOF);
                break;
            }
            bytes = n;
        }
        Ok((flags.when(eof == Some(off + n), Flags::EOF), n))
    }
}
