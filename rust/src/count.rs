//! Counting every reference of an image into an [`Imrt`] (QEMU's `calculate_refcounts` and
//! `check_refblocks`), judging each structure the way `qemu-img check` does. A visitor of the
//! walker; check and rebuild use what it counts.

use std::collections::{BTreeSet, HashMap};

use crate::error::{Error, Result};
use crate::format::{
    l1_entry_has_reserved_bits, l1_entry_l2_offset, ClusterType, L2Defect, L2Geometry, REFT_OFFSET_MASK,
    REFT_RESERVED_MASK,
};
use crate::header::{field_offset, QcowHeader};
use crate::raw_file::QcowRawFile;
use crate::rebuild::Imrt;
use crate::report::{Counts, ProblemLog};
use crate::walk::{Event, Flow, Fork, Structure, Tree, Visitor, Walker};

/// QEMU's limit on an L1 table, in entries.
const MAX_L1_ENTRIES: u32 = 4 << 20;
/// At most this many clusters referenced past the end of the file are remembered.
const MAX_BEYOND_EOF: usize = 1 << 20;

/// Every reference of an image, counted, with the problems found on the way.
pub struct ReferenceCount {
    /// The counted references.
    pub imrt: Imrt,
    /// Counters (corruptions and check_errors found while walking, cluster statistics).
    pub counts: Counts,
    /// Problems found.
    pub problems: ProblemLog,
    /// The refcount structure must be rebuilt (a refblock is unsane, or there is none).
    pub rebuild: bool,
    /// Something could not be walked (a snapshot skipped, a table unreadable): the counts may
    /// miss live clusters, so repairs must not free clusters or allocate in holes.
    pub incomplete: bool,
    /// Clusters referenced one cluster or more past the end of the file (not counted); an
    /// allocation must never land on them, or the reference would start to read our data.
    pub beyond_eof: BTreeSet<u64>,
    /// With `see_copied`: the OFLAG_COPIED bits the active tree uses.
    pub copied_seen: Option<CopiedSeen>,
    /// L1 and L2 entries whose L2 table or data lies past the end of the file (their data is
    /// lost; a repair clears them), at most [`MAX_BEYOND_EOF`].
    pub dangling: Vec<Dangling>,
    /// How many L1 entries (of every tree) name each L2 table (by cluster index): a table may
    /// be rewritten only if nothing but L1 entries refers to its cluster.
    pub l2_table_refs: HashMap<u64, u64>,
    /// Clusters referenced more often than the refcount width can count (the counts say
    /// nothing about what else uses them), at most [`MAX_BEYOND_EOF`].
    pub overflowed: BTreeSet<u64>,
    /// What is wrong with the active L1 table itself (misplaced, too small, too large), if
    /// anything: a repair moves it.
    pub l1_problem: Option<String>,
    /// The snapshot table needs a repair (unreadable, invalid or incomplete entries, or past
    /// the end of the file).
    pub snapshots_damaged: bool,
    /// Why no repair can keep every readable byte, if that is so (a repair then refuses).
    pub unrepairable: Vec<(u64, String)>,
    /// The offset of a crypto header extension on an unencrypted image (QEMU refuses such an
    /// image; a repair renames the extension).
    pub stray_crypto_ext: Option<u64>,
    /// Why the persistent bitmaps cannot be used, if they cannot (a repair gives them up).
    pub bitmaps_damaged: Option<String>,
}

/// An entry pointing past the end of the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dangling {
    /// Host offset of the entry.
    pub at: u64,
    /// Host offset of the table holding it (an L1 or L2 table).
    pub table: u64,
    /// An L1 entry (else an L2 entry).
    pub l1: bool,
    /// In the active tree.
    pub active: bool,
    /// The guest offset it maps, if known.
    pub guest: Option<u64>,
    /// What a repair does to it.
    pub fix: EntryFix,
}

/// How a repair mends an entry: the words it gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryFix {
    /// Cleared (an L1 entry to 0, an L2 entry to a zero cluster): what it pointed at lies past
    /// the end of the file or at a misaligned offset, so nothing of it was readable.
    Clear,
    /// Set to these words (the descriptor, and with extended L2 the bitmap): reserved bits or
    /// contradicting bitmap bits removed, keeping what reads.
    Set(u64, u64),
    /// A compressed cluster `(offset, length)` whose range runs past the end of the file: kept
    /// with its range cut to the file if its stream decompresses from what is there, else
    /// cleared.
    Compressed(u64, u64),
}

impl ReferenceCount {
    /// Whether the cluster at `offset` may be rewritten as an L2 table: only L1 entries refer
    /// to it (no other structure, no data, no overflowed count).
    pub fn only_an_l2_table(&self, offset: u64, cluster_bits: u32) -> bool {
        let c = offset >> cluster_bits;
        let refs = self.l2_table_refs.get(&c).copied().unwrap_or(0);
        refs > 0 && self.imrt.get(c) == refs && !self.overflowed.contains(&c)
    }
}

/// Which clusters the active tree references with OFLAG_COPIED set, and which without (one bit
/// per cluster of the file each). A flag can only be wrong where these disagree with the
/// refcounts, so a check compares them with the refblocks instead of walking every L2 table
/// again.
#[derive(Debug, Default)]
pub struct CopiedSeen {
    /// Referenced with the flag set.
    pub set: Vec<u64>,
    /// Referenced with the flag clear.
    pub clear: Vec<u64>,
    /// A flagged reference lies past the end of the file (not recorded).
    pub beyond_file: bool,
}

