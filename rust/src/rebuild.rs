//! Refcount rebuild, after the seed (crosvm `rebuild_refcounts`), with its defects fixed.
//!
//! 1. [`Imrt`] is the in-memory refcount table: every refblock the image needs, concatenated,
//!    at the image's own refcount width (so it is exactly what gets written). It is sized from
//!    the host file, never from the virtual size, and grows only for references that end less
//!    than one cluster past the end of the file and for the new structure itself.
//! 2. [`Walker`] counts every reference (header, active and snapshot L1/L2 trees and their data,
//!    compressed byte ranges, snapshot table, reftable, refblocks, bitmaps, LUKS header) into an
//!    `Imrt`, classifying problems the way `qemu-img check` does (`check.rs` uses it too).
//! 3. [`write_refcount_structure`] allocates new refblocks and a new reftable in clusters that are
//!    free in the `Imrt` (which counts the old, still-live structure too), holes first, repeating
//!    until the reftable describes itself; writes them; syncs; then switches the header's
//!    `refcount_table_offset` and `refcount_table_clusters` in one write and syncs again. A crash
//!    at any point leaves either the old structure or the new one, never a mix.

use std::collections::BTreeSet;

use crate::error::{Error, Result};
use crate::format::{
    CompressedLayout, RefcountGeometry, L1E_OFFSET_MASK, L1E_RESERVED_MASK, L2E_COMPRESSED, L2E_COPIED,
    L2E_OFFSET_MASK, L2E_STD_RESERVED_MASK, L2E_ZERO, REFT_OFFSET_MASK, REFT_RESERVED_MASK,
};
use crate::header::{field_offset, QcowHeader};
use crate::raw_file::QcowRawFile;
use crate::snapshot::{read_bitmap_directory, read_snapshot_table, SnapshotTable};

/// QEMU's limit on an L1 table, in entries.
const MAX_L1_ENTRIES: u32 = 4 << 20;
/// At most this many problems are listed one by one; the rest are summarised.
pub const MAX_LISTED_PROBLEMS: usize = 10_000;

/// One refblock's worth of the in-memory refcount table.
#[derive(Clone, Debug)]
enum Chunk {
    /// Every refcount is 0.
    Zero,
    /// 2 bits per cluster (values 0..=2; 3 never stored): most images need no more, so the
    /// table takes an eighth of a 16-bit refblock's size.
    Small(Vec<u8>),
    /// The refblock's on-disk encoding at the image's width.
    Wide(Vec<u8>),
}

/// The in-memory refcount table: one chunk per refblock, kept compact (2 bits per cluster)
/// until a refcount above 2 needs the image's full width. It never takes more memory than the
/// refblocks it describes would.
#[derive(Clone, Debug)]
pub struct Imrt {
    chunks: Vec<Chunk>,
    len: u64,
    geo: RefcountGeometry,
}

impl Imrt {
    /// An all-zero table for `entries` clusters.
    pub fn new(geo: RefcountGeometry, entries: u64) -> Result<Self> {
        let mut t = Imrt { chunks: Vec::new(), len: 0, geo };
        t.ensure(entries)?;
        Ok(t)
    }

    /// Number of clusters described.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether no cluster is described.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Grows the table to describe at least `entries` clusters.
    pub fn ensure(&mut self, entries: u64) -> Result<()> {
        if entries <= self.len {
            return Ok(());
        }
        let blocks = usize::try_from(entries.div_ceil(self.geo.refblock_entries())).map_err(|_| {
            Error::InvalidRefcountTableSize(format!("refcount table for {entries} clusters is too large"))
        })?;
        if blocks > self.chunks.len() {
            self.chunks.try_reserve(blocks - self.chunks.len()).map_err(|_| {
                Error::InvalidRefcountTableSize(format!("cannot allocate a refcount table for {entries} clusters"))
            })?;
            self.chunks.resize(blocks, Chunk::Zero);
        }
        self.len = entries;
        Ok(())
    }

    fn split(&self, i: u64) -> (usize, usize) {
        let bits = self.geo.refblock_bits();
        (usize::try_from(i >> bits).unwrap_or(usize::MAX), usize::try_from(i & ((1 << bits) - 1)).unwrap_or(0))
    }

    /// Refcount of cluster `i` (0 past the end).
    pub fn get(&self, i: u64) -> u64 {
        if i >= self.len {
            return 0;
        }
        let (ri, idx) = self.split(i);
        match self.chunks.get(ri) {
            Some(Chunk::Small(v)) => u64::from((v[idx / 4] >> ((idx % 4) * 2)) & 3),
            Some(Chunk::Wide(v)) => crate::format::refcount_at(v, self.geo.refcount_order, idx),
            _ => 0,
        }
    }

