//! `qemu-img convert`: the guest content of one or more images (qcow2 with their chains, or
//! raw; concatenated) copied into a raw or qcow2 target, driven by block status.
//!
//! The plan comes first and reads no guest data: every source is mapped (`qemu-img map`'s
//! block status over the whole chain, `SEEK_DATA`/`SEEK_HOLE` for raw files) into pieces that
//! are [`Kind::Zero`] (never read: holes, unallocated and zero clusters of the whole chain),
//! [`Kind::Same`] (below the target's backing file in the source's own chain: left to the
//! backing file), [`Kind::Data`] and [`Kind::Cmp`] (data that may equal what the target's
//! backing file holds there: compared, only the differing clusters written). Work is
//! proportional to the data, never to the virtual size.
//!
//! The copy then runs on every core: workers take aligned units (1 MiB, or one cluster of the
//! target when larger) with data, read them (parallel reads through the sources' `&self`
//! reads), find zero blocks (`-S`), compare with the backing file and compress (`-c`); the
//! calling thread applies the results in guest order, so that the target is a valid image at
//! every point and at most a few units are in memory.
//!
//! Safety before anything is written: the target takes QEMU's write lock (a new qcow2 target
//! is built beside it and renamed over it by `create`), and a target that is one of the files
//! the sources read (an image of a chain, a data file, the new backing file) is refused.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::backing::{file_id, open_image_any, resolve_relative, BackingKind, BackingRead, FileId};
use crate::create::CreateOptions;
use crate::error::{Error, IoContext, Result};
use crate::ops::map::{map_layers, raw_extents};
use crate::ops::pipeline;
use crate::qcow_file::{OpenOptions, QcowFile};
use crate::storage::{FileStorage, Storage};

/// QEMU's sector: raw images are whole sectors long.
const SECTOR: u64 = 512;
/// Bytes per work unit (at least one target cluster).
const UNIT: u64 = 1 << 20;
/// Largest single zero-filling write (`-S 0`).
const FILL_CHUNK: u64 = 4 << 20;

/// Target format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OutputFormat {
    /// A raw file.
    Raw,
    /// A qcow2 image.
    #[default]
    Qcow2,
}

/// Options of [`convert`], with `qemu-img convert`'s defaults.
#[derive(Clone, Debug)]
pub struct ConvertOptions {
    /// `-O`.
    pub output_format: OutputFormat,
    /// `-f`: the sources' format (`None`: probed).
    pub source_format: Option<String>,
    /// Creation options of a qcow2 target (`-o`); its `backing_file`/`backing_format` are
    /// `-B`/`-F` (the target keeps that backing file and only what differs from it is
    /// written). `virtual_size` is ignored: the target is as large as the sources.
    pub create: CreateOptions,
    /// `-c`: compressed clusters (qcow2 target; the type is `create.compression_type`).
    pub compress: bool,
    /// `-S`: zero runs of at least this many bytes stay unallocated (holes in a raw target);
    /// 0 writes everything (a fully allocated target).
    pub sparse_size: u64,
    /// `-n`: write into the existing target instead of creating it.
    pub existing_target: bool,
    /// `--target-is-zero` (with `-n`): zeros need not be written.
    pub target_is_zero: bool,
    /// Worker threads; 0 = one per core.
    pub threads: usize,
    /// `-U`: read sources another process holds open.
    pub force_share: bool,
    /// `-t unsafe`: the target is never synced (QEMU's default for `convert`: faster, but a
    /// power cut before the kernel writes it back can leave anything). Default: the target's
    /// metadata writes are ordered and everything is durable when `convert` returns.
    pub unsafe_cache: bool,
    /// Only `len` bytes of the (single) source from `offset` on, which become the target's
    /// bytes from 0 (`qemu-img dd`'s `skip` and `count`).
    pub window: Option<(u64, u64)>,
    /// `-l`: read this internal snapshot (id, else name) of each (qcow2) source.
    pub snapshot: Option<String>,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            output_format: OutputFormat::Qcow2,
            source_format: None,
            create: CreateOptions::default(),
            compress: false,
            sparse_size: 4096,
            existing_target: false,
            target_is_zero: false,
            threads: 0,
            force_share: false,
            unsafe_cache: false,
            window: None,
            snapshot: None,
        }
    }
}

/// Progress callback: `(bytes done, bytes to do)`; an error stops the convert (the target is
/// left a valid image with what was written so far) and is returned.
pub type Progress<'a> = &'a (dyn Fn(u64, u64) -> Result<()> + Sync);

