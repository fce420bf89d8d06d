//! Check and repair with `qemu-img check` semantics (`block/qcow2-refcount.c`), plus the
//! problems QEMU does not report (cross-links, unfixable data loss) as a structured list.
//!
//! One pass: count every reference (`count.rs`, a walker visitor), compare with the on-disk
//! refcounts one whole refblock at a time, rebuild the refcount structure (`rebuild.rs`) if any
//! referenced cluster has an on-disk refcount of 0 or a refblock is unsane (`Repair::All`
//! only), else fix leaks/corruptions in place, then check (and fix) OFLAG_COPIED (a visitor of
//! the active tree), then clear the dirty and corrupt bits if nothing is left. A rebuild sets
//! the dirty bit (v3) first, so an interrupted one is redone on the next open.

use std::path::Path;
use std::sync::Arc;

use crate::count::{count_references, CopiedSeen, ReferenceCount};
use crate::error::Result;
use crate::format::{
    l1_entry_l2_offset, refcount_at, set_refcount_at, ClusterType, L2Entry, L2Geometry, INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY, L2E_COPIED,
};
use crate::header::QcowHeader;
use crate::raw_file::QcowRawFile;
use crate::rebuild::{write_refcount_structure, Imrt};
use crate::refcount::RefcountView;
use crate::report::{CheckReport, Counts, Problem, ProblemLog};
use crate::storage::FileStorage;
use crate::walk::{Event, Flow, Tree, Visitor, Walker};

/// What a check may repair.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Repair {
    /// Report only; the image is opened read-only.
    #[default]
    None,
    /// Fix leaked clusters (and OFLAG_COPIED when nothing else is wrong).
    Leaks,
    /// Fix everything fixable, rebuilding the refcount structure if needed.
    All,
}

impl Repair {
    fn leaks(self) -> bool {
        self != Repair::None
    }
    fn errors(self) -> bool {
        self == Repair::All
    }
}

/// How [`compare`] treats differences.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fix {
    /// Report only.
    None,
    /// Repair as `qemu-img check -r leaks|all`.
    Repair(Repair),
    /// Raise too-low refcounts, free nothing; leaks are counted but neither listed nor fixed
    /// (the walk was incomplete, so a "leak" may still hold live data).
    ErrorsOnly,
}

/// What a comparison found besides the problems it reports.
#[derive(Default)]
struct Compared {
    /// The highest cluster in use.
    highest: u64,
    /// An OFLAG_COPIED flag may be wrong (see [`CopiedSeen`]): a flag set on a cluster whose
    /// refcount is not 1, or missing on one whose refcount is 1.
    copied_suspect: bool,
}

/// Whether the flags seen on clusters `first..end` disagree with the refcounts: `ones(base)`
/// has bit i set iff the refcount of cluster `base + i` is exactly 1 (`base` a multiple of 64).
fn seen_disagrees(seen: &CopiedSeen, first: u64, end: u64, ones: &dyn Fn(u64) -> u64) -> bool {
    if first >= end {
        return false;
    }
    for w in first / 64..=(end - 1) / 64 {
        let Ok(i) = usize::try_from(w) else { return true };
        let (set, clear) = (seen.set.get(i).copied().unwrap_or(0), seen.clear.get(i).copied().unwrap_or(0));
        let base = w * 64;
        let (lo, hi) = (first.max(base) - base, end.min(base + 64) - base);
        let mask = (if hi == 64 { u64::MAX } else { (1u64 << hi) - 1 }) & !((1u64 << lo) - 1);
        if (set | clear) & mask == 0 {
            continue;
        }
        let o = ones(base);
        if (clear & o | set & !o) & mask != 0 {
            return true;
        }
    }
    false
}

/// The refcounts of one refblock's clusters compared one by one (`compare`'s slow path).
struct BlockCompare<'a> {
    imrt: &'a Imrt,
    fix: Fix,
    cb: u32,
    order: u32,
    counts: &'a mut Counts,
    rebuild: &'a mut bool,
    problems: &'a mut ProblemLog,
}