    /// Sets the refcount of cluster `i` (growing the table); `v` must fit the width.
    pub fn set(&mut self, i: u64, v: u64) -> Result<()> {
        self.ensure(i + 1)?;
        let (ri, idx) = self.split(i);
        let entries = usize::try_from(self.geo.refblock_entries()).unwrap_or(0);
        let order = self.geo.refcount_order;
        let cs = 1usize << self.geo.cluster_bits;
        let chunk = &mut self.chunks[ri];
        if matches!(chunk, Chunk::Zero) {
            if v == 0 {
                return Ok(());
            }
            *chunk = if order >= 2 { Chunk::Small(vec![0u8; entries / 4]) } else { Chunk::Wide(vec![0u8; cs]) };
        }
        if let Chunk::Small(small) = chunk {
            if v <= 2 {
                let shift = (idx % 4) * 2;
                #[allow(clippy::cast_possible_truncation)]
                let val = (v as u8) << shift;
                small[idx / 4] = (small[idx / 4] & !(3 << shift)) | val;
                return Ok(());
            }
            // Promote to the full width.
            let mut wide = vec![0u8; cs];
            for (j, &b) in small.iter().enumerate() {
                if b != 0 {
                    for k in 0..4 {
                        crate::format::set_refcount_at(&mut wide, order, j * 4 + k, u64::from((b >> (k * 2)) & 3));
                    }
                }
            }
            *chunk = Chunk::Wide(wide);
        }
        if let Chunk::Wide(wide) = chunk {
            crate::format::set_refcount_at(wide, order, idx, v);
        }
        Ok(())
    }

    /// Whether every refcount in refblock `ri`'s range is zero.
    pub fn refblock_is_empty(&self, ri: u64) -> bool {
        match usize::try_from(ri).ok().and_then(|r| self.chunks.get(r)) {
            Some(Chunk::Small(v) | Chunk::Wide(v)) => v.iter().all(|&b| b == 0),
            _ => true,
        }
    }

    /// The on-disk bytes of refblock `ri`.
    pub fn refblock_bytes(&self, ri: u64) -> Vec<u8> {
        let cs = 1usize << self.geo.cluster_bits;
        match usize::try_from(ri).ok().and_then(|r| self.chunks.get(r)) {
            Some(Chunk::Wide(v)) => v.clone(),
            Some(Chunk::Small(small)) => {
                let mut wide = vec![0u8; cs];
                for (j, &b) in small.iter().enumerate() {
                    if b != 0 {
                        for k in 0..4 {
                            crate::format::set_refcount_at(
                                &mut wide,
                                self.geo.refcount_order,
                                j * 4 + k,
                                u64::from((b >> (k * 2)) & 3),
                            );
                        }
                    }
                }
                wide
            }
            _ => vec![0u8; cs],
        }
    }

    /// Frees the table (it then describes no cluster).
    pub fn clear(&mut self) {
        self.chunks = Vec::new();
        self.len = 0;
    }

    /// Number of refblocks the table spans.
    pub fn refblocks(&self) -> u64 {
        self.len.div_ceil(self.geo.refblock_entries())
    }
}

/// One problem found by a check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Short machine-readable kind ("leak", "refcount-too-low", "cross-link", ...).
    pub kind: &'static str,
    /// Host offset concerned, if any.
    pub host_offset: Option<u64>,
    /// Guest offset concerned, if known.
    pub guest_offset: Option<u64>,
    /// Human-readable description.
    pub message: String,
}

/// The problems found by a check: the first [`MAX_LISTED_PROBLEMS`] listed, the rest counted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProblemLog {
    /// The listed problems.
    pub list: Vec<Problem>,
    /// Problems found but not listed.
    pub unlisted: u64,
}

impl ProblemLog {
    /// Records a problem.
    pub fn push(&mut self, kind: &'static str, host_offset: Option<u64>, guest_offset: Option<u64>, message: String) {
        if self.list.len() < MAX_LISTED_PROBLEMS {
            self.list.push(Problem { kind, host_offset, guest_offset, message });
        } else {
            self.unlisted += 1;
        }
    }
}

/// Counters of a check, named as `qemu-img check`'s.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct Counts {
    pub check_errors: u64,
    pub corruptions: u64,
    pub leaks: u64,
    pub corruptions_fixed: u64,
    pub leaks_fixed: u64,
    pub total_clusters: u64,
    pub allocated_clusters: u64,
    pub fragmented_clusters: u64,
    pub compressed_clusters: u64,
}