/// What a guest range of the sources needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Reads as zeros: not read.
    Zero,
    /// The target's backing file supplies it unchanged: not written.
    Same,
    /// Data: read and written.
    Data,
    /// Data or zeros (`src_data`) over a target backing file that may hold data there: both
    /// are read and only what differs is written.
    Cmp { src_data: bool },
}

/// A guest range of the concatenated sources.
#[derive(Clone, Copy, Debug)]
struct Piece {
    start: u64,
    end: u64,
    kind: Kind,
}

/// One source and where it starts in the concatenation: its bytes from `skip` on, `size` of
/// them.
struct Source {
    image: Box<dyn BackingRead>,
    base: u64,
    size: u64,
    skip: u64,
}

/// The work list, in guest order.
#[derive(Clone, Copy, Debug)]
enum Item {
    /// `[start, end)` holds data: read, examined and written by a worker.
    Unit { start: u64, end: u64 },
    /// Zeros to make explicit in the target (`-n`): write-zeroes / punch.
    Zero { start: u64, end: u64 },
    /// Zeros to write as data (`-S 0`: fully allocated).
    Fill { start: u64, end: u64 },
}

/// What a worker found a unit to need. `Data` and `Compressed` name their bytes by their
/// range in the unit's buffer (no copies).
#[derive(Debug)]
enum Op {
    Data { off: u64, at: usize, len: usize },
    Zero { off: u64, len: u64 },
    Fill { off: u64, len: u64 },
    Compressed { off: u64, at: usize, len: usize, packed: Option<Vec<u8>> },
}

/// A unit examined: its guest data and what to do with it.
struct Done {
    buf: Vec<u8>,
    ops: Vec<Op>,
}

/// Whether `b` is all zeros (eight bytes at a time).
fn is_zero(b: &[u8]) -> bool {
    let mut chunks = b.chunks_exact(64);
    for c in &mut chunks {
        let mut acc = 0u64;
        for w in c.chunks_exact(8) {
            acc |= u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
        }
        if acc != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&x| x == 0)
}

/// The identities of every file an image reads (image files, data files), layer by layer
/// from the top.
pub(crate) fn layer_ids(image: &dyn BackingRead) -> Vec<Vec<FileId>> {
    match image.kind() {
        BackingKind::Qcow2(f) => {
            let mut ids: Vec<FileId> = file_id(&**f.raw_file().storage()).into_iter().collect();
            ids.extend(f.data_file().and_then(|d| file_id(&**d.storage())));
            let mut out = vec![ids];
            if let Some(b) = f.backing_file() {
                out.extend(layer_ids(b));
            }
            out
        }
        BackingKind::Qcow1(f) => {
            let mut out = vec![file_id(&**f.storage()).into_iter().collect()];
            if let Some(b) = f.backing_file() {
                out.extend(layer_ids(b));
            }
            out
        }
        BackingKind::Raw { storage, .. } => vec![file_id(storage).into_iter().collect()],
    }
}

/// The guest size QEMU gives an image: a qcow2 virtual size, a raw file's whole sectors.
fn guest_size(image: &dyn BackingRead) -> u64 {
    match image.kind() {
        BackingKind::Qcow2(f) => f.virtual_size(),
        BackingKind::Qcow1(f) => f.virtual_size(),
        BackingKind::Raw { len, .. } => len.div_ceil(SECTOR) * SECTOR,
    }
}

/// A run of an image's guest content (the whole chain flattened).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Run {
    pub(crate) start: u64,
    pub(crate) end: u64,
    /// Holds data (else reads as zeros).
    pub(crate) data: bool,
    /// The layer that answered (0: the image itself).
    depth: u32,
}

/// The runs of an image, as `qemu-img map` finds them (`SEEK_DATA`/`SEEK_HOLE` for raw).
pub(crate) fn status(image: &dyn BackingRead) -> Result<Vec<Run>> {
    let map = match image.kind() {
        k @ (BackingKind::Qcow2(_) | BackingKind::Qcow1(_)) => map_layers(k, 0, None)?,
        BackingKind::Raw { storage, len, .. } => {
            return Ok(raw_extents(storage, len)
                .into_iter()
                .map(|(start, end, hole)| Run { start, end, data: !hole, depth: 0 })
                .collect())
        }
    };
    Ok(map
        .entries
        .iter()
        .map(|e| Run { start: e.start, end: e.start + e.length, data: e.data, depth: e.depth })
        .collect())
}