impl CopiedSeen {
    fn new(clusters: u64) -> Self {
        let words = usize::try_from(clusters.div_ceil(64)).unwrap_or(0);
        CopiedSeen { set: vec![0; words], clear: vec![0; words], beyond_file: false }
    }

    fn note(&mut self, cluster: u64, copied: bool) {
        let w = usize::try_from(cluster / 64).unwrap_or(usize::MAX);
        let v = if copied { &mut self.set } else { &mut self.clear };
        match v.get_mut(w) {
            Some(word) => *word |= 1 << (cluster % 64),
            None => self.beyond_file = true,
        }
    }
}

/// Walks the whole image and counts every reference; with `see_copied`, also records the
/// OFLAG_COPIED bits of the active tree ([`CopiedSeen`]).
pub fn count_references(raw: &QcowRawFile, h: &QcowHeader, see_copied: bool) -> Result<ReferenceCount> {
    let walker = Walker::new(raw, h);
    let mut c = Counter::new(raw, h, walker.geometry())?;
    if see_copied && !h.has_data_file() {
        c.out.copied_seen = Some(CopiedSeen::new(raw.file_clusters()));
    }
    walker.walk_all_forked(&mut c)?;
    Ok(c.into_count())
}

/// The message of an L2 entry defect.
fn defect_message(d: L2Defect, e: crate::format::L2Entry, at: u64, guest: u64) -> String {
    let entry = e.entry;
    match d {
        L2Defect::ReservedBits => format!("L2 entry 0x{entry:x} at 0x{at:x} has reserved bits set"),
        L2Defect::CompressedCopied => {
            format!(
                "compressed cluster for guest 0x{guest:x}: the copied flag must never be set for compressed clusters"
            )
        }
        L2Defect::CompressedWithDataFile => "compressed cluster in an image with an external data file".to_string(),
        L2Defect::CompressedWithBitmap => {
            format!("compressed cluster with a non-zero subcluster bitmap 0x{:x}", e.bitmap)
        }
        L2Defect::AllocatedAndZero => {
            format!("invalid subcluster bitmap 0x{:x} (subclusters both allocated and zero)", e.bitmap)
        }
        L2Defect::UnallocatedWithAllocBits => {
            format!("unallocated cluster with allocated subclusters (bitmap 0x{:x})", e.bitmap)
        }
        L2Defect::Misaligned(off) => {
            format!("data offset 0x{off:x} for guest 0x{guest:x} is not cluster aligned; L2 entry corrupted (not repairable)")
        }
    }
}

/// The line `qemu-img check` prints for an L2 entry defect, where the test suite has seen it.
fn qemu_defect_line(d: L2Defect, e: crate::format::L2Entry) -> Option<String> {
    let entry = e.entry;
    match d {
        L2Defect::ReservedBits => Some(format!("ERROR found l2 entry with reserved bits set: {entry:x}")),
        L2Defect::Misaligned(off) => {
            Some(format!("ERROR offset={off:x}: Data cluster is not properly aligned; L2 entry corrupted."))
        }
        _ => None,
    }
}

/// The counting visitor.
pub(crate) struct Counter<'a> {
    h: &'a QcowHeader,
    geo: L2Geometry,
    file_len: u64,
    out: ReferenceCount,
    /// Clusters claimed by the active tree and other unshared metadata (cross-link detection).
    claimed: Vec<u64>,
    /// Fragmentation: the host offset the next data cluster of the current table would have
    /// if contiguous (0 at the start of a table).
    next_contiguous: u64,
    /// The L1 and L2 tables being walked (for `Dangling`).
    cur_l1: u64,
    cur_l2: u64,
}

impl<'a> Counter<'a> {
    pub(crate) fn new(raw: &QcowRawFile, h: &'a QcowHeader, geo: L2Geometry) -> Result<Self> {
        let file_len = raw.file_len();
        let nb_clusters = raw.file_clusters();
        let imrt = Imrt::new(raw.refcount_geometry(), nb_clusters)?;
        let claimed = vec![0u64; usize::try_from(nb_clusters.div_ceil(64) + 1).unwrap_or(1)];
        let counts = Counts { total_clusters: h.size.div_ceil(h.cluster_size()), ..Counts::default() };
        Ok(Counter {
            h,
            geo,
            file_len,
            out: ReferenceCount {
                imrt,
                counts,
                problems: ProblemLog::default(),
                rebuild: false,
                incomplete: false,
                beyond_eof: BTreeSet::new(),
                copied_seen: None,
                dangling: Vec::new(),
                l2_table_refs: HashMap::new(),
                overflowed: BTreeSet::new(),
                l1_problem: None,
                snapshots_damaged: false,
                unrepairable: Vec::new(),
                stray_crypto_ext: None,
                bitmaps_damaged: None,
            },
            claimed,
            next_contiguous: 0,
            cur_l1: 0,
            cur_l2: 0,
        })
    }

    pub(crate) fn into_count(self) -> ReferenceCount {
        self.out
    }

    /// A corruption whose message is made only if it will be listed.
    fn corruption_with(
        &mut self,
        kind: &'static str,
        host: Option<u64>,
        guest: Option<u64>,
        message: impl FnOnce() -> String,
    ) {
        self.out.counts.corruptions += 1;
        self.out.problems.push_with(kind, host, guest, message);
    }

    /// A corruption with the line `qemu-img check` prints for it.
    fn corruption_qemu(
        &mut self,
        kind: &'static str,
        host: Option<u64>,
        guest: Option<u64>,
        message: impl FnOnce() -> String,
        qemu: impl FnOnce() -> String,
    ) {
        self.out.counts.corruptions += 1;
        self.out.problems.push_qemu(kind, host, guest, message, qemu);
    }