impl BlockCompare<'_> {
    /// Compares clusters `first..end` with the on-disk refblock `block`; returns the repaired
    /// refblock if anything was fixed, and the highest cluster in use.
    fn run(&mut self, first: u64, end: u64, block: Option<&[u8]>) -> (Option<Vec<u8>>, Option<u64>) {
        let (fix_leaks, fix_errors) = match self.fix {
            Fix::None => (false, false),
            Fix::Repair(r) => (r.leaks(), r.errors()),
            Fix::ErrorsOnly => (false, true),
        };
        let mut repaired: Option<Vec<u8>> = None;
        let mut highest = None;
        for i in first..end {
            // i - first < a refblock's entry count.
            let idx = usize::try_from(i - first).unwrap_or(0);
            let r1 = block.map_or(0, |b| refcount_at(b, self.order, idx));
            let r2 = self.imrt.get(i);
            if r1 > 0 || r2 > 0 {
                highest = Some(i);
            }
            if r1 == r2 {
                continue;
            }
            if r1 == 0 {
                *self.rebuild = true;
            } else if r1 > r2 && self.fix == Fix::ErrorsOnly {
                self.counts.leaks += 1;
                continue;
            } else if (r1 > r2 && fix_leaks) || (r1 < r2 && fix_errors) {
                let b = repaired.get_or_insert_with(|| block.map(<[u8]>::to_vec).unwrap_or_default());
                set_refcount_at(b, self.order, idx, r2);
                if r1 > r2 {
                    self.counts.leaks_fixed += 1;
                } else {
                    self.counts.corruptions_fixed += 1;
                }
                continue;
            }
            self.report(i, r1, r2);
        }
        (repaired, highest)
    }

    fn report(&mut self, i: u64, r1: u64, r2: u64) {
        let at = i << self.cb;
        let (kind, msg) = if r1 < r2 {
            self.counts.corruptions += 1;
            if r1 == 0 {
                ("refcount-zero", format!("cluster {i} (0x{at:x}) has refcount 0 but {r2} reference(s): the refcount structure must be rebuilt"))
            } else {
                ("refcount-too-low", format!("cluster {i} (0x{at:x}) has refcount {r1} but {r2} references"))
            }
        } else {
            self.counts.leaks += 1;
            ("leak", format!("leaked cluster {i} (0x{at:x}): refcount {r1}, {r2} reference(s)"))
        };
        let qemu = || {
            let what = if r1 < r2 { "ERROR" } else { "Leaked" };
            format!("{what} cluster {i} refcount={r1} reference={r2}")
        };
        self.problems.push_qemu(kind, Some(at), None, || msg, qemu);
    }
}

/// Bit j set iff cluster `base + j` of refblock `block` (clusters `first..end`) has refcount 1.
fn disk_ones(block: Option<&[u8]>, order: u32, first: u64, end: u64, base: u64) -> u64 {
    (0..64u64).filter(|&j| (first..end).contains(&(base + j))).fold(0, |m, j| {
        let idx = usize::try_from(base + j - first).unwrap_or(0);
        if block.map_or(0, |b| refcount_at(b, order, idx)) == 1 {
            m | 1 << j
        } else {
            m
        }
    })
}