/// The pieces of one source (guest offsets of the source): `base_depth` is the layer of its
/// chain that is the target's backing file, if it is one.
fn source_pieces(image: &dyn BackingRead, base_depth: Option<usize>) -> Result<Vec<Piece>> {
    let mut out: Vec<Piece> = Vec::new();
    for r in status(image)? {
        let kind = match base_depth {
            Some(b) if r.depth as usize >= b => Kind::Same,
            Some(_) => Kind::Cmp { src_data: r.data },
            None if r.data => Kind::Data,
            None => Kind::Zero,
        };
        push_piece(&mut out, Piece { start: r.start, end: r.end, kind });
    }
    Ok(out)
}

fn push_piece(out: &mut Vec<Piece>, p: Piece) {
    if p.start >= p.end {
        return;
    }
    match out.last_mut() {
        Some(last) if last.kind == p.kind && last.end == p.start => last.end = p.end,
        _ => out.push(p),
    }
}

/// A target backing file that is not in the source's chain: wherever it holds data, what the
/// source has there must be compared with it (and zeros written where the source reads zeros).
fn overlay_base(pieces: &[Piece], base: &[(u64, u64, bool)]) -> Vec<Piece> {
    let mut out = Vec::new();
    let mut j = 0;
    for p in pieces {
        let mut off = p.start;
        while off < p.end {
            while j < base.len() && base[j].1 <= off {
                j += 1;
            }
            let (b_end, b_data) = match base.get(j) {
                Some(&(s, e, d)) if s <= off => (e, d),
                Some(&(s, _, _)) => (s, false),
                None => (u64::MAX, false),
            };
            let end = p.end.min(b_end);
            let kind = match (p.kind, b_data) {
                (Kind::Data, true) => Kind::Cmp { src_data: true },
                (Kind::Zero, true) => Kind::Cmp { src_data: false },
                (k, _) => k,
            };
            push_piece(&mut out, Piece { start: off, end, kind });
            off = end;
        }
    }
    out
}

/// The target's backing file, opened to compare against, and its layer in each source's chain.
struct Base {
    image: Box<dyn BackingRead>,
    ids: Vec<FileId>,
}

fn open_base(target: &Path, opts: &ConvertOptions) -> Result<Option<Base>> {
    let Some(name) = &opts.create.backing_file else { return Ok(None) };
    let p = resolve_relative(target, name);
    let image = open_image_any(&p, opts.create.backing_format.as_deref(), opts.force_share)
        .map_err(|e| Error::InvalidArgument(format!("Could not open backing image '{name}': {e}")))?;
    let ids = layer_ids(&*image).concat();
    Ok(Some(Base { image, ids }))
}

/// The whole plan: every source's pieces, shifted to their place in the concatenation.
fn plan(sources: &[Source], base: Option<&Base>) -> Result<Vec<Piece>> {
    let base_status: Option<Vec<(u64, u64, bool)>> = match base {
        Some(b) => Some(status(&*b.image)?.into_iter().map(|r| (r.start, r.end, r.data)).collect()),
        None => None,
    };
    let mut all = Vec::new();
    for s in sources {
        let layers = layer_ids(&*s.image);
        // The target's backing file as a layer of this source's chain (its top file).
        let depth =
            base.and_then(|b| layers.iter().position(|ids| ids.first().is_some_and(|id| b.ids.first() == Some(id))));
        let mut pieces = source_pieces(&*s.image, depth)?;
        if let (None, Some(bs)) = (depth, &base_status) {
            pieces = overlay_base(&pieces, bs);
        }
        for p in pieces {
            let (start, end) = (p.start.max(s.skip), p.end.min(s.skip + s.size));
            if start < end {
                let (start, end) = (start - s.skip, end - s.skip);
                push_piece(&mut all, Piece { start: s.base + start, end: s.base + end, kind: p.kind });
            }
        }
        let covered = all.last().map_or(s.base, |p| p.end);
        if covered < s.base + s.size {
            push_piece(&mut all, Piece { start: covered, end: s.base + s.size, kind: Kind::Zero });
        }
    }
    Ok(all)
}

/// Does the target need zeros written where the sources read zeros?
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ZeroMode {
    /// A new (or known-zero) target reads zeros already.
    Skip,
    /// `-n`: write-zeroes.
    Explicit,
    /// `-S 0`: zeros written as data.
    Fill,
}