/// Walks every structure of an image and counts its references into an [`Imrt`].
pub struct Walker<'a> {
    raw: &'a QcowRawFile,
    h: &'a QcowHeader,
    /// The counted references.
    pub imrt: Imrt,
    /// Counters (corruptions and check_errors found while walking, cluster statistics).
    pub counts: Counts,
    /// Problems found.
    pub problems: ProblemLog,
    /// The refcount structure must be rebuilt (a refblock is unsane).
    pub rebuild: bool,
    /// Something could not be walked (a snapshot skipped, a table unreadable): the counts may
    /// miss live clusters, so repairs must not free clusters or allocate in holes.
    pub incomplete: bool,
    /// Clusters referenced one cluster or more past the end of the file (not counted); an
    /// allocation must never land on them, or the reference would start to read our data.
    pub beyond_eof: BTreeSet<u64>,
    /// Clusters claimed by the active tree and other unshared metadata (cross-link detection).
    claimed: Vec<u64>,
    file_len: u64,
    layout: CompressedLayout,
}

fn classify(entry: u64, extended: bool, data_file: bool) -> L2Kind {
    if entry & L2E_COMPRESSED != 0 {
        L2Kind::Compressed
    } else if entry & L2E_ZERO != 0 && !extended {
        if entry & L2E_OFFSET_MASK != 0 {
            L2Kind::ZeroAlloc
        } else {
            L2Kind::ZeroPlain
        }
    } else if entry & L2E_OFFSET_MASK == 0 {
        if data_file && entry & L2E_COPIED != 0 {
            L2Kind::Normal
        } else {
            L2Kind::Unallocated
        }
    } else {
        L2Kind::Normal
    }
}

/// QEMU's cluster types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum L2Kind {
    Unallocated,
    ZeroPlain,
    ZeroAlloc,
    Normal,
    Compressed,
}

impl<'a> Walker<'a> {
    /// A walker over `raw` described by `h`.
    pub fn new(raw: &'a QcowRawFile, h: &'a QcowHeader) -> Result<Self> {
        let file_len = raw.file_len();
        let cs = h.cluster_size();
        let nb_clusters = file_len.div_ceil(cs);
        let geo = raw.refcount_geometry();
        let imrt = Imrt::new(geo, nb_clusters)?;
        let claimed = vec![0u64; usize::try_from(nb_clusters.div_ceil(64) + 1).unwrap_or(1)];
        Ok(Walker {
            raw,
            h,
            imrt,
            counts: Counts { total_clusters: h.size.div_ceil(cs), ..Counts::default() },
            problems: ProblemLog::default(),
            rebuild: false,
            incomplete: false,
            beyond_eof: BTreeSet::new(),
            claimed,
            file_len,
            layout: CompressedLayout::new(h.cluster_bits),
        })
    }

    /// Records a problem (listing at most [`MAX_LISTED_PROBLEMS`]).
    pub fn problem(&mut self, kind: &'static str, host: Option<u64>, guest: Option<u64>, message: String) {
        self.problems.push(kind, host, guest, message);
    }

    fn corruption(&mut self, kind: &'static str, host: Option<u64>, guest: Option<u64>, message: String) {
        self.counts.corruptions += 1;
        self.problem(kind, host, guest, message);
    }

    /// QEMU's `qcow2_inc_refcounts_imrt`: +1 for every cluster touched by `[offset, offset+size)`.
    fn inc(&mut self, offset: u64, size: u64, what: &dyn Fn() -> String, guest: Option<u64>) -> Result<()> {
        if size == 0 {
            return Ok(());
        }
        let cb = self.h.cluster_bits;
        let cs = 1u64 << cb;
        let Some(end) = offset.checked_add(size) else {
            self.corruption(
                "reference-past-eof",
                Some(offset),
                guest,
                format!("{}: offset 0x{offset:x} size 0x{size:x} overflows", what()),
            );
            return Ok(());
        };
        if end >= self.file_len.saturating_add(cs) {
            self.corruption(
                "reference-past-eof",
                Some(offset),
                guest,
                format!(
                    "{}: region 0x{offset:x}..0x{end:x} exceeds the end of the file (0x{:x}) by one cluster or more; its data is lost",
                    what(),
                    self.file_len
                ),
            );
            for k in (offset >> cb)..=((end - 1) >> cb) {
                if self.beyond_eof.len() > 1 << 20 {
                    break;
                }
                self.beyond_eof.insert(k);
            }
            return Ok(());
        }
        let max = self.imrt.geo.refcount_max();
        for k in (offset >> cb)..=((end - 1) >> cb) {
            let r = self.imrt.get(k);
            if r == max {
                self.corruption(
                    "refcount-overflow",
                    Some(k << cb),
                    guest,
                    format!(
                        "{}: cluster 0x{:x} is referenced more than the {}-bit refcount maximum {max} allows; increase refcount_bits (qemu-img amend) or convert the image",
                        what(),
                        k << cb,
                        self.imrt.geo.refcount_bits()
                    ),
                );
                continue;
            }
            self.imrt.set(k, r + 1)?;
        }
        Ok(())
    }