/// QEMU's `compare_refcounts`, one whole refblock at a time: each on-disk refblock is read
/// once (and compared as a whole when it matches, which is the common case), and written once
/// if it was repaired. With `seen`, also tells whether an OFLAG_COPIED flag may be wrong.
#[allow(clippy::too_many_arguments)] // the image, the counts, how to fix, and where to report
fn compare(
    raw: &QcowRawFile,
    h: &QcowHeader,
    imrt: &Imrt,
    fix: Fix,
    seen: Option<&CopiedSeen>,
    counts: &mut Counts,
    rebuild: &mut bool,
    problems: &mut ProblemLog,
) -> Result<Compared> {
    let cb = h.cluster_bits;
    let mut view = RefcountView::load(raw, h);
    let per = view.geometry().refblock_entries();
    let order = view.geometry().refcount_order;
    let mut out = Compared::default();
    let mut slow = BlockCompare { imrt, fix, cb, order, counts, rebuild, problems };
    for ri in 0..imrt.len().div_ceil(per) {
        let first = ri * per;
        let end = (first + per).min(imrt.len());
        let block = match view.refblock(raw, ri) {
            Ok(b) => b,
            Err(why) => {
                out.copied_suspect = true;
                for i in first..end {
                    slow.counts.check_errors += 1;
                    let msg = format!("can't get refcount for cluster {i}: {why}");
                    slow.problems.push("io-error", Some(i << cb), None, msg);
                }
                continue;
            }
        };
        let block = block.as_deref().map(Vec::as_slice);
        // Refcounts past the end of the file are not checked (as QEMU): a partial last
        // refblock is compared refcount by refcount.
        if end - first == per && imrt.refblock_equals(ri, block) {
            out.highest = imrt.last_used_in(ri).unwrap_or(out.highest);
            if let Some(seen) = seen {
                out.copied_suspect |= seen_disagrees(seen, first, end, &|c| imrt.ones_mask(c));
            }
            continue;
        }
        if let Some(seen) = seen {
            out.copied_suspect |= seen_disagrees(seen, first, end, &|c| disk_ones(block, order, first, end, c));
        }
        let (repaired, highest) = slow.run(first, end, block);
        out.highest = highest.unwrap_or(out.highest);
        if let Some(bytes) = repaired {
            view.write_refblock(raw, ri, bytes, "refcount block (repair)")?;
        }
    }
    // Flags seen on clusters past the compared range: the full pass judges them (any flag at
    // all there disagrees with one of "refcount 1" and "refcount not 1").
    if let Some(seen) = seen {
        let words_end = seen.set.len() as u64 * 64;
        out.copied_suspect |= seen_disagrees(seen, imrt.len(), words_end, &|_| u64::MAX)
            || seen_disagrees(seen, imrt.len(), words_end, &|_| 0);
    }
    Ok(out)
}

/// How the OFLAG_COPIED pass runs.
#[derive(Clone, Copy)]
struct CopiedPass {
    /// Repair mismatches (else count them as corruptions).
    fix: bool,
    /// Setting COPIED is allowed; not when the walk was incomplete, since a cluster that looks
    /// unshared may belong to a snapshot that could not be walked.
    allow_set: bool,
}

/// Where the OFLAG_COPIED pass reads refcounts.
enum Refcounts<'a> {
    /// The in-memory counts (before a rebuild's commit, they are what is being committed).
    Counted(&'a Imrt),
    /// The on-disk refcounts.
    OnDisk(RefcountView),
}

/// QEMU's `check_oflag_copied`, a visitor of the active tree: COPIED must be set iff the
/// refcount is 1. Fixed L1 entries are written at once; fixed L2 entries a table at a time.
struct CopiedChecker<'a> {
    raw: &'a QcowRawFile,
    geo: L2Geometry,
    refcounts: Refcounts<'a>,
    pass: CopiedPass,
    counts: &'a mut Counts,
    problems: &'a mut ProblemLog,
    l2_span: u64,
    /// The walker is inside an L2 table of the active tree that this pass checks.
    in_table: bool,
    /// Fixed entries of the current table: (index, new descriptor word).
    fixes: Vec<(usize, u64)>,
    /// The count of the image, for the overlap checks of the repairs.
    count: Option<&'a ReferenceCount>,
    /// The active L1 table may be written in place.
    l1_private: bool,
}

impl<'a> CopiedChecker<'a> {
    fn new(
        raw: &'a QcowRawFile,
        geo: L2Geometry,
        refcounts: Refcounts<'a>,
        pass: CopiedPass,
        counts: &'a mut Counts,
        problems: &'a mut ProblemLog,
    ) -> Self {
        CopiedChecker {
            raw,
            geo,
            refcounts,
            pass,
            counts,
            problems,
            l2_span: geo.bytes_per_table(),
            in_table: false,
            fixes: Vec::new(),
            count: None,
            l1_private: false,
        }
    }

    fn refcount(&mut self, cluster: u64) -> Option<u64> {
        match &mut self.refcounts {
            Refcounts::Counted(imrt) => Some(imrt.get(cluster)),
            Refcounts::OnDisk(view) => view.get(self.raw, cluster).ok(),
        }
    }