    /// An L2 entry defect, with QEMU's line where it has one.
    fn defect(&mut self, kind: &'static str, d: L2Defect, e: crate::format::L2Entry, at: u64, guest: u64) {
        let msg = || defect_message(d, e, at, guest);
        match qemu_defect_line(d, e) {
            Some(q) => self.corruption_qemu(kind, Some(at), Some(guest), msg, || q),
            None => self.corruption_with(kind, Some(at), Some(guest), msg),
        }
    }

    fn corruption(&mut self, kind: &'static str, host: Option<u64>, guest: Option<u64>, message: String) {
        self.out.counts.corruptions += 1;
        self.out.problems.push(kind, host, guest, message);
    }

    /// QEMU's `qcow2_inc_refcounts_imrt`: +1 for every cluster touched by `[offset, offset+size)`.
    /// Returns `false` when the region lies past the end of the file (not counted).
    fn inc(&mut self, offset: u64, size: u64, what: &dyn Fn() -> String, guest: Option<u64>) -> Result<bool> {
        if size == 0 {
            return Ok(true);
        }
        let cb = self.h.cluster_bits;
        let cs = 1u64 << cb;
        // The common case: one whole cluster inside the file.
        if size == cs && offset & (cs - 1) == 0 && offset < self.file_len && self.out.imrt.increment(offset >> cb)? {
            return Ok(true);
        }
        let Some(end) = offset.checked_add(size) else {
            let msg = || format!("{}: offset 0x{offset:x} size 0x{size:x} overflows", what());
            self.corruption_with("reference-past-eof", Some(offset), guest, msg);
            return Ok(false);
        };
        let file_len = self.file_len;
        if end >= file_len.saturating_add(cs) {
            let msg = || {
                format!(
                    "{}: region 0x{offset:x}..0x{end:x} exceeds the end of the file (0x{file_len:x}) by one cluster or more; its data is lost",
                    what()
                )
            };
            let qemu = || {
                format!("ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x{offset:x} size 0x{size:x}")
            };
            self.corruption_qemu("reference-past-eof", Some(offset), guest, msg, qemu);
            return Ok(false);
        }
        for k in (offset >> cb)..=((end - 1) >> cb) {
            if !self.out.imrt.increment(k)? {
                let geo = self.out.imrt.geometry();
                let msg = || {
                    format!(
                        "{}: cluster 0x{:x} is referenced more than the {}-bit refcount maximum {} allows; increase refcount_bits (qemu-img amend) or convert the image",
                        what(),
                        k << cb,
                        geo.refcount_bits(),
                        geo.refcount_max()
                    )
                };
                self.corruption_with("refcount-overflow", Some(k << cb), guest, msg);
                if self.out.overflowed.len() < MAX_BEYOND_EOF {
                    self.out.overflowed.insert(k);
                }
                if self.out.unrepairable.is_empty() {
                    let why = format!(
                        "cluster 0x{:x} is referenced more often than {}-bit refcounts can count",
                        k << cb,
                        geo.refcount_bits()
                    );
                    self.out.unrepairable.push((k << cb, why));
                }
            }
        }
        Ok(true)
    }

    /// A reference an allocation could alias lies past the end of the file: remember its
    /// clusters (a new allocation must not land there) and the entry (a repair clears it).
    fn dangling(&mut self, offset: u64, size: u64, at: u64, l1: bool, active: bool, guest: Option<u64>) {
        let cb = self.h.cluster_bits;
        let end = offset.saturating_add(size.max(1));
        for k in (offset >> cb)..=((end - 1) >> cb) {
            if self.out.beyond_eof.len() > MAX_BEYOND_EOF {
                break;
            }
            self.out.beyond_eof.insert(k);
        }
        self.fix_entry(at, l1, active, guest, EntryFix::Clear);
    }

    /// Records how a repair mends the entry at `at` (of the L1 or L2 table being walked).
    fn fix_entry(&mut self, at: u64, l1: bool, active: bool, guest: Option<u64>, fix: EntryFix) {
        if self.out.dangling.len() < MAX_BEYOND_EOF {
            let table = if l1 { self.cur_l1 } else { self.cur_l2 };
            self.out.dangling.push(Dangling { at, table, l1, active, guest, fix });
        }
    }

    /// Claims clusters for an unshared structure; a second claim is a cross-link.
    fn claim(&mut self, offset: u64, size: u64, what: &dyn Fn() -> String, guest: Option<u64>) {
        if size == 0 {
            return;
        }
        let cb = self.h.cluster_bits;
        let Some(end) = offset.checked_add(size) else { return };
        // Only clusters the bitmap covers (the file's) can be claimed twice; a region far past
        // the end of the file must not cost a loop over its clusters.
        let covered = (self.claimed.len() as u64).saturating_mul(64);
        let last = ((end - 1) >> cb).min(covered.saturating_sub(1));
        if covered == 0 || offset >> cb > last {
            return;
        }
        for k in (offset >> cb)..=last {
            let Some(word) = usize::try_from(k / 64).ok().and_then(|w| self.claimed.get_mut(w)) else { continue };
            let bit = 1u64 << (k % 64);
            if *word & bit == 0 {
                *word |= bit;
                continue;
            }
            let msg = || {
                format!(
                    "{}: cluster 0x{:x} is also used by another structure of the active image; without a snapshot to share it, one of the two loses its data (QEMU silently treats it as shared)",
                    what(),
                    k << cb
                )
            };
            self.out.problems.push_with("cross-link", Some(k << cb), guest, msg);
        }
    }