/// The work items: units `unit` long (aligned) wherever there is data, zero items between.
fn work_items(pieces: &[Piece], unit: u64, zeros: ZeroMode) -> Vec<Item> {
    let mut items = Vec::new();
    let mut covered = 0u64; // guest bytes below this are in items already
    let push_gap = |items: &mut Vec<Item>, start: u64, end: u64| {
        if start >= end {
            return;
        }
        match zeros {
            ZeroMode::Skip => {}
            ZeroMode::Explicit => items.push(Item::Zero { start, end }),
            ZeroMode::Fill => items.push(Item::Fill { start, end }),
        }
    };
    let end_all = pieces.last().map_or(0, |p| p.end);
    for p in pieces {
        let content = matches!(p.kind, Kind::Data | Kind::Cmp { .. });
        if !content || p.end <= covered {
            continue;
        }
        let first = (p.start.max(covered) / unit) * unit;
        // The gap before: zero and same pieces, outside every unit.
        let gap_start = covered;
        let gap_end = first.max(covered);
        for q in pieces.iter().filter(|q| q.kind == Kind::Zero && q.end > gap_start && q.start < gap_end) {
            push_gap(&mut items, q.start.max(gap_start), q.end.min(gap_end));
        }
        let mut u = first.max(covered);
        while u < p.end {
            let e = ((u / unit + 1) * unit).min(end_all);
            items.push(Item::Unit { start: u, end: e });
            u = e;
        }
        covered = u;
    }
    for q in pieces.iter().filter(|q| q.kind == Kind::Zero && q.end > covered) {
        push_gap(&mut items, q.start.max(covered), q.end);
    }
    items
}

/// Everything the workers share.
struct Shared<'a> {
    sources: &'a [Source],
    base: Option<&'a Base>,
    pieces: &'a [Piece],
    block: u64,
    sparse: u64,
    zeros: ZeroMode,
    compress: Option<(u8, u64)>,
    /// Unit buffers the writer is done with, for the workers to reuse (no allocation, no
    /// page faults and no zeroing per unit).
    pool: Mutex<Vec<Vec<u8>>>,
}

impl Shared<'_> {
    /// A buffer of `len` bytes (contents unspecified unless `zeroed`).
    fn take(&self, len: usize, zeroed: bool) -> Vec<u8> {
        let mut b = self.pool.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pop().unwrap_or_default();
        if zeroed {
            b.clear();
        }
        b.resize(len, 0);
        b
    }

    /// Gives a buffer back.
    fn give(&self, b: Vec<u8>) {
        let mut pool = self.pool.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if pool.len() < 64 {
            pool.push(b);
        }
    }

    /// Reads the sources' guest data over `[start, end)` into `buf`.
    fn read_sources(&self, buf: &mut [u8], start: u64, end: u64) -> Result<()> {
        for s in self.sources {
            let (a, b) = (start.max(s.base), end.min(s.base + s.size));
            if a >= b {
                continue;
            }
            let (i, j) = (usize::try_from(a - start).unwrap_or(0), usize::try_from(b - start).unwrap_or(0));
            s.image.read_into(&mut buf[i..j], a - s.base + s.skip)?;
        }
        Ok(())
    }

    /// The kinds present in `[start, end)`.
    fn kinds(&self, start: u64, end: u64) -> impl Iterator<Item = &Piece> {
        let i = self.pieces.partition_point(|p| p.end <= start);
        self.pieces[i..].iter().take_while(move |p| p.start < end)
    }

    /// Examines one unit: what the target needs there.
    fn unit(&self, start: u64, end: u64) -> Result<Done> {
        let len = usize::try_from(end - start).unwrap_or(0);
        let needs_src =
            self.kinds(start, end).any(|p| matches!(p.kind, Kind::Data | Kind::Same | Kind::Cmp { src_data: true }));
        // The sources' read fills every byte of the unit (zeros where they read zeros).
        let mut buf = self.take(len, !needs_src);
        if needs_src {
            self.read_sources(&mut buf, start, end)?;
        }
        let cmp = self.kinds(start, end).any(|p| matches!(p.kind, Kind::Cmp { .. }));
        let base_buf = match (cmp, self.base) {
            (true, Some(b)) => {
                let mut v = self.take(len, false);
                b.image.read_into(&mut v, start)?;
                Some(v)
            }
            _ => None,
        };
        let ops = self.decide(start, &buf, base_buf.as_deref());
        if let Some(v) = base_buf {
            self.give(v);
        }
        Ok(Done { buf, ops })
    }

    /// Per block (a target cluster, or `-S` bytes for raw): skip, zero, fill or data.
    fn decide(&self, start: u64, buf: &[u8], base: Option<&[u8]>) -> Vec<Op> {
        let bs = usize::try_from(self.block).unwrap_or(1);
        let blocks: Vec<(usize, usize)> = (0..buf.len()).step_by(bs).map(|i| (i, (i + bs).min(buf.len()))).collect();
        let mut zero: Vec<bool> = blocks.iter().map(|&(a, b)| self.sparse > 0 && is_zero(&buf[a..b])).collect();
        // Zero runs shorter than `-S` are written as data (when `-S` exceeds the block).
        let min_run = usize::try_from(self.sparse.div_ceil(self.block)).unwrap_or(1).max(1);
        if min_run > 1 {
            let mut i = 0;
            while i < zero.len() {
                let j = (i..zero.len()).find(|&k| !zero[k]).unwrap_or(zero.len());
                if zero[i] && j - i < min_run && j < zero.len() && i > 0 {
                    zero[i..j].fill(false);
                }
                i = j.max(i + 1);
            }
        }
        let mut ops: Vec<Op> = Vec::new();
        for (k, &(a, b)) in blocks.iter().enumerate() {
            let off = start + a as u64;
            let has_content =
                self.kinds(off, start + b as u64).any(|p| matches!(p.kind, Kind::Data | Kind::Cmp { .. }));
            if let Some(base) = base {
                if buf[a..b] == base[a..b] {
                    continue; // the backing file holds the same
                }
                if zero[k] {
                    push_op(&mut ops, Op::Zero { off, len: (b - a) as u64 });
                    continue;
                }
            } else if zero[k] || !has_content {
                match self.zeros {
                    ZeroMode::Skip => {}
                    ZeroMode::Explicit => push_op(&mut ops, Op::Zero { off, len: (b - a) as u64 }),
                    ZeroMode::Fill => push_op(&mut ops, Op::Fill { off, len: (b - a) as u64 }),
                }
                continue;
            }
            match self.compress {
                Some((ctype, cs)) => {
                    let packed = crate::compression::compress_cluster(ctype, cs, &buf[a..b]);
                    ops.push(Op::Compressed { off, at: a, len: b - a, packed });
                }
                None => push_op(&mut ops, Op::Data { off, at: a, len: b - a }),
            }
        }
        ops
    }
}