    /// OFLAG_COPIED must be set iff the refcount `r` is 1 (bit 63 in L1 and L2 entries alike).
    /// On a mismatch: when fixing, counts it fixed and returns the corrected entry; otherwise
    /// counts a corruption and records the problem (QEMU's message, "OFLAG_COPIED
    /// <what>=<entry> refcount=<r>").
    fn judge(&mut self, entry: u64, r: u64, at: u64, guest: u64, what: &dyn Fn() -> String) -> Option<u64> {
        let missing = r == 1;
        if missing == (entry & L2E_COPIED != 0) || (missing && !self.pass.allow_set) {
            return None;
        }
        if self.pass.fix {
            self.counts.corruptions_fixed += 1;
            return Some(if missing { entry | L2E_COPIED } else { entry & !L2E_COPIED });
        }
        self.counts.corruptions += 1;
        let msg = format!("OFLAG_COPIED {}={entry:x} refcount={r}", what());
        let qemu = format!("ERROR {msg}");
        self.problems.push_qemu("copied-flag", Some(at), Some(guest), || msg, || qemu);
        None
    }

    fn l1_entry(&mut self, index: u64, at: u64, entry: u64) -> Result<bool> {
        let cs = self.geo.cluster_size();
        let l2 = l1_entry_l2_offset(entry);
        if l2 == 0 {
            return Ok(false);
        }
        let Some(r) = self.refcount(l2 >> self.geo.cluster_bits) else { return Ok(false) };
        let guest = index * self.l2_span;
        if let Some(new) = self.judge(entry, r, at, guest, &|| format!("L2 cluster: l1_index={index} l1_entry")) {
            if self.l1_private {
                self.raw.write_at(&new.to_be_bytes(), at, "L1 entry (OFLAG_COPIED repair)")?;
            } else {
                self.refuse(at, guest, "the L1 table shares its clusters with other data; L1 entry not rewritten");
            }
        }
        Ok(l2 % cs == 0 && l2.checked_add(cs).is_some_and(|end| end <= self.raw.file_len()))
    }

    /// A fix not written: the check did not complete.
    fn refuse(&mut self, at: u64, guest: u64, why: &str) {
        self.counts.corruptions_fixed = self.counts.corruptions_fixed.saturating_sub(1);
        self.counts.check_errors += 1;
        self.problems.push("overlap", Some(at), Some(guest), format!("{why} (at 0x{at:x})"));
    }

    /// Writes the fixed entries of an L2 table, if nothing else shares the table.
    fn fix_table(&mut self, l1_index: u64, offset: u64, table: &[u64]) -> Result<()> {
        // Overlap check: only a table that nothing but L1 entries refers to may be rewritten
        // (not one that is also a refblock, a refcount overflowed, or data).
        let private = self.count.is_some_and(|c| c.only_an_l2_table(offset, self.geo.cluster_bits));
        if private {
            let mut t = table.to_vec();
            for &(i, word) in &self.fixes {
                let e = self.geo.entry_at(&t, i);
                self.geo.set_entry(&mut t, i, L2Entry { entry: word, ..e });
            }
            self.raw.write_u64_table(offset, &t, "L2 table (OFLAG_COPIED repair)")?;
        } else {
            self.counts.check_errors += 1;
            let msg = format!("L2 table at 0x{offset:x} overlaps other metadata; not rewritten");
            self.problems.push("overlap", Some(offset), Some(l1_index * self.l2_span), msg);
        }
        self.fixes.clear();
        Ok(())
    }
}

impl Visitor for CopiedChecker<'_> {
    fn visit(&mut self, event: Event<'_>) -> Result<Flow> {
        match event {
            Event::L1Entry { tree, index, at, entry } => {
                self.in_table = tree.is_active() && self.l1_entry(index, at, entry)?;
                return Ok(if self.in_table { Flow::Continue } else { Flow::Skip });
            }
            Event::L2Table { len, .. } => {
                self.in_table &= len == self.geo.cluster_size();
                self.fixes.clear();
            }
            Event::L2Entry { index, guest, at, entry, .. } if self.in_table => {
                if !matches!(self.geo.cluster_type(entry), ClusterType::Normal | ClusterType::ZeroAlloc) {
                    return Ok(Flow::Continue);
                }
                let r = if self.geo.data_file {
                    Some(1)
                } else {
                    self.refcount(entry.host_offset() >> self.geo.cluster_bits)
                };
                let Some(r) = r else { return Ok(Flow::Continue) };
                if let Some(new) = self.judge(entry.entry, r, at, guest, &|| "data cluster: l2_entry".to_string()) {
                    self.fixes.push((index, new));
                }
            }
            Event::L2TableEnd { l1_index, offset, table } if self.in_table && !self.fixes.is_empty() => {
                self.fix_table(l1_index, offset, table)?;
            }
            _ => {}
        }
        Ok(Flow::Continue)
    }
}