    /// Counts (and, when `unshared`, claims) a structure's bytes.
    /// Counts (and, when `unshared`, claims) a structure's bytes; `false` if they lie past the
    /// end of the file.
    fn count(
        &mut self,
        offset: u64,
        size: u64,
        unshared: bool,
        what: &dyn Fn() -> String,
        guest: Option<u64>,
    ) -> Result<bool> {
        let inside = self.inc(offset, size, what, guest)?;
        if unshared {
            self.claim(offset, size, what, guest);
        }
        Ok(inside)
    }

    fn tree_name(&self, tree: Tree) -> String {
        match tree {
            Tree::Active => "active L1 table".into(),
            Tree::Snapshot(i) => format!("L1 table of snapshot #{i}"),
        }
    }

    fn unreadable(&mut self, what: Structure, offset: u64, error: &Error) {
        self.out.incomplete = true;
        self.out.counts.check_errors += 1;
        let (kind, msg) = match what {
            Structure::SnapshotTable => {
                self.out.snapshots_damaged = true;
                ("snapshot-table", format!("cannot read the snapshot table: {error}"))
            }
            Structure::BitmapDirectory => {
                self.out.bitmaps_damaged.get_or_insert_with(|| format!("the bitmap directory cannot be read: {error}"));
                ("bitmap", format!("cannot read the bitmap directory: {error}"))
            }
            Structure::Reftable => {
                self.out.rebuild = true;
                ("io-error", format!("reading the refcount table: {error}"))
            }
            Structure::L1Table(t) => ("io-error", format!("reading the {}: {error}", self.tree_name(t))),
            Structure::L2Table(_) => ("io-error", format!("reading an L2 table: {error}")),
            Structure::BitmapTable => {
                self.out.bitmaps_damaged.get_or_insert_with(|| format!("a bitmap table cannot be read: {error}"));
                ("io-error", format!("reading a bitmap table: {error}"))
            }
        };
        self.out.problems.push(kind, Some(offset), None, msg);
    }

    fn l1_entry(&mut self, tree: Tree, index: u64, at: u64, entry: u64) -> Result<Flow> {
        let guest = index.checked_mul(self.geo.bytes_per_table());
        let what = self.tree_name(tree);
        if l1_entry_has_reserved_bits(entry) {
            self.corruption(
                "reserved-bits",
                Some(at),
                guest,
                format!("{what}[{index}] = 0x{entry:x} has reserved bits set"),
            );
            let fixed = entry & !crate::format::L1E_RESERVED_MASK;
            self.fix_entry(at, true, tree.is_active(), guest, EntryFix::Set(fixed, 0));
        }
        let l2 = l1_entry_l2_offset(entry);
        if l2 == 0 {
            return Ok(Flow::Skip);
        }
        if let (true, Some(seen)) = (tree.is_active(), self.out.copied_seen.as_mut()) {
            seen.note(l2 >> self.geo.cluster_bits, crate::format::l1_entry_is_copied(entry));
        }
        let l2what = format!("L2 table {index} of the {what}");
        *self.out.l2_table_refs.entry(l2 >> self.geo.cluster_bits).or_insert(0) += 1;
        if !self.count(l2, self.geo.cluster_size(), tree.is_active(), &|| l2what.clone(), guest)? {
            self.dangling(l2, self.geo.cluster_size(), at, true, tree.is_active(), guest);
            return Ok(Flow::Skip);
        }
        if l2 % self.geo.cluster_size() != 0 {
            let msg = || format!("{l2what} at 0x{l2:x} is not cluster aligned; L1 entry corrupted");
            let qemu = || format!("ERROR l2_offset={l2:x}: Table is not cluster aligned; L1 entry corrupted");
            self.corruption_qemu("misaligned", Some(l2), guest, msg, qemu);
            self.fix_entry(at, true, tree.is_active(), guest, EntryFix::Clear);
            return Ok(Flow::Skip);
        }
        Ok(Flow::Continue)
    }

    fn l2_entry(&mut self, tree: Tree, guest: u64, at: u64, e: crate::format::L2Entry) -> Result<()> {
        let active = tree.is_active();
        if self.geo.is_clean_data(e) && self.count_clean_data(e.host_offset(), active, e.is_copied()) {
            self.stats(ClusterType::Normal, e.host_offset(), active);
            return Ok(());
        }
        self.l2_entry_judged(active, guest, at, e)
    }