/// Appends `op`, merging it into the previous one when they are contiguous and alike.
fn push_op(ops: &mut Vec<Op>, op: Op) {
    match (ops.last_mut(), op) {
        (Some(Op::Data { off, len, .. }), Op::Data { off: o, len: l, .. }) if *off + *len as u64 == o => *len += l,
        (Some(Op::Zero { off, len }), Op::Zero { off: o, len: l }) if *off + *len == o => *len += l,
        (Some(Op::Fill { off, len }), Op::Fill { off: o, len: l }) if *off + *len == o => *len += l,
        (_, op) => ops.push(op),
    }
}

/// The target being written.
enum Target {
    Raw {
        file: FileStorage,
        path: PathBuf,
        sync: bool,
    },
    Qcow2(Box<QcowFile>),
    /// First pass of a qcow2 stream: what goes where (`v2`: no zero clusters).
    Record {
        rec: stream::Record,
        cluster_bits: u32,
        v2: bool,
    },
    /// Second pass of a qcow2 stream, or a raw stream.
    Stream {
        s: Box<stream::Stream>,
        v2: bool,
    },
}

impl Target {
    fn apply(&mut self, op: &Op, buf: &[u8]) -> Result<()> {
        match (self, op) {
            (Target::Qcow2(f), Op::Data { off, at, len }) => f.write_at(&buf[*at..*at + *len], *off),
            (Target::Qcow2(f), Op::Zero { off, len }) => f.write_zeroes(*off, *len),
            (Target::Qcow2(f), Op::Fill { off, len }) => fill(*off, *len, |b, o| f.write_at(b, o)),
            (Target::Qcow2(f), Op::Compressed { off, at, len, packed }) => {
                f.store_compressed(*off, &buf[*at..*at + *len], packed.as_deref()).map(|_| ())
            }
            (Target::Raw { file, path, .. }, Op::Data { off, at, len } | Op::Compressed { off, at, len, .. }) => file
                .write_data_at(&buf[*at..*at + *len], *off)
                .ctx(|| format!("writing '{}' at 0x{off:x}", path.display())),
            (Target::Raw { file, path, .. }, Op::Zero { off, len }) => punch(file.as_file(), path, *off, *len),
            (Target::Raw { file, path, .. }, Op::Fill { off, len }) => fill(*off, *len, |b, o| {
                file.write_data_at(b, o).ctx(|| format!("writing '{}' at 0x{o:x}", path.display()))
            }),
            (Target::Record { rec, cluster_bits, v2 }, op) => {
                match *op {
                    Op::Data { off, len, .. } | Op::Compressed { off, len, .. } => {
                        stream::Record::add(&mut rec.data, off, len as u64, *cluster_bits);
                    }
                    Op::Fill { off, len } => stream::Record::add(&mut rec.data, off, len, *cluster_bits),
                    Op::Zero { off, len } if *v2 => stream::Record::add(&mut rec.data, off, len, *cluster_bits),
                    Op::Zero { off, len } => stream::Record::add(&mut rec.zero, off, len, *cluster_bits),
                }
                Ok(())
            }
            (Target::Stream { s, v2 }, op) => match *op {
                Op::Data { off, at, len } | Op::Compressed { off, at, len, .. } => s.data(off, &buf[at..at + len]),
                Op::Fill { off, len } => fill(off, len, |b, o| s.data(o, b)),
                Op::Zero { off, len } if *v2 => fill(off, len, |b, o| s.data(o, b)),
                Op::Zero { .. } => Ok(()),
            },
        }
    }