/// Runs the OFLAG_COPIED pass over the active tree and adds its findings to a report.
#[allow(clippy::too_many_arguments)] // the image, where refcounts come from, how, and the report
fn check_oflag_copied(
    raw: &QcowRawFile,
    h: &QcowHeader,
    count: &ReferenceCount,
    from_counted: bool,
    fix: bool,
    allow_set: bool,
    counts: &mut Counts,
    problems: &mut ProblemLog,
) -> Result<()> {
    let walker = Walker::new(raw, h);
    let refcounts =
        if from_counted { Refcounts::Counted(&count.imrt) } else { Refcounts::OnDisk(RefcountView::load(raw, h)) };
    let pass = CopiedPass { fix, allow_set };
    let mut v = CopiedChecker::new(raw, walker.geometry(), refcounts, pass, counts, problems);
    v.count = Some(count);
    // The L1 table itself is rewritten in place only if nothing else uses its clusters.
    let cb = h.cluster_bits;
    let clusters = (u64::from(h.l1_size) * 8).div_ceil(h.cluster_size());
    v.l1_private = (0..clusters).all(|k| {
        let c = (h.l1_table_offset >> cb) + k;
        count.imrt.get(c) == 1 && !count.overflowed.contains(&c)
    });
    walker.walk_tree(Tree::Active, h.l1_table_offset, h.l1_size, &mut v)
}

/// What the last walk of a check pass found; a repair changes only refcounts and OFLAG_COPIED
/// bits, which a new walk would not count differently, so the re-check after a repair reuses
/// it instead of reading every table again.
struct LastWalk {
    count: ReferenceCount,
    /// OFLAG_COPIED may still be wrong (the pass did not fix it, or refused a write).
    copied_unsettled: bool,
}

/// One check pass over an open image (QEMU's `qcow2_check_refcounts` plus the bit clearing of
/// `qcow2_co_check_locked`). `force_rebuild` rebuilds even if the refcounts look right.
pub fn check_image(raw: &QcowRawFile, h: &mut QcowHeader, repair: Repair, force_rebuild: bool) -> Result<CheckReport> {
    check_pass(raw, h, repair, force_rebuild, None).map(|(report, _)| report)
}