    /// Every other entry: each defect reported as QEMU does, then counted where QEMU counts.
    fn l2_entry_judged(&mut self, active: bool, guest: u64, at: u64, e: crate::format::L2Entry) -> Result<()> {
        let ty = self.geo.cluster_type(e);
        let mut counted = true;
        let mut fixed = e;
        let mut defects: [Option<L2Defect>; 4] = [None; 4];
        let mut n = 0;
        self.geo.for_each_defect(e, |d| {
            if n < defects.len() {
                defects[n] = Some(d);
                n += 1;
            }
        });
        for d in defects.into_iter().flatten() {
            let kind = match d {
                L2Defect::ReservedBits => "reserved-bits",
                L2Defect::CompressedCopied => "copied-flag",
                L2Defect::CompressedWithDataFile => {
                    counted = false;
                    if self.out.unrepairable.len() < 16 {
                        self.out.unrepairable.push((at, format!(
                            "a compressed cluster (guest 0x{guest:x}, entry at 0x{at:x}) in an image with an external data file: it is readable, but no valid entry can keep its data"
                        )));
                    }
                    "compressed"
                }
                L2Defect::CompressedWithBitmap => {
                    // QEMU does not count it: a repair clears the bitmap, which makes it valid.
                    counted = false;
                    fixed.bitmap = 0;
                    "subcluster-bitmap"
                }
                L2Defect::AllocatedAndZero => {
                    // The allocated subclusters keep their data; their zero bits go.
                    fixed.bitmap &= !((fixed.bitmap & (fixed.bitmap >> 32)) << 32);
                    "subcluster-bitmap"
                }
                L2Defect::UnallocatedWithAllocBits => {
                    fixed.bitmap &= !crate::format::SUBCLUSTER_ALL_ALLOC;
                    "subcluster-bitmap"
                }
                L2Defect::Misaligned(_) => "misaligned",
            };
            match d {
                L2Defect::ReservedBits => fixed.entry &= !crate::format::L2E_STD_RESERVED_MASK,
                L2Defect::CompressedCopied => fixed.entry &= !crate::format::L2E_COPIED,
                _ => {}
            }
            // QEMU reports a misaligned data offset after counting the cluster statistics.
            if !matches!(d, L2Defect::Misaligned(_)) {
                self.defect(kind, d, e, at, guest);
            } else {
                self.stats(ty, e.host_offset(), active);
                self.defect(kind, d, e, at, guest);
                self.count_data(e.host_offset(), guest, active, e.is_copied(), at)?;
                // Its data cannot be read at a misaligned offset: a repair makes it zero.
                self.fix_entry(at, false, active, Some(guest), EntryFix::Clear);
                return Ok(());
            }
        }
        if fixed != e {
            self.fix_entry(at, false, active, Some(guest), EntryFix::Set(fixed.entry, fixed.bitmap));
        }
        if !counted {
            return Ok(());
        }
        match ty {
            ClusterType::Compressed => {
                let (coff, clen) = self.geo.compressed_range(e);
                if !self.inc(coff, clen, &|| format!("compressed cluster for guest 0x{guest:x}"), Some(guest))? {
                    self.dangling(coff, clen, at, false, active, Some(guest));
                    // The stream itself may end inside the file: a repair then keeps it.
                    if let Some(d) = self.out.dangling.last_mut().filter(|d| d.at == at) {
                        d.fix = EntryFix::Compressed(coff, clen);
                    }
                }
                self.stats(ty, 0, active);
            }
            ClusterType::Normal | ClusterType::ZeroAlloc => {
                self.stats(ty, e.host_offset(), active);
                self.count_data(e.host_offset(), guest, active, e.is_copied(), at)?;
            }
            ClusterType::ZeroPlain | ClusterType::Unallocated => {}
        }
        Ok(())
    }

    /// The hot path of a check: one data cluster inside the file, counted and claimed without
    /// anything to report. Returns `false`, changing nothing, if there is something to report
    /// (overflow, a cross-link): the caller then takes the judged path.
    #[inline]
    fn count_clean_data(&mut self, host: u64, active: bool, copied: bool) -> bool {
        if host >= self.file_len || self.geo.data_file {
            return false;
        }
        let c = host >> self.geo.cluster_bits;
        let w = usize::try_from(c / 64).unwrap_or(usize::MAX);
        let bit = 1u64 << (c % 64);
        if active && self.claimed.get(w).is_none_or(|word| word & bit != 0) {
            return false;
        }
        if !matches!(self.out.imrt.increment(c), Ok(true)) {
            return false;
        }
        if active {
            self.claimed[w] |= bit;
            if let Some(seen) = self.out.copied_seen.as_mut() {
                seen.note(c, copied);
            }
        }
        true
    }

    /// Allocation and fragmentation statistics of the active tree.
    fn stats(&mut self, ty: ClusterType, host: u64, active: bool) {
        if !active {
            return;
        }
        let c = &mut self.out.counts;
        c.allocated_clusters += 1;
        if ty == ClusterType::Compressed {
            c.compressed_clusters += 1;
            c.fragmented_clusters += 1;
            return;
        }
        if self.next_contiguous != 0 && host != self.next_contiguous {
            c.fragmented_clusters += 1;
        }
        self.next_contiguous = host + self.geo.cluster_size();
    }

    fn count_data(&mut self, host: u64, guest: u64, active: bool, copied: bool, at: u64) -> Result<()> {
        if self.geo.data_file {
            return Ok(());
        }
        if let (true, Some(seen)) = (active, self.out.copied_seen.as_mut()) {
            seen.note(host >> self.geo.cluster_bits, copied);
        }
        let cs = self.geo.cluster_size();
        if !self.count(host, cs, active, &|| format!("data cluster for guest 0x{guest:x}"), Some(guest))? {
            self.dangling(host, cs, at, false, active, Some(guest));
        }
        Ok(())
    }