    fn apply_item(&mut self, item: Item) -> Result<()> {
        match item {
            Item::Zero { start, end } => self.apply(&Op::Zero { off: start, len: end - start }, &[]),
            Item::Fill { start, end } => self.apply(&Op::Fill { off: start, len: end - start }, &[]),
            Item::Unit { .. } => Ok(()),
        }
    }

    fn finish(self) -> Result<()> {
        match self {
            Target::Qcow2(mut f) => f.close(),
            Target::Raw { file, path, sync: true } => {
                file.as_file().sync_all().ctx(|| format!("syncing '{}'", path.display()))
            }
            Target::Raw { sync: false, .. } => Ok(()),
            Target::Record { .. } => Ok(()),
            Target::Stream { s, .. } => s.finish(),
        }
    }
}

/// Writes zeros over `[off, off+len)` in chunks.
fn fill(off: u64, len: u64, mut write: impl FnMut(&[u8], u64) -> Result<()>) -> Result<()> {
    let zeros = vec![0u8; usize::try_from(len.min(FILL_CHUNK)).unwrap_or(0)];
    let mut o = off;
    while o < off + len {
        let n = (off + len - o).min(FILL_CHUNK);
        write(&zeros[..usize::try_from(n).unwrap_or(0)], o)?;
        o += n;
    }
    Ok(())
}

/// Makes a raw file range read as zeros: a hole punched, or zeros written.
fn punch(file: &File, path: &Path, off: u64, len: u64) -> Result<()> {
    use nix::fcntl::{fallocate, FallocateFlags};
    let (Ok(o), Ok(l)) = (i64::try_from(off), i64::try_from(len)) else {
        return Err(Error::InvalidArgument(format!("range 0x{off:x}+0x{len:x} too large")));
    };
    let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    if fallocate(file, flags, o, l).is_ok() {
        return Ok(());
    }
    fill(off, len, |b, at| file.write_all_at(b, at).ctx(|| format!("writing '{}' at 0x{at:x}", path.display())))
}

/// Refuses a target that is one of the files the convert reads.
fn refuse_source_target(target: &Path, reads: &[FileId]) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let Ok(m) = std::fs::metadata(target) else { return Ok(()) };
    if reads.contains(&(m.dev(), m.ino())) {
        return Err(Error::ImageLocked(format!(
            "Could not open '{}': Failed to get \"write\" lock: it is a file this convert reads (a source image, its backing chain or data file, or the target's backing file)",
            target.display()
        )));
    }
    Ok(())
}

/// Opens or creates the target. Its data writes go behind (`set_write_behind`: write-back
/// started at once and the page cache dropped 16 MiB behind) whatever the cache mode: a
/// convert's output is written once and rarely read back at once, so keeping all of it cached
/// only evicts other data, and reusing the same pages keeps page allocation cheap (on a VM
/// whose free memory goes back to the host, 1 GiB into never-reused pages took up to 6 s).
/// With `-t unsafe` nothing waits for the write-back: it is only started.
fn open_target(target: &Path, size: u64, opts: &ConvertOptions) -> Result<Target> {
    match (opts.output_format, opts.existing_target) {
        (OutputFormat::Qcow2, false) => {
            let mut c = opts.create.clone();
            c.virtual_size = size;
            c.overwrite = true;
            let mut f = QcowFile::create(target, &c)?;
            if opts.unsafe_cache {
                f.set_unsafe_cache();
            }
            f.set_write_behind();
            Ok(Target::Qcow2(Box::new(f)))
        }
        (OutputFormat::Qcow2, true) => {
            let mut f = QcowFile::open(target, OpenOptions { writable: true, ..OpenOptions::default() })?;
            if opts.unsafe_cache {
                f.set_unsafe_cache();
            }
            f.set_write_behind();
            if f.virtual_size() < size {
                return Err(Error::InvalidArgument(format!(
                    "Target image '{}' is smaller than the source ({} < {size} bytes)",
                    target.display(),
                    f.virtual_size()
                )));
            }
            Ok(Target::Qcow2(Box::new(f)))
        }
        (OutputFormat::Raw, existing) => {
            let ctx = || format!("opening target '{}'", target.display());
            let file = std::fs::OpenOptions::new().read(true).write(true).create(!existing).open(target).ctx(ctx)?;
            crate::lock::lock_image(&file, true, &format!("'{}'", target.display()))?;
            if existing {
                let len = file.metadata().ctx(ctx)?.len();
                if len < size {
                    file.set_len(size).ctx(ctx)?;
                }
            } else {
                // As QEMU's raw create: emptied, then sized (the lock is held first).
                file.set_len(0).ctx(ctx)?;
                file.set_len(size).ctx(ctx)?;
            }
            let file = FileStorage::new(file);
            file.set_write_behind();
            Ok(Target::Raw { file, path: target.to_path_buf(), sync: !opts.unsafe_cache })
        }
    }
}