/// A pass: count, compare, repair. With `Repair::All`, damage to the structure itself found
/// by the count is repaired first (`repair.rs`) and the pass starts again on the repaired
/// image, rebuilding the refcounts; `structure` carries what that repair listed (`None`
/// before it ran).
fn check_pass(
    raw: &QcowRawFile,
    h: &mut QcowHeader,
    repair: Repair,
    force_rebuild: bool,
    structure: Option<Vec<Problem>>,
) -> Result<(CheckReport, LastWalk)> {
    let mut count = count_references(raw, h, repair == Repair::None)?;
    if let (true, Some((at, _))) = (repair.errors(), count.unrepairable.first()) {
        let why: Vec<&str> = count.unrepairable.iter().map(|(_, w)| w.as_str()).collect();
        return Err(crate::error::Error::corrupt(
            format!("repair refused (nothing was changed): {}", why.join("; ")),
            *at,
        ));
    }
    if repair.errors() && structure.is_none() && crate::repair::needs_structural_repair(&count) {
        let mut dropped = Vec::new();
        crate::repair::fix_structure(raw, h, &count, &mut dropped)?;
        drop(count);
        // The structure changed under the parsed header (extensions renamed, tables moved).
        *h = QcowHeader::read_for_check(&**raw.storage())?;
        raw.refresh_len()?;
        return check_pass(raw, h, repair, true, Some(dropped));
    }
    let dropped = structure.unwrap_or_default();
    let mut report = CheckReport {
        counts: count.counts.clone(),
        problems: std::mem::take(&mut count.problems),
        dropped,
        ..CheckReport::default()
    };
    let pre_compare = report.counts.clone();
    let mut walk_counts = pre_compare.clone();
    let mut rebuild = count.rebuild;
    let first = compare(
        raw,
        h,
        &count.imrt,
        Fix::None,
        count.copied_seen.as_ref(),
        &mut report.counts,
        &mut rebuild,
        &mut report.problems,
    )?;
    let mut highest = first.highest;
    rebuild |= force_rebuild;
    let original_incompat = h.incompatible_features;

    if rebuild && repair.errors() {
        let (recount, top) = rebuild_pass(raw, h, count, &mut report)?;
        walk_counts = recount.counts.clone();
        (count, highest) = (recount, top);
    } else if repair != Repair::None {
        if rebuild {
            report.counts.check_errors += 1;
            let msg = "need to rebuild refcount structures (repair=\"all\" does it)".to_string();
            report.problems.push("rebuild-needed", None, None, msg);
            count.counts = walk_counts;
            return Ok((finish(report, highest, h), LastWalk { count, copied_unsettled: true }));
        }
        if report.counts.leaks > 0 || report.counts.corruptions > 0 {
            highest = repair_in_place(raw, h, &count, repair, pre_compare, &mut report, &mut rebuild)?;
        }
    }

    let fix_copied = repair.errors()
        || (repair.leaks()
            && report.counts.check_errors == 0
            && report.counts.corruptions == 0
            && report.counts.leaks == 0);
    let errors_before = report.counts.check_errors;
    // Without repair, the refcounts are those the walk saw: the full pass is needed only if a
    // flag may be wrong.
    let skip_copied = repair == Repair::None
        && count.copied_seen.as_ref().is_some_and(|seen| !seen.beyond_file && !first.copied_suspect);
    if !skip_copied {
        let allow_set = !count.incomplete;
        check_oflag_copied(raw, h, &count, false, fix_copied, allow_set, &mut report.counts, &mut report.problems)?;
    }
    let copied_unsettled = !fix_copied || report.counts.check_errors != errors_before;

    if repair != Repair::None {
        let clean = report.counts.check_errors == 0 && report.counts.corruptions == 0;
        let bits = if clean {
            h.incompatible_features & !(INCOMPAT_DIRTY | INCOMPAT_CORRUPT)
        } else {
            // Leave the dirty bit as it was: a dirty image QEMU cannot repair would no longer open.
            (h.incompatible_features & !INCOMPAT_DIRTY) | (original_incompat & INCOMPAT_DIRTY)
        };
        raw.sync()?;
        h.commit_incompatible_features(raw, bits)?;
    }
    count.counts = walk_counts;
    Ok((finish(report, highest, h), LastWalk { count, copied_unsettled }))
}

/// Leaks (and with `Repair::All`, too-low refcounts) fixed in place, one refblock at a time;
/// nothing is freed when the walk was incomplete. Returns the highest cluster in use.
fn repair_in_place(
    raw: &QcowRawFile,
    h: &mut QcowHeader,
    count: &ReferenceCount,
    repair: Repair,
    pre_compare: Counts,
    report: &mut CheckReport,
    rebuild: &mut bool,
) -> Result<u64> {
    let has_errors = report.counts.corruptions > 0;
    if count.incomplete && report.counts.leaks > 0 {
        report.problems.push(
            "leak-repair-skipped",
            None,
            None,
            "leaked clusters were not freed: part of the image could not be walked, so they may still hold live data"
                .into(),
        );
    }
    report.counts = pre_compare;
    if repair.errors() && has_errors {
        // Refcounts raised and OFLAG_COPIED flags changed in place cannot be ordered so that
        // every crash state is consistent (a refcount raised first leaves a shared cluster
        // flagged COPIED): the dirty bit makes an interrupted repair redo itself on the next
        // read-write open. It is cleared at the end when clean.
        h.commit_incompatible_features(raw, h.incompatible_features | INCOMPAT_DIRTY)?;
    }
    let fix = if !count.incomplete {
        Fix::Repair(repair)
    } else if repair.errors() {
        Fix::ErrorsOnly
    } else {
        Fix::None
    };
    let mut scratch = ProblemLog::default();
    Ok(compare(raw, h, &count.imrt, fix, None, &mut report.counts, rebuild, &mut scratch)?.highest)
}