    /// Claims clusters for an unshared structure; a second claim is a cross-link.
    fn claim(&mut self, offset: u64, size: u64, what: &dyn Fn() -> String, guest: Option<u64>) {
        if size == 0 {
            return;
        }
        let cb = self.h.cluster_bits;
        let Some(end) = offset.checked_add(size) else { return };
        for k in (offset >> cb)..=((end - 1) >> cb) {
            let Some(word) = usize::try_from(k / 64).ok().and_then(|w| self.claimed.get_mut(w)) else { continue };
            let bit = 1u64 << (k % 64);
            if *word & bit != 0 {
                self.problem(
                    "cross-link",
                    Some(k << cb),
                    guest,
                    format!(
                        "{}: cluster 0x{:x} is also used by another structure of the active image; without a snapshot to share it, one of the two loses its data (QEMU silently treats it as shared)",
                        what(),
                        k << cb
                    ),
                );
            } else {
                *word |= bit;
            }
        }
    }

    /// Reads `len` bytes at `offset` as far as the file holds them (the rest is absent, not
    /// zero-filled, so a huge bogus size costs nothing).
    fn read_present(&mut self, offset: u64, len: u64, what: &str) -> Option<Vec<u8>> {
        let avail = self.file_len.saturating_sub(offset).min(len);
        let mut buf = vec![0u8; usize::try_from(avail).ok()?];
        match self.raw.read_at(&mut buf, offset) {
            Ok(n) => {
                buf.truncate(n);
                Some(buf)
            }
            Err(e) => {
                self.counts.check_errors += 1;
                self.incomplete = true;
                self.problem("io-error", Some(offset), None, format!("reading {what}: {e}"));
                None
            }
        }
    }

    /// QEMU's `calculate_refcounts`: counts everything.
    pub fn walk(&mut self) -> Result<SnapshotTable> {
        let h = self.h;
        let cs = h.cluster_size();
        // Header: cluster 0, whole (extensions and backing name live in it).
        self.inc(0, cs, &|| "header".into(), None)?;
        self.claim(0, cs, &|| "header".into(), None);

        // Active L1 tree.
        self.walk_l1(h.l1_table_offset, h.l1_size, true, "active L1 table")?;

        // Snapshots.
        let snapshots = match read_snapshot_table(self.raw, h) {
            Ok(t) => t,
            Err(e) => {
                self.counts.check_errors += 1;
                self.incomplete = true;
                self.problem(
                    "snapshot-table",
                    Some(h.snapshots_offset),
                    None,
                    format!("cannot read the snapshot table: {e}"),
                );
                SnapshotTable::default()
            }
        };
        if h.has_data_file() && !snapshots.snapshots.is_empty() {
            self.corruption(
                "snapshot",
                Some(h.snapshots_offset),
                None,
                format!("{} snapshots in an image with an external data file", snapshots.snapshots.len()),
            );
        }
        for (i, sn) in snapshots.snapshots.iter().enumerate() {
            if h.version >= 3 && sn.extra_data_size < 16 {
                self.corruption(
                    "snapshot",
                    Some(sn.entry_offset),
                    None,
                    format!("snapshot table entry {i} is incomplete (extra_data_size {} < 16)", sn.extra_data_size),
                );
            }
            if sn.l1_table_offset % cs != 0 {
                self.incomplete = true;
                self.corruption(
                    "snapshot",
                    Some(sn.entry_offset),
                    None,
                    format!(
                        "snapshot {} ({}) l1_offset=0x{:x}: L1 table is not cluster aligned; snapshot table entry corrupted",
                        sn.id, sn.name, sn.l1_table_offset
                    ),
                );
                continue;
            }
            if sn.l1_size > MAX_L1_ENTRIES {
                self.incomplete = true;
                self.corruption(
                    "snapshot",
                    Some(sn.entry_offset),
                    None,
                    format!("snapshot {} ({}) l1_size={}: L1 table is too large", sn.id, sn.name, sn.l1_size),
                );
                continue;
            }
            let what = format!("L1 table of snapshot {} ({})", sn.id, sn.name);
            self.walk_l1(sn.l1_table_offset, sn.l1_size, false, &what)?;
        }
        self.inc(h.snapshots_offset, snapshots.size, &|| "snapshot table".into(), None)?;
        self.claim(h.snapshots_offset, snapshots.size, &|| "snapshot table".into(), None);

        // Refcount table.
        let reftable_bytes = u64::from(h.refcount_table_clusters) * cs;
        if h.refcount_table_offset != 0 {
            self.inc(h.refcount_table_offset, reftable_bytes, &|| "refcount table".into(), None)?;
            self.claim(h.refcount_table_offset, reftable_bytes, &|| "refcount table".into(), None);
        }

        // Encryption header.
        if let Some((off, len)) = h.crypto_header() {
            self.inc(off, len, &|| "encryption header".into(), None)?;
            self.claim(off, len, &|| "encryption header".into(), None);
        }

        // Bitmaps (only when the extension is marked consistent, as QEMU).
        if h.autoclear_features & crate::format::AUTOCLEAR_BITMAPS != 0 {
            self.walk_bitmaps()?;
        }

        self.walk_refblocks()?;
        Ok(snapshots)
    }