fn check_options(sources: &[PathBuf], opts: &ConvertOptions) -> Result<()> {
    if sources.is_empty() {
        return Err(Error::InvalidArgument("Expecting at least one source image".into()));
    }
    if opts.target_is_zero && !opts.existing_target {
        return Err(Error::InvalidArgument("--target-is-zero requires use of -n flag".into()));
    }
    if opts.compress && opts.output_format == OutputFormat::Raw {
        return Err(Error::InvalidArgument("Compression not supported for this file format".into()));
    }
    if opts.compress && opts.create.data_file.is_some() {
        return Err(Error::InvalidArgument("Compression not supported with an external data file".into()));
    }
    if opts.create.backing_file.is_some() && sources.len() > 1 {
        return Err(Error::InvalidArgument(
            "Having a backing file for the target makes no sense when concatenating multiple input images".into(),
        ));
    }
    if opts.create.backing_file.is_some() && (opts.output_format == OutputFormat::Raw || opts.existing_target) {
        return Err(Error::InvalidArgument("-B makes no sense with a raw target or -n".into()));
    }
    if opts.window.is_some() && sources.len() > 1 {
        return Err(Error::InvalidArgument("a window (dd) takes one source".into()));
    }
    if opts.sparse_size % SECTOR != 0 {
        return Err(Error::InvalidArgument(format!(
            "Invalid buffer size for sparse output specified: {} (a multiple of 512)",
            opts.sparse_size
        )));
    }
    Ok(())
}

/// Converts `sources` (concatenated) into `target` with `qemu-img convert`'s semantics (see
/// the module documentation). On an error (or a stop asked by `progress`) the sources are
/// untouched and the target is a valid image holding part of the data.
pub fn convert(sources: &[PathBuf], target: &Path, opts: &ConvertOptions, progress: Progress<'_>) -> Result<()> {
    check_options(sources, opts)?;
    let mut opened = Vec::with_capacity(sources.len());
    let mut base_off = 0u64;
    let mut reads: Vec<FileId> = Vec::new();
    for p in sources {
        let image = match &opts.snapshot {
            Some(sn) => crate::backing::open_image_snapshot(p, opts.source_format.as_deref(), opts.force_share, sn)?,
            None => open_image_any(p, opts.source_format.as_deref(), opts.force_share)?,
        };
        let mut size = guest_size(&*image);
        let mut skip = 0;
        if let Some((offset, len)) = opts.window {
            if offset > size {
                return Err(Error::InvalidArgument(format!("{}: cannot skip to specified offset", p.display())));
            }
            (skip, size) = (offset, len.min(size - offset));
        }
        reads.extend(layer_ids(&*image).concat());
        opened.push(Source { image, base: base_off, size, skip });
        base_off += size;
    }
    let base = open_base(target, opts)?;
    if let Some(b) = &base {
        reads.extend(b.ids.iter().copied());
    }
    refuse_source_target(target, &reads)?;
    let pieces = plan(&opened, base.as_ref())?;
    if target == Path::new("-") {
        return convert_to_stream(&opened, base.as_ref(), &pieces, base_off, opts, progress);
    }
    let mut out = open_target(target, base_off, opts)?;
    let (block, compress) = match &out {
        Target::Qcow2(f) => {
            let cs = f.cluster_size();
            (cs, opts.compress.then_some((f.header().compression_type, cs)))
        }
        _ => (opts.sparse_size.max(SECTOR), None),
    };
    let zeros = if opts.sparse_size == 0 {
        ZeroMode::Fill
    } else if opts.existing_target && !opts.target_is_zero {
        ZeroMode::Explicit
    } else {
        ZeroMode::Skip
    };
    let unit = UNIT.max(block).div_ceil(block) * block;
    let items = work_items(&pieces, unit, zeros);
    let shared = Shared {
        sources: &opened,
        base: base.as_ref(),
        pieces: &pieces,
        block,
        sparse: opts.sparse_size,
        zeros,
        compress,
        pool: Mutex::default(),
    };
    let result = run(&shared, &items, &mut out, opts.threads, progress);
    let finished = out.finish();
    result.and(finished)
}