/// `Repair::All` when the refcount structure must be rebuilt: OFLAG_COPIED fixed from the
/// counts about to be committed, a new structure written and committed (the dirty bit set
/// meanwhile), then a recount that frees the old structure as leaks. Returns the recount and
/// the highest cluster in use.
fn rebuild_pass(
    raw: &QcowRawFile,
    h: &mut QcowHeader,
    mut count: ReferenceCount,
    report: &mut CheckReport,
) -> Result<(ReferenceCount, u64)> {
    let old = report.counts.clone();
    let incomplete = count.incomplete;
    // Mark the image as having stale refcounts while the structure is replaced.
    h.commit_incompatible_features(raw, h.incompatible_features | INCOMPAT_DIRTY)?;
    // OFLAG_COPIED follows the counts about to be committed, and is fixed before the commit:
    // an interrupted rebuild then never leaves it wrong, even on v2 images, which have no
    // dirty bit to make the next open redo the repair.
    let mut early = Counts::default();
    check_oflag_copied(raw, h, &count, true, true, !incomplete, &mut early, &mut ProblemLog::default())?;
    raw.sync()?;
    write_refcount_structure(raw, h, &mut count.imrt, incomplete, &count.beyond_eof)?;
    report.rebuilt = true;
    report.counts.corruptions = 0;
    report.counts.leaks = 0;
    // The old structure is now leaked: recount against the new one and free it. (The old
    // count is dropped first: two of them at once would double the peak memory.)
    drop(count);
    let again = count_references(raw, h, false)?;
    let mut rebuild_again = again.rebuild;
    report.counts.corruptions += again.counts.corruptions;
    report.counts.check_errors += again.counts.check_errors;
    let mut fresh = Counts::default();
    let fix = if incomplete { Fix::None } else { Fix::Repair(Repair::Leaks) };
    let highest =
        compare(raw, h, &again.imrt, fix, None, &mut fresh, &mut rebuild_again, &mut ProblemLog::default())?.highest;
    if rebuild_again {
        report.counts.check_errors += 1;
        report.problems.push("rebuild-failed", None, None, "the rebuilt refcount structure is still broken".into());
    }
    if incomplete && fresh.leaks > 0 {
        let msg = format!(
            "{} leaked clusters were not freed: part of the image could not be walked (see the other problems), so they may still hold live data",
            fresh.leaks
        );
        report.problems.push("leak-repair-skipped", None, None, msg);
    }
    report.counts.corruptions_fixed += old.corruptions.saturating_sub(report.counts.corruptions);
    report.counts.leaks_fixed += old.leaks.saturating_sub(report.counts.leaks);
    report.counts.leaks += fresh.leaks;
    report.counts.corruptions_fixed += early.corruptions_fixed;
    Ok((again, highest))
}

/// The check after a repair (qemu-img's "double checking the fixed image"): the refcounts
/// compared again with the last walk's counts, and OFLAG_COPIED checked again if the repair
/// left it unsettled.
fn recheck(raw: &QcowRawFile, h: &QcowHeader, last: LastWalk) -> Result<CheckReport> {
    let mut report = CheckReport { counts: last.count.counts.clone(), ..CheckReport::default() };
    let mut rebuild = false;
    let highest =
        compare(raw, h, &last.count.imrt, Fix::None, None, &mut report.counts, &mut rebuild, &mut report.problems)?
            .highest;
    if last.copied_unsettled {
        let allow_set = !last.count.incomplete;
        check_oflag_copied(raw, h, &last.count, false, false, allow_set, &mut report.counts, &mut report.problems)?;
    }
    Ok(finish(report, highest, h))
}

fn finish(mut report: CheckReport, highest: u64, h: &QcowHeader) -> CheckReport {
    report.image_end_offset = (highest + 1) * h.cluster_size();
    report
}

/// Checks (and with `repair`, repairs) the image at `path`, as `qemu-img check [-r ...]`: after
/// a repair that fixed anything, the image is checked again and the report gives the remaining
/// problems with the `*_fixed` counts of the repair. `Repair::None` opens the file read-only.
pub fn check_path(path: &Path, repair: Repair, force_rebuild: bool) -> Result<CheckReport> {
    check_path_shared(path, repair, force_rebuild, false)
}