    fn walk_bitmaps(&mut self) -> Result<()> {
        let h = self.h;
        let cs = h.cluster_size();
        let Some(ext) = h.bitmaps() else { return Ok(()) };
        self.inc(ext.bitmap_directory_offset, ext.bitmap_directory_size, &|| "bitmap directory".into(), None)?;
        self.claim(ext.bitmap_directory_offset, ext.bitmap_directory_size, &|| "bitmap directory".into(), None);
        let dir = match read_bitmap_directory(self.raw, h) {
            Ok(d) => d,
            Err(e) => {
                self.counts.check_errors += 1;
                self.incomplete = true;
                self.problem(
                    "bitmap",
                    Some(ext.bitmap_directory_offset),
                    None,
                    format!("cannot read the bitmap directory: {e}"),
                );
                return Ok(());
            }
        };
        for b in dir {
            let bytes = u64::from(b.bitmap_table_size) * 8;
            let name = b.name.clone();
            self.inc(b.bitmap_table_offset, bytes, &|| format!("bitmap table of '{name}'"), None)?;
            self.claim(b.bitmap_table_offset, bytes, &|| format!("bitmap table of '{name}'"), None);
            let Some(table) = self.read_present(b.bitmap_table_offset, bytes, "bitmap table") else { continue };
            for (j, e) in table.chunks_exact(8).map(crate::format::be_u64).enumerate() {
                let off = e & L2E_OFFSET_MASK;
                if off != 0 {
                    self.inc(off, cs, &|| format!("bitmap '{name}' data cluster {j}"), None)?;
                    self.claim(off, cs, &|| format!("bitmap '{name}' data cluster {j}"), None);
                }
            }
        }
        Ok(())
    }

    /// QEMU's `check_refblocks`.
    fn walk_refblocks(&mut self) -> Result<()> {
        let h = self.h;
        let cs = h.cluster_size();
        if h.refcount_table_offset == 0 || h.refcount_table_clusters == 0 {
            self.rebuild = true;
            self.problem(
                "no-refcount-table",
                Some(field_offset::REFCOUNT_TABLE_OFFSET),
                None,
                "the header names no refcount table".into(),
            );
            return Ok(());
        }
        let Some(table) =
            self.read_present(h.refcount_table_offset, u64::from(h.refcount_table_clusters) * cs, "refcount table")
        else {
            self.rebuild = true;
            return Ok(());
        };
        for (i, e) in table.chunks_exact(8).map(crate::format::be_u64).enumerate() {
            let entry_at = h.refcount_table_offset + 8 * i as u64;
            if e & REFT_RESERVED_MASK != 0 {
                self.rebuild = true;
                self.corruption(
                    "refblock",
                    Some(entry_at),
                    None,
                    format!("refcount block {i} (reftable entry 0x{e:x}) has reserved bits set"),
                );
                continue;
            }
            let off = e & REFT_OFFSET_MASK;
            if off % cs != 0 {
                self.rebuild = true;
                self.corruption(
                    "refblock",
                    Some(entry_at),
                    None,
                    format!("refcount block {i} at 0x{off:x} is not cluster aligned; refcount table entry corrupted"),
                );
                continue;
            }
            if off != 0 && (off >> h.cluster_bits) >= self.imrt.len() {
                // QEMU grows the file to make room; qcowrs rebuilds instead (no file growth).
                self.rebuild = true;
                self.corruption(
                    "refblock",
                    Some(entry_at),
                    None,
                    format!("refcount block {i} at 0x{off:x} is outside the image"),
                );
                continue;
            }
            if off != 0 {
                self.inc(off, cs, &|| format!("refcount block {i}"), None)?;
                self.claim(off, cs, &|| format!("refcount block {i}"), None);
                let r = self.imrt.get(off >> h.cluster_bits);
                if r != 1 {
                    self.rebuild = true;
                    self.corruption(
                        "refblock",
                        Some(off),
                        None,
                        format!("refcount block {i} at 0x{off:x} has refcount={r}: it overlaps other data or metadata"),
                    );
                }
            }
        }
        Ok(())
    }