/// `convert ... -`: see [`stream`].
fn convert_to_stream(
    sources: &[Source],
    base: Option<&Base>,
    pieces: &[Piece],
    size: u64,
    opts: &ConvertOptions,
    progress: Progress<'_>,
) -> Result<()> {
    use std::os::fd::AsFd;
    if opts.compress {
        return Err(Error::InvalidArgument(
            "compressed clusters cannot be streamed (the layout needs their sizes first); write to a file".into(),
        ));
    }
    if opts.create.data_file.is_some() || opts.existing_target {
        return Err(Error::InvalidArgument(
            "a stream has no external data file and cannot be written into (-n)".into(),
        ));
    }
    let out = std::io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .map(File::from)
        .ctx(|| "opening the output stream".to_string())?;
    let zeros = if opts.sparse_size == 0 { ZeroMode::Fill } else { ZeroMode::Skip };
    if opts.output_format == OutputFormat::Raw {
        let block = opts.sparse_size.max(SECTOR);
        let items = work_items(pieces, UNIT.div_ceil(block) * block, zeros);
        let shared = Shared {
            sources,
            base,
            pieces,
            block,
            sparse: opts.sparse_size,
            zeros,
            compress: None,
            pool: Mutex::default(),
        };
        let s = stream::Stream { out, data: Vec::new(), next: 0, cluster_bits: 0, raw_size: Some(size), pos: 0 };
        let mut t = Target::Stream { s: Box::new(s), v2: false };
        let r = run(&shared, &items, &mut t, opts.threads, progress);
        return r.and(t.finish());
    }
    // The header of a new empty image with the target's options (made in memory).
    let mem = Arc::new(crate::storage::MemStorage::default());
    let mut c = opts.create.clone();
    c.virtual_size = size;
    drop(crate::create::create_on(mem.clone(), &c)?);
    let h = crate::header::QcowHeader::read_from(&*mem)?;
    let (cs, bits, v2) = (h.cluster_size(), h.cluster_bits, h.version < 3);
    let items = work_items(pieces, UNIT.max(cs).div_ceil(cs) * cs, zeros);
    let shared = Shared {
        sources,
        base,
        pieces,
        block: cs,
        sparse: opts.sparse_size,
        zeros,
        compress: None,
        pool: Mutex::default(),
    };
    let mut rec = Target::Record { rec: stream::Record::default(), cluster_bits: bits, v2 };
    run(&shared, &items, &mut rec, opts.threads, &|d, t| progress(d, 2 * t))?;
    let Target::Record { rec, .. } = rec else {
        return Err(Error::InvalidArgument("the stream's first pass recorded nothing".into()));
    };
    let layout = stream::layout(h, &rec)?;
    let mut s = stream::Stream { out, data: rec.data, next: 0, cluster_bits: bits, raw_size: None, pos: 0 };
    s.data_meta(&layout.meta)?;
    let mut t = Target::Stream { s: Box::new(s), v2 };
    let r = run(&shared, &items, &mut t, opts.threads, &|d, t| progress(t + d, 2 * t));
    r.and(t.finish())
}

/// Runs the items: workers examine units in parallel, this thread applies them in order.
fn run(shared: &Shared<'_>, items: &[Item], out: &mut Target, threads: usize, progress: Progress<'_>) -> Result<()> {
    let len = |item: &Item| match *item {
        Item::Unit { start, end } | Item::Zero { start, end } | Item::Fill { start, end } => end - start,
    };
    let total: u64 = items.iter().map(len).sum();
    let mut done_bytes = 0u64;
    progress(0, total)?;
    let work = |i: usize| match items[i] {
        Item::Unit { start, end } => shared.unit(start, end),
        _ => Ok(Done { buf: Vec::new(), ops: Vec::new() }),
    };
    pipeline::run_in_order(items.len(), pipeline::workers(threads), work, |i, done: Done| {
        out.apply_item(items[i])?;
        for op in &done.ops {
            out.apply(op, &done.buf)?;
        }
        shared.give(done.buf);
        done_bytes += len(&items[i]);
        progress(done_bytes, total)
    })
}

mod stream;
#[cfg(test)]
mod tests;