    /// An L1 table: counted (QEMU's `check_refcounts_l1`), and for the active one, checked as
    /// QEMU's open checks it (misplaced, too small or too large: the check fails, a repair
    /// moves it). A misaligned table is not walked.
    fn l1_table(&mut self, tree: Tree, offset: u64, entries: u32) -> Result<Flow> {
        self.cur_l1 = offset;
        let what = self.tree_name(tree);
        let bytes = u64::from(entries) * 8;
        if tree.is_active() {
            let problem = if offset % self.geo.cluster_size() != 0 {
                Some(format!("the active L1 table at 0x{offset:x} is not cluster aligned"))
            } else if offset == 0 && entries > 0 {
                Some("the active L1 table is at offset 0, over the header".to_string())
            } else if entries > MAX_L1_ENTRIES {
                Some(format!("the active L1 table has {entries} entries, above QEMU's limit of {MAX_L1_ENTRIES}"))
            } else if u64::from(entries) < self.h.l1_entries_needed() {
                let needed = self.h.l1_entries_needed();
                if needed > u64::from(MAX_L1_ENTRIES) {
                    let why = format!("the virtual size {} needs an L1 table above QEMU's 32 MiB limit", self.h.size);
                    self.out.unrepairable.push((crate::header::field_offset::SIZE, why));
                }
                Some(format!("the active L1 table has {entries} entries; the virtual size needs {needed}"))
            } else {
                None
            };
            if let Some(p) = problem {
                // QEMU cannot open such an image: the check fails.
                self.out.counts.check_errors += 1;
                self.out.problems.push("l1-table", Some(crate::header::field_offset::L1_TABLE_OFFSET), None, p.clone());
                self.out.l1_problem = Some(p);
                if offset % self.geo.cluster_size() != 0 || (offset == 0 && entries > 0) {
                    self.out.incomplete = true;
                    return Ok(Flow::Skip);
                }
            }
        }
        if !self.count(offset, bytes, tree.is_active(), &|| what.clone(), None)? {
            if tree.is_active() {
                self.out.l1_problem.get_or_insert_with(|| {
                    format!("the active L1 table at 0x{offset:x} lies past the end of the file")
                });
            } else {
                self.out.snapshots_damaged = true;
            }
        }
        Ok(Flow::Continue)
    }

    fn snapshot(&mut self, index: usize, sn: &crate::snapshot::Snapshot) -> Flow {
        let cs = self.geo.cluster_size();
        if self.h.version >= 3 && sn.extra_data_size < 16 {
            let msg =
                format!("snapshot table entry {index} is incomplete (extra_data_size {} < 16)", sn.extra_data_size);
            self.corruption("snapshot", Some(sn.entry_offset), None, msg);
            self.out.snapshots_damaged = true;
        }
        if sn.l1_table_offset % cs != 0 {
            self.out.incomplete = true;
            let msg = format!(
                "snapshot {} ({}) l1_offset=0x{:x}: L1 table is not cluster aligned; snapshot table entry corrupted",
                sn.id, sn.name, sn.l1_table_offset
            );
            self.corruption("snapshot", Some(sn.entry_offset), None, msg);
            self.out.snapshots_damaged = true;
            return Flow::Skip;
        }
        if sn.l1_size > MAX_L1_ENTRIES {
            self.out.incomplete = true;
            let msg = format!("snapshot {} ({}) l1_size={}: L1 table is too large", sn.id, sn.name, sn.l1_size);
            self.corruption("snapshot", Some(sn.entry_offset), None, msg);
            self.out.snapshots_damaged = true;
            return Flow::Skip;
        }
        Flow::Continue
    }

    /// QEMU's `check_refblocks`, for one reftable entry.
    fn reftable_entry(&mut self, index: u64, at: u64, e: u64) -> Result<()> {
        let cs = self.geo.cluster_size();
        if e & REFT_RESERVED_MASK != 0 {
            self.out.rebuild = true;
            let msg = format!("refcount block {index} (reftable entry 0x{e:x}) has reserved bits set");
            self.corruption("refblock", Some(at), None, msg);
            return Ok(());
        }
        let off = e & REFT_OFFSET_MASK;
        if off == 0 {
            return Ok(());
        }
        if off % cs != 0 {
            self.out.rebuild = true;
            let msg =
                format!("refcount block {index} at 0x{off:x} is not cluster aligned; refcount table entry corrupted");
            self.corruption("refblock", Some(at), None, msg);
            return Ok(());
        }
        if (off >> self.h.cluster_bits) >= self.out.imrt.len() {
            // QEMU grows the file to make room; qcowrs rebuilds instead (no file growth).
            self.out.rebuild = true;
            self.corruption(
                "refblock",
                Some(at),
                None,
                format!("refcount block {index} at 0x{off:x} is outside the image"),
            );
            return Ok(());
        }
        self.count(off, cs, true, &|| format!("refcount block {index}"), None)?;
        let r = self.out.imrt.get(off >> self.h.cluster_bits);
        if r != 1 {
            self.out.rebuild = true;
            let msg =
                format!("refcount block {index} at 0x{off:x} has refcount={r}: it overlaps other data or metadata");
            self.corruption("refblock", Some(off), None, msg);
        }
        Ok(())
    }
}