    /// QEMU's `check_refcounts_l1` (and `_l2`), for the active tree or a snapshot's.
    fn walk_l1(&mut self, l1_offset: u64, l1_size: u32, active: bool, what: &str) -> Result<()> {
        let h = self.h;
        let cs = h.cluster_size();
        let bytes = u64::from(l1_size) * 8;
        self.inc(l1_offset, bytes, &|| what.to_string(), None)?;
        if active {
            self.claim(l1_offset, bytes, &|| what.to_string(), None);
        }
        let Some(l1) = self.read_present(l1_offset, bytes, what) else { return Ok(()) };
        let l2_span = h.l2_entries() * cs;
        for (i, e) in l1.chunks_exact(8).map(crate::format::be_u64).enumerate() {
            if e == 0 {
                continue;
            }
            let guest = (i as u64).checked_mul(l2_span);
            if e & L1E_RESERVED_MASK != 0 {
                self.corruption(
                    "reserved-bits",
                    Some(l1_offset + 8 * i as u64),
                    guest,
                    format!("{what}[{i}] = 0x{e:x} has reserved bits set"),
                );
            }
            let l2 = e & L1E_OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            let l2what = format!("L2 table {i} of the {what}");
            self.inc(l2, cs, &|| l2what.clone(), guest)?;
            if active {
                self.claim(l2, cs, &|| l2what.clone(), guest);
            }
            if l2 % cs != 0 {
                self.corruption(
                    "misaligned",
                    Some(l2),
                    guest,
                    format!("{l2what} at 0x{l2:x} is not cluster aligned; L1 entry corrupted"),
                );
                continue;
            }
            self.walk_l2(l2, guest.unwrap_or(0), active, &l2what)?;
        }
        Ok(())
    }

    fn walk_l2(&mut self, l2_offset: u64, guest_base: u64, active: bool, what: &str) -> Result<()> {
        let h = self.h;
        let cs = h.cluster_size();
        let extended = h.extended_l2();
        let data_file = h.has_data_file();
        let Some(table) = self.read_present(l2_offset, cs, what) else { return Ok(()) };
        let stride = if extended { 16 } else { 8 };
        let mut next_contiguous = 0u64;
        for (j, chunk) in table.chunks_exact(stride).enumerate() {
            let entry = crate::format::be_u64(&chunk[..8]);
            let bitmap = if extended { crate::format::be_u64(&chunk[8..16]) } else { 0 };
            if entry == 0 && bitmap == 0 {
                continue;
            }
            let guest = guest_base + j as u64 * cs;
            let entry_at = l2_offset + (j * stride) as u64;
            let kind = classify(entry, extended, data_file);
            if kind != L2Kind::Compressed && entry & L2E_STD_RESERVED_MASK != 0 {
                self.corruption(
                    "reserved-bits",
                    Some(entry_at),
                    Some(guest),
                    format!("L2 entry 0x{entry:x} at 0x{entry_at:x} has reserved bits set"),
                );
            }
            match kind {
                L2Kind::Compressed => {
                    if entry & L2E_COPIED != 0 {
                        self.corruption(
                            "copied-flag",
                            Some(entry_at),
                            Some(guest),
                            format!("compressed cluster for guest 0x{guest:x}: the copied flag must never be set for compressed clusters"),
                        );
                    }
                    if data_file {
                        self.corruption(
                            "compressed",
                            Some(entry_at),
                            Some(guest),
                            "compressed cluster in an image with an external data file".into(),
                        );
                        continue;
                    }
                    if extended && bitmap != 0 {
                        self.corruption(
                            "subcluster-bitmap",
                            Some(entry_at),
                            Some(guest),
                            format!("compressed cluster with a non-zero subcluster bitmap 0x{bitmap:x}"),
                        );
                        continue;
                    }
                    let (coff, clen) = self.layout.decode(entry & !(L2E_COPIED | L2E_COMPRESSED));
                    self.inc(coff, clen, &|| format!("compressed cluster for guest 0x{guest:x}"), Some(guest))?;
                    if active {
                        self.counts.allocated_clusters += 1;
                        self.counts.compressed_clusters += 1;
                        self.counts.fragmented_clusters += 1;
                    }
                }
                L2Kind::Normal | L2Kind::ZeroAlloc => {
                    if extended && (bitmap >> 32) & bitmap != 0 {
                        self.corruption(
                            "subcluster-bitmap",
                            Some(entry_at),
                            Some(guest),
                            format!("invalid subcluster bitmap 0x{bitmap:x} (subclusters both allocated and zero)"),
                        );
                    }
                    let off = entry & L2E_OFFSET_MASK;
                    if active {
                        self.counts.allocated_clusters += 1;
                        if next_contiguous != 0 && off != next_contiguous {
                            self.counts.fragmented_clusters += 1;
                        }
                        next_contiguous = off + cs;
                    }
                    if off % cs != 0 {
                        self.corruption(
                            "misaligned",
                            Some(entry_at),
                            Some(guest),
                            format!("data offset 0x{off:x} for guest 0x{guest:x} is not cluster aligned; L2 entry corrupted (not repairable)"),
                        );
                    }
                    if !data_file {
                        self.inc(off, cs, &|| format!("data cluster for guest 0x{guest:x}"), Some(guest))?;
                        if active {
                            self.claim(off, cs, &|| format!("data cluster for guest 0x{guest:x}"), Some(guest));
                        }
                    }
                }
                L2Kind::ZeroPlain => {}
                L2Kind::Unallocated => {
                    if extended && bitmap & 0xffff_ffff != 0 {
                        self.corruption(
                            "subcluster-bitmap",
                            Some(entry_at),
                            Some(guest),
                            format!("unallocated cluster with allocated subclusters (bitmap 0x{bitmap:x})"),
                        );
                    }
                }
            }
        }
        Ok(())
    }
}