/// [`check_path`]; with `force_share` (no repair only) the image is checked without taking
/// QEMU's locks (`qemu-img check -U`), e.g. while a VM runs it: the result may then be stale.
pub fn check_path_shared(path: &Path, repair: Repair, force_rebuild: bool, force_share: bool) -> Result<CheckReport> {
    let writable = repair != Repair::None;
    if writable && force_share {
        return Err(crate::error::Error::ReadOnlyImage(
            "force_share can only be used without repair (a repair writes the image)".into(),
        ));
    }
    let file = crate::backing::open_image_file(path, writable, "image")?;
    if !force_share {
        crate::lock::lock_image(&file, writable, &format!("'{}'", path.display()))?;
    }
    let storage = Arc::new(FileStorage::new(file));
    let mut h = QcowHeader::read_for_check(&*storage)?;
    let data_file_is_image = match h.data_file() {
        Some(name) if h.has_data_file() => {
            let p = crate::backing::resolve_relative(path, &name);
            std::fs::metadata(&p).ok().map(|m| {
                use std::os::unix::fs::MetadataExt;
                (m.dev(), m.ino())
            }) == crate::backing::file_id(&*storage)
        }
        _ => false,
    };
    let at = crate::header::field_offset::INCOMPATIBLE_FEATURES;
    let why = "the external data file is the image itself: its data and its metadata would overwrite each other";
    if data_file_is_image && writable {
        return Err(crate::error::Error::corrupt(format!("repair refused (nothing was changed): {why}"), at));
    }
    let raw = QcowRawFile::new(storage, h.cluster_size(), h.refcount_order, writable)?;
    let mut report = check_raw(&raw, &mut h, repair, force_rebuild)?;
    if data_file_is_image {
        report.counts.check_errors += 1;
        report.problems.push("data-file", Some(at), None, why.to_string());
    }
    Ok(report)
}

/// [`check_path`] on an image that is already open (and locked).
pub fn check_raw(raw: &QcowRawFile, h: &mut QcowHeader, repair: Repair, force_rebuild: bool) -> Result<CheckReport> {
    let (first, last) = check_pass(raw, h, repair, force_rebuild, None)?;
    if repair == Repair::None
        || (first.counts.corruptions_fixed == 0
            && first.counts.leaks_fixed == 0
            && !first.rebuilt
            && first.dropped.is_empty())
    {
        return Ok(first);
    }
    let mut second = recheck(raw, h, last)?;
    second.counts.corruptions_fixed = first.counts.corruptions_fixed;
    second.counts.leaks_fixed = first.counts.leaks_fixed;
    second.rebuilt = first.rebuilt;
    second.problems = first.problems;
    second.dropped = first.dropped;
    Ok(second)
}

/// Whether the image's refcounts are stale: the dirty bit is set, the refcount table is
/// missing or broken, or cluster 0's refcount (read at the image's width) is 0.
pub fn refcounts_stale(raw: &QcowRawFile, h: &QcowHeader) -> bool {
    if h.is_dirty() || h.validate_refcount_table(raw.file_len()).is_err() {
        return true;
    }
    !matches!(RefcountView::load(raw, h).get(raw, 0), Ok(r) if r > 0)
}

/// The seed's trigger for `open(rebuild=True)`, made precise and widened to every repair:
/// repairs (rebuilding) when the refcounts are stale ([`refcounts_stale`]) or the header names
/// tables that cannot be used as they are (an L1 table past the end of the file, a snapshot
/// table over the header); otherwise checks, and repairs as `check -r all` if the check finds
/// anything (a corruption, a leak, a check error) that would make the first write refuse or
/// waste space. Returns the report of the repair, if one was done.
pub fn repair_if_stale(raw: &QcowRawFile, h: &mut QcowHeader) -> Result<Option<CheckReport>> {
    if h.is_corrupt() {
        // Refused by the read-write open that follows, with the reason.
        return Ok(None);
    }
    if refcounts_stale(raw, h) || h.validate(raw.file_len()).is_err() {
        return check_image(raw, h, Repair::All, true).map(Some);
    }
    let r = check_image(raw, h, Repair::None, false)?;
    if r.counts.corruptions > 0 || r.counts.leaks > 0 || r.counts.check_errors > 0 {
        return check_image(raw, h, Repair::All, false).map(Some);
    }
    Ok(None)
}