impl Fork for Counter<'_> {
    fn fork(&self) -> Result<Self> {
        let geo = self.out.imrt.geometry();
        let imrt = crate::rebuild::Imrt::new(geo, self.out.imrt.len())?;
        let copied_seen = self.out.copied_seen.as_ref().map(|s| CopiedSeen::new(s.set.len() as u64 * 64));
        Ok(Counter {
            h: self.h,
            geo: self.geo,
            file_len: self.file_len,
            out: ReferenceCount {
                imrt,
                counts: Counts::default(),
                problems: ProblemLog::default(),
                rebuild: false,
                incomplete: false,
                beyond_eof: BTreeSet::new(),
                copied_seen,
                dangling: Vec::new(),
                l2_table_refs: HashMap::new(),
                overflowed: BTreeSet::new(),
                l1_problem: None,
                snapshots_damaged: false,
                unrepairable: Vec::new(),
                stray_crypto_ext: None,
                bitmaps_damaged: None,
            },
            claimed: vec![0u64; self.claimed.len()],
            next_contiguous: 0,
            cur_l1: self.cur_l1,
            cur_l2: 0,
        })
    }

    fn join(&mut self, other: Self) -> Result<()> {
        let cb = self.geo.cluster_bits;
        let ReferenceCount {
            imrt,
            counts,
            problems,
            rebuild,
            incomplete,
            beyond_eof,
            copied_seen,
            dangling,
            l2_table_refs,
            overflowed,
            l1_problem,
            snapshots_damaged,
            unrepairable,
            stray_crypto_ext: _,
            bitmaps_damaged,
        } = other.out;
        if self.out.bitmaps_damaged.is_none() {
            self.out.bitmaps_damaged = bitmaps_damaged;
        }
        self.out.unrepairable.extend(unrepairable);
        self.out.snapshots_damaged |= snapshots_damaged;
        for (k, n) in l2_table_refs {
            *self.out.l2_table_refs.entry(k).or_insert(0) += n;
        }
        let room = MAX_BEYOND_EOF.saturating_sub(self.out.dangling.len());
        self.out.dangling.extend(dangling.into_iter().take(room));
        self.out.overflowed.extend(overflowed);
        if self.out.l1_problem.is_none() {
            self.out.l1_problem = l1_problem;
        }
        let c = &mut self.out.counts;
        c.check_errors += counts.check_errors;
        c.corruptions += counts.corruptions;
        c.allocated_clusters += counts.allocated_clusters;
        c.fragmented_clusters += counts.fragmented_clusters;
        c.compressed_clusters += counts.compressed_clusters;
        self.out.problems.extend(problems);
        self.out.rebuild |= rebuild;
        self.out.incomplete |= incomplete;
        for k in beyond_eof {
            if self.out.beyond_eof.len() > MAX_BEYOND_EOF {
                break;
            }
            self.out.beyond_eof.insert(k);
        }
        for k in self.out.imrt.absorb(imrt)? {
            let msg = format!("cluster 0x{:x} is referenced more often than the refcount width allows", k << cb);
            if self.out.unrepairable.is_empty() {
                self.out.unrepairable.push((k << cb, msg.clone()));
            }
            self.corruption("refcount-overflow", Some(k << cb), None, msg);
            if self.out.overflowed.len() < MAX_BEYOND_EOF {
                self.out.overflowed.insert(k);
            }
        }
        // A cluster both halves claimed is a cross-link between them.
        for (w, (mine, theirs)) in self.claimed.iter_mut().zip(other.claimed).enumerate() {
            let mut both = *mine & theirs;
            *mine |= theirs;
            while both != 0 {
                let k = w as u64 * 64 + u64::from(both.trailing_zeros());
                both &= both - 1;
                let msg = format!(
                    "cluster 0x{:x} is used by two structures of the active image; without a snapshot to share it, one of the two loses its data (QEMU silently treats it as shared)",
                    k << cb
                );
                self.out.problems.push("cross-link", Some(k << cb), None, msg);
            }
        }
        if let (Some(mine), Some(theirs)) = (self.out.copied_seen.as_mut(), copied_seen) {
            mine.set.iter_mut().zip(theirs.set).for_each(|(a, b)| *a |= b);
            mine.clear.iter_mut().zip(theirs.clear).for_each(|(a, b)| *a |= b);
            mine.beyond_file |= theirs.beyond_file;
        }
        Ok(())
    }
}

impl Counter<'_> {
    /// A bitmap's structure (directory, table, data cluster): counted and claimed; if it lies
    /// past the end of the file or over another structure, the bitmaps cannot be used.
    fn bitmap_structure(&mut self, offset: u64, size: u64, what: &dyn Fn() -> String) -> Result<()> {
        let cb = self.h.cluster_bits;
        // Only clusters the claim bitmap covers (the file's) can be taken: a directory that
        // claims to be far larger than the file costs no loop over its clusters.
        let covered = (self.claimed.len() as u64).saturating_mul(64);
        let last = (offset.saturating_add(size.max(1) - 1) >> cb).min(covered.saturating_sub(1));
        let taken = size > 0
            && covered > 0
            && ((offset >> cb)..=last).any(|k| {
                usize::try_from(k / 64)
                    .ok()
                    .and_then(|w| self.claimed.get(w))
                    .is_some_and(|word| word >> (k % 64) & 1 == 1)
            });
        if offset % self.geo.cluster_size() != 0 || taken {
            self.out.bitmaps_damaged.get_or_insert_with(|| {
                format!("{} at 0x{offset:x} is misaligned or overlaps another structure", what())
            });
        }
        if !self.count(offset, size, true, what, None)? {
            self.out.bitmaps_damaged.get_or_insert_with(|| format!("{} lies past the end of the file", what()));
        }
        Ok(())
    }

    /// A bitmap QEMU cannot load (granularity out of range, a table of the wrong size): the
    /// check fails; a repair gives the bitmaps up.
    fn bitmap_table(&mut self, b: &crate::bitmap::BitmapEntry) -> Result<()> {
        let g = u32::from(b.granularity_bits);
        let expected = if (9..=31).contains(&g) {
            Some(self.h.size.div_ceil(1 << g).div_ceil(self.geo.cluster_size() * 8))
        } else {
            None
        };
        if expected != Some(u64::from(b.bitmap_table_size)) {
            self.out.counts.check_errors += 1;
            let msg = format!(
                "bitmap '{}' cannot be loaded: granularity 2^{g}, {} table entries",
                b.name, b.bitmap_table_size
            );
            self.out.problems.push("bitmap", Some(b.entry_offset), None, msg.clone());
            self.out.bitmaps_damaged.get_or_insert(msg);
        }
        Ok(())
    }
}