pub(crate) fn classify_l2(entry: u64, extended: bool, data_file: bool) -> L2Kind {
    classify(entry, extended, data_file)
}

/// Where the new structure went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NewStructure {
    /// Offset of the new reftable.
    pub reftable_offset: u64,
    /// Clusters of the new reftable.
    pub reftable_clusters: u32,
    /// Refblocks written.
    pub refblocks: u64,
}

/// First-fit allocation of `n` contiguous clusters that are free in `imrt` and not referenced
/// past the end of the file, from cluster `*hint` on; marks them used (refcount 1). `*hint`
/// is kept at the first cluster that may be free, so successive allocations do not rescan the
/// used part of the image.
fn alloc_clusters(imrt: &mut Imrt, n: u64, hint: &mut u64, avoid: &BTreeSet<u64>) -> Result<u64> {
    let mut run_start = *hint;
    let mut run = 0u64;
    let mut c = *hint;
    let mut first_free: Option<u64> = None;
    while run < n {
        if imrt.get(c) == 0 && !avoid.contains(&c) {
            first_free.get_or_insert(c);
            if run == 0 {
                run_start = c;
            }
            run += 1;
        } else {
            run = 0;
        }
        c += 1;
    }
    for k in run_start..run_start + n {
        imrt.set(k, 1)?;
    }
    let first_free = first_free.unwrap_or(run_start);
    *hint = if first_free == run_start { run_start + n } else { first_free };
    Ok(run_start)
}

/// Allocates, writes and commits a new refcount structure describing `imrt` (which must count
/// every live cluster, the old structure included). `append_only` places it past the end of the
/// file (used when the walk was incomplete, so that no uncounted cluster is overwritten).
pub fn write_refcount_structure(
    raw: &mut QcowRawFile,
    h: &mut QcowHeader,
    imrt: &mut Imrt,
    append_only: bool,
    avoid: &BTreeSet<u64>,
) -> Result<NewStructure> {
    let geo = raw.refcount_geometry();
    let cb = geo.cluster_bits;
    let cs = 1u64 << cb;
    let ptrs_per_cluster = cs / 8;
    let file_clusters = raw.file_len().div_ceil(cs);
    let start = if append_only { file_clusters.max(imrt.len()) } else { 0 };
    let mut hint = start;

    // Phase 1: allocate until stable. Nothing is written yet, so an allocation can be undone.
    let mut reftable: Vec<u64> = Vec::new();
    let mut reftable_at: Option<(u64, u64)> = None; // (first cluster, clusters)
    loop {
        let mut changed = false;
        let mut ri = 0;
        while ri < imrt.refblocks() {
            let have = reftable.get(usize::try_from(ri).unwrap_or(usize::MAX)).copied().unwrap_or(0) != 0;
            if !have && !imrt.refblock_is_empty(ri) {
                let c = alloc_clusters(imrt, 1, &mut hint, avoid)?;
                let idx =
                    usize::try_from(ri).map_err(|_| Error::InvalidRefcountTableSize("too many refblocks".into()))?;
                if reftable.len() <= idx {
                    reftable.resize(idx + 1, 0);
                }
                reftable[idx] = c << cb;
                changed = true;
            }
            ri += 1;
        }
        let entries = reftable.iter().rposition(|&e| e != 0).map_or(1, |p| p + 1) as u64;
        let clusters = entries.div_ceil(ptrs_per_cluster).max(1);
        if reftable_at.map(|(_, n)| n) != Some(clusters) {
            if let Some((first, n)) = reftable_at.take() {
                for k in first..first + n {
                    imrt.set(k, 0)?;
                }
                hint = hint.min(first);
            }
            let first = alloc_clusters(imrt, clusters, &mut hint, avoid)?;
            reftable_at = Some((first, clusters));
            changed = true;
        }
        if !changed {
            break;
        }
    }
    let (rt_first, rt_clusters) =
        reftable_at.ok_or_else(|| Error::InvalidRefcountTableSize("no reftable allocated".into()))?;
    let reftable_clusters = u32::try_from(rt_clusters)
        .map_err(|_| Error::InvalidRefcountTableSize(format!("a reftable of {rt_clusters} clusters is too large")))?;
    reftable.resize(usize::try_from(rt_clusters * ptrs_per_cluster).unwrap_or(0), 0);

    // Phase 2: write refblocks and the reftable into free clusters, make them durable.
    let mut refblocks = 0;
    for (ri, &off) in reftable.iter().enumerate() {
        if off != 0 {
            raw.write_at(&imrt.refblock_bytes(ri as u64), off, "new refcount block")?;
            refblocks += 1;
        }
    }
    let rt_offset = rt_first << cb;
    raw.write_pointer_table(rt_offset, &reftable, 0)?;
    raw.sync()?;

    // Phase 3: the commit point. One write switches offset and size together.
    let mut commit = [0u8; 12];
    commit[..8].copy_from_slice(&rt_offset.to_be_bytes());
    commit[8..].copy_from_slice(&reftable_clusters.to_be_bytes());
    raw.write_at(
        &commit,
        field_offset::REFCOUNT_TABLE_OFFSET,
        "header (refcount_table_offset, refcount_table_clusters)",
    )?;
    raw.sync()?;
    h.refcount_table_offset = rt_offset;
    h.refcount_table_clusters = reftable_clusters;
    Ok(NewStructure { reftable_offset: rt_offset, reftable_clusters, refblocks })
}

/// The seed's entry point: recounts every reference of the image and writes a fresh refcount
/// structure (no other repair). Prefer `check::check_image` with `Repair::All`, which also fixes
/// leaks of the old structure and OFLAG_COPIED.
pub fn rebuild_refcounts(raw: &mut QcowRawFile, h: &mut QcowHeader) -> Result<NewStructure> {
    let hc = h.clone();
    let (mut imrt, incomplete, avoid) = {
        let mut w = Walker::new(raw, &hc)?;
        w.walk()?;
        (w.imrt, w.incomplete, w.beyond_eof)
    };
    write_refcount_structure(raw, h, &mut imrt, incomplete, &avoid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imrt_get_set_every_width() {
        for order in 0..=6 {
            let geo = RefcountGeometry { cluster_bits: 9, refcount_order: order };
            let mut t = Imrt::new(geo, 10).unwrap();
            let max = geo.refcount_max();
            for i in 0..5000u64 {
                t.set(i, (i * 3 + 1) & max).unwrap();
            }
            for i in 0..5000u64 {
                assert_eq!(t.get(i), (i * 3 + 1) & max, "order {order} index {i}");
            }
            // The bytes are the on-disk encoding, compact chunks included.
            let decoded = crate::format::decode_refcounts(&t.refblock_bytes(0), order);
            assert_eq!(decoded[1], 4 & max);
            let mut small = Imrt::new(geo, 10).unwrap();
            small.set(5, 2).unwrap();
            small.set(9, 1).unwrap();
            let d = crate::format::decode_refcounts(&small.refblock_bytes(0), order);
            assert_eq!((d[5], d[9], d[0]), (2 & max, 1, 0));
        }
    }

    #[test]
    fn alloc_skips_used_and_avoided() {
        let geo = RefcountGeometry { cluster_bits: 16, refcount_order: 4 };
        let mut t = Imrt::new(geo, 4).unwrap();
        t.set(0, 1).unwrap();
        t.set(2, 1).unwrap();
        let avoid: BTreeSet<u64> = [1].into_iter().collect();
        let mut hint = 0;
        assert_eq!(alloc_clusters(&mut t, 1, &mut hint, &avoid).unwrap(), 3);
        assert_eq!(hint, 4);
        t.set(1, 0).unwrap();
        assert_eq!(alloc_clusters(&mut t, 2, &mut hint, &avoid).unwrap(), 4);
        assert_eq!(hint, 6);
        assert_eq!(t.len(), 6);
    }
}