impl Visitor for Counter<'_> {
    fn visit(&mut self, event: Event<'_>) -> Result<Flow> {
        match event {
            Event::Header { cluster_size } => {
                self.count(0, cluster_size, true, &|| "header".into(), None)?;
            }
            Event::L1Table { tree, offset, entries } => return self.l1_table(tree, offset, entries),
            Event::L1Entry { tree, index, at, entry } => return self.l1_entry(tree, index, at, entry),
            Event::L2Table { offset, .. } => {
                self.next_contiguous = 0;
                self.cur_l2 = offset;
            }
            Event::L2Entry { tree, guest, at, entry, .. } => self.l2_entry(tree, guest, at, entry)?,
            Event::Snapshots { table } => {
                if self.h.has_data_file() && !table.snapshots.is_empty() {
                    let n = table.snapshots.len();
                    let msg = format!("{n} snapshots in an image with an external data file");
                    self.corruption("snapshot", Some(self.h.snapshots_offset), None, msg);
                    self.out.snapshots_damaged = true;
                }
            }
            Event::Snapshot { index, snapshot } => return Ok(self.snapshot(index, snapshot)),
            Event::SnapshotTable { offset, size } => {
                let inside = self.count(offset, size, true, &|| "snapshot table".into(), None)?;
                if !inside || (offset == 0 && self.h.nb_snapshots > 0) {
                    self.out.snapshots_damaged = true;
                }
                if offset % self.geo.cluster_size() != 0 {
                    // QEMU cannot open it: the check fails; a repair moves the table.
                    self.out.counts.check_errors += 1;
                    let msg = format!("the snapshot table offset 0x{offset:x} is not cluster aligned");
                    self.out.problems.push(
                        "snapshot-table",
                        Some(crate::header::field_offset::SNAPSHOTS_OFFSET),
                        None,
                        msg,
                    );
                    self.out.snapshots_damaged = true;
                }
            }
            Event::Reftable { offset, bytes } => {
                self.count(offset, bytes, true, &|| "refcount table".into(), None)?;
            }
            Event::CryptoHeader { offset, len } => {
                if self.h.crypt_method == 2 {
                    self.count(offset, len, true, &|| "encryption header".into(), None)?;
                } else {
                    // QEMU refuses an unencrypted image with this extension: the check fails.
                    self.out.counts.check_errors += 1;
                    let at = self.h.extension_offset(crate::format::EXT_CRYPTO);
                    self.out.stray_crypto_ext = at;
                    let msg = "a crypto header extension on an unencrypted image".to_string();
                    self.out.problems.push("header-extension", at, None, msg);
                }
            }
            Event::BitmapDirectory { offset, size } => {
                self.bitmap_structure(offset, size, &|| "bitmap directory".into())?;
            }
            Event::BitmapTable { bitmap, offset, bytes } => {
                self.bitmap_table(bitmap)?;
                self.bitmap_structure(offset, bytes, &|| format!("bitmap table of '{}'", bitmap.name))?;
            }
            Event::BitmapData { bitmap, index, offset } => {
                let cs = self.geo.cluster_size();
                self.bitmap_structure(offset, cs, &|| format!("bitmap '{}' data cluster {index}", bitmap.name))?;
            }
            Event::NoReftable => {
                self.out.rebuild = true;
                let at = Some(field_offset::REFCOUNT_TABLE_OFFSET);
                self.out.problems.push("no-refcount-table", at, None, "the header names no refcount table".into());
            }
            Event::ReftableEntry { index, at, entry } => self.reftable_entry(index, at, entry)?,
            Event::Unreadable { what, offset, error } => self.unreadable(what, offset, error),
            Event::L2TableEnd { .. } => {}
        }
        Ok(Flow::Continue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::create::{create_on, CreateOptions};
    use crate::storage::MemStorage;
    use std::sync::Arc;

    /// Counting on two threads gives exactly what one thread counts.
    #[test]
    fn forked_count_equals_sequential_count() {
        let mem = Arc::new(MemStorage::default());
        // 512-byte clusters: one L2 table maps 32 KiB, so 8 MiB of guest is 256 tables.
        let opts =
            CreateOptions { virtual_size: 8 << 20, cluster_size: 512, refcount_bits: 4, ..CreateOptions::default() };
        let mut f = create_on(mem.clone(), &opts).unwrap();
        for i in 0..300u64 {
            f.write_at(&[u8::try_from(i % 250).unwrap() + 1; 700], i * 27_000).unwrap();
        }
        f.close().unwrap();
        drop(f);
        let raw = QcowRawFile::new(mem.clone(), 512, 2, false).unwrap();
        let h = QcowHeader::read_from(&*mem).unwrap();
        let forked = count_references(&raw, &h, true).unwrap();
        let walker = Walker::new(&raw, &h);
        let mut seq = Counter::new(&raw, &h, walker.geometry()).unwrap();
        seq.out.copied_seen = Some(CopiedSeen::new(raw.file_clusters()));
        walker.walk_all(&mut seq).unwrap();
        let seq = seq.into_count();
        assert!(forked.counts.allocated_clusters > 500);
        assert_eq!(forked.counts, seq.counts);
        assert_eq!(forked.problems, seq.problems);
        for c in 0..raw.file_clusters() {
            assert_eq!(forked.imrt.get(c), seq.imrt.get(c), "cluster {c}");
        }
        let (a, b) = (forked.copied_seen.unwrap(), seq.copied_seen.unwrap());
        assert_eq!((a.set, a.clear), (b.set, b.clear));
    }
}
