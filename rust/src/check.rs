//! Check and repair with `qemu-img check` semantics (`block/qcow2-refcount.c`), plus the
//! problems QEMU does not report (cross-links, unfixable data loss) as a structured list.
//!
//! The order of a repair: count every reference (`rebuild::Walker`), compare with the on-disk
//! refcounts, rebuild the whole refcount structure if any referenced cluster has an on-disk
//! refcount of 0 or a refblock is unsane (`Repair::All` only), else fix leaks/corruptions in
//! place, then fix OFLAG_COPIED, then clear the dirty and corrupt bits if nothing is left. A
//! rebuild sets the dirty bit (v3) first, so an interrupted one is redone on the next open.

use std::fs::OpenOptions as FsOpenOptions;
use std::path::Path;

use crate::error::{Error, IoContext, Result};
use crate::format::{
    be_u64, decode_refcounts, encode_refcounts, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, L1E_OFFSET_MASK, L2E_COPIED,
    L2E_OFFSET_MASK, REFT_OFFSET_MASK,
};
use crate::header::{field_offset, QcowHeader};
use crate::raw_file::QcowRawFile;
use crate::rebuild::{classify_l2, write_refcount_structure, Counts, Imrt, L2Kind, ProblemLog, Walker};

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

/// The result of a check, mirroring `qemu-img check --output=json`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Counters with qemu-img's meaning.
    pub counts: Counts,
    /// (highest used cluster + 1) * cluster_size.
    pub image_end_offset: u64,
    /// What was found, one entry per problem (the first [`crate::rebuild::MAX_LISTED_PROBLEMS`]).
    pub problems: ProblemLog,
    /// The refcount structure was rebuilt.
    pub rebuilt: bool,
}

impl CheckReport {
    /// No check errors, corruptions or leaks.
    pub fn is_clean(&self) -> bool {
        self.counts.check_errors == 0 && self.counts.corruptions == 0 && self.counts.leaks == 0
    }

    /// `qemu-img check`'s exit code: 0 clean, 1 check failed, 2 corruptions, 3 leaks only.
    pub fn exit_code(&self) -> i32 {
        if self.counts.check_errors > 0 {
            1
        } else if self.counts.corruptions > 0 {
            2
        } else if self.counts.leaks > 0 {
            3
        } else {
            0
        }
    }

    /// The JSON fields as qemu-img names them; zero-valued ones omitted except `check-errors`.
    pub fn json_fields(&self) -> Vec<(&'static str, u64)> {
        let c = &self.counts;
        let mut v = vec![("check-errors", c.check_errors)];
        for (k, x) in [
            ("image-end-offset", self.image_end_offset),
            ("corruptions", c.corruptions),
            ("leaks", c.leaks),
            ("corruptions-fixed", c.corruptions_fixed),
            ("leaks-fixed", c.leaks_fixed),
            ("total-clusters", c.total_clusters),
            ("allocated-clusters", c.allocated_clusters),
            ("fragmented-clusters", c.fragmented_clusters),
            ("compressed-clusters", c.compressed_clusters),
        ] {
            if x != 0 {
                v.push((k, x));
            }
        }
        v
    }
}

/// The on-disk refcounts, read through the reftable with one refblock cached; changes are
/// written back a whole refblock at a time.
struct DiskRefcounts {
    reftable: Vec<u64>,
    cached: Option<(u64, Vec<u64>, bool)>,
    refblock_entries: u64,
    order: u32,
}

impl DiskRefcounts {
    fn load(raw: &QcowRawFile, h: &QcowHeader) -> Self {
        let cs = h.cluster_size();
        let mut reftable = Vec::new();
        if h.refcount_table_offset != 0 && h.refcount_table_offset % cs == 0 {
            let bytes =
                (u64::from(h.refcount_table_clusters) * cs).min(raw.file_len().saturating_sub(h.refcount_table_offset));
            let mut buf = vec![0u8; usize::try_from(bytes).unwrap_or(0)];
            if let Ok(n) = raw.read_at(&mut buf, h.refcount_table_offset) {
                buf.truncate(n - n % 8);
                reftable = buf.chunks_exact(8).map(be_u64).collect();
            }
        }
        let geo = raw.refcount_geometry();
        DiskRefcounts { reftable, cached: None, refblock_entries: geo.refblock_entries(), order: geo.refcount_order }
    }

    /// Refcount of cluster `i`; `Err` names why it cannot be read.
    fn get(&mut self, raw: &mut QcowRawFile, i: u64) -> std::result::Result<u64, String> {
        let ri = i / self.refblock_entries;
        if !matches!(&self.cached, Some((c, _, _)) if *c == ri) {
            self.flush(raw).map_err(|e| e.to_string())?;
            let e = usize::try_from(ri).ok().and_then(|r| self.reftable.get(r)).copied().unwrap_or(0);
            let off = e & REFT_OFFSET_MASK;
            let block = if off == 0 {
                Vec::new()
            } else {
                if off % raw.cluster_size() != 0 {
                    return Err(format!("refcount block {ri} at 0x{off:x} is not cluster aligned"));
                }
                // A refblock (partly) past the end of the file reads as zeros there, as in
                // QEMU; the refblock check has already reported it.
                let mut buf = vec![0u8; usize::try_from(raw.cluster_size()).unwrap_or(0)];
                let n = if off < raw.file_len() { raw.read_at(&mut buf, off).map_err(|e| e.to_string())? } else { 0 };
                buf[n..].fill(0);
                decode_refcounts(&buf, self.order)
            };
            self.cached = Some((ri, block, false));
        }
        let Some((_, block, _)) = &self.cached else { return Ok(0) };
        Ok(block.get(usize::try_from(i % self.refblock_entries).unwrap_or(usize::MAX)).copied().unwrap_or(0))
    }

    /// Sets the refcount of cluster `i`, whose refblock exists (its refcount was read non-zero).
    fn set(&mut self, raw: &mut QcowRawFile, i: u64, v: u64) -> Result<()> {
        self.get(raw, i).map_err(|why| Error::corrupt(why, 0))?;
        if let Some((_, block, dirty)) = &mut self.cached {
            let idx = usize::try_from(i % self.refblock_entries).unwrap_or(0);
            if let Some(slot) = block.get_mut(idx) {
                *slot = v;
                *dirty = true;
            }
        }
        Ok(())
    }

    fn flush(&mut self, raw: &mut QcowRawFile) -> Result<()> {
        if let Some((ri, block, dirty)) = &mut self.cached {
            if *dirty {
                let e = usize::try_from(*ri).ok().and_then(|r| self.reftable.get(r)).copied().unwrap_or(0);
                let mut buf = vec![0u8; usize::try_from(raw.cluster_size()).unwrap_or(0)];
                encode_refcounts(block, self.order, &mut buf);
                raw.write_at(&buf, e & REFT_OFFSET_MASK, "refcount block (repair)")?;
                *dirty = false;
            }
        }
        Ok(())
    }
}

/// QEMU's `compare_refcounts`. Returns the highest cluster in use.
fn compare(
    raw: &mut QcowRawFile,
    h: &QcowHeader,
    imrt: &Imrt,
    fix: Repair,
    counts: &mut Counts,
    rebuild: &mut bool,
    problems: &mut ProblemLog,
) -> Result<u64> {
    let cb = h.cluster_bits;
    let mut disk = DiskRefcounts::load(raw, h);
    let mut highest = 0;
    for i in 0..imrt.len() {
        let r1 = match disk.get(raw, i) {
            Ok(r) => r,
            Err(why) => {
                counts.check_errors += 1;
                problems.push("io-error", Some(i << cb), None, format!("can't get refcount for cluster {i}: {why}"));
                continue;
            }
        };
        let r2 = imrt.get(i);
        if r1 > 0 || r2 > 0 {
            highest = i;
        }
        if r1 == r2 {
            continue;
        }
        if r1 == 0 {
            *rebuild = true;
        } else if (r1 > r2 && fix.leaks()) || (r1 < r2 && fix.errors()) {
            disk.set(raw, i, r2)?;
            if r1 > r2 {
                counts.leaks_fixed += 1;
            } else {
                counts.corruptions_fixed += 1;
            }
            continue;
        }
        let (kind, msg) = if r1 < r2 {
            counts.corruptions += 1;
            if r1 == 0 {
                ("refcount-zero", format!("cluster {i} (0x{:x}) has refcount 0 but {r2} reference(s): the refcount structure must be rebuilt", i << cb))
            } else {
                ("refcount-too-low", format!("cluster {i} (0x{:x}) has refcount {r1} but {r2} references", i << cb))
            }
        } else {
            counts.leaks += 1;
            ("leak", format!("leaked cluster {i} (0x{:x}): refcount {r1}, {r2} reference(s)", i << cb))
        };
        problems.push(kind, Some(i << cb), None, msg);
    }
    disk.flush(raw)?;
    Ok(highest)
}

/// How `check_oflag_copied` runs.
#[derive(Clone, Copy)]
struct CopiedPass {
    /// Repair mismatches (else count them as corruptions).
    fix: bool,
    /// Compare with the in-memory counts instead of the on-disk refcounts (before a rebuild's
    /// commit, the in-memory counts are what is being committed).
    from_imrt: bool,
    /// Setting COPIED is allowed; not when the walk was incomplete, since a cluster that looks
    /// unshared may belong to a snapshot that could not be walked.
    allow_set: bool,
}

/// QEMU's `check_oflag_copied`: in the active tree, COPIED must be set iff the refcount is 1.
fn check_oflag_copied(
    raw: &mut QcowRawFile,
    h: &QcowHeader,
    imrt: &Imrt,
    pass: CopiedPass,
    counts: &mut Counts,
    problems: &mut ProblemLog,
) -> Result<()> {
    let cs = h.cluster_size();
    let cb = h.cluster_bits;
    let extended = h.extended_l2();
    let data_file = h.has_data_file();
    let stride = if extended { 16usize } else { 8 };
    let mut disk = DiskRefcounts::load(raw, h);
    let l1_bytes = (u64::from(h.l1_size) * 8).min(raw.file_len().saturating_sub(h.l1_table_offset));
    let mut l1 = vec![0u8; usize::try_from(l1_bytes).unwrap_or(0)];
    let n = raw.read_at(&mut l1, h.l1_table_offset)?;
    l1.truncate(n - n % 8);
    let l2_span = h.l2_entries() * cs;
    for (i, e) in l1.chunks_exact(8).map(be_u64).enumerate() {
        let l2 = e & L1E_OFFSET_MASK;
        if l2 == 0 {
            continue;
        }
        let r = if pass.from_imrt {
            imrt.get(l2 >> cb)
        } else {
            let Ok(r) = disk.get(raw, l2 >> cb) else { continue };
            r
        };
        let at = h.l1_table_offset + 8 * i as u64;
        let what = || format!("L2 cluster: l1_index={i} l1_entry");
        if let Some(new) = copied_flag(e, r, pass, counts, problems, at, i as u64 * l2_span, &what) {
            raw.write_at(&new.to_be_bytes(), at, "L1 entry (OFLAG_COPIED repair)")?;
        }
        if l2 % cs != 0 || l2.checked_add(cs).is_none_or(|end| end > raw.file_len()) {
            continue;
        }
        let mut table = vec![0u8; usize::try_from(cs).unwrap_or(0)];
        raw.read_at(&mut table, l2)?;
        let mut dirty = false;
        for j in 0..table.len() / stride {
            let entry = be_u64(&table[j * stride..j * stride + 8]);
            let kind = classify_l2(entry, extended, data_file);
            if !matches!(kind, L2Kind::Normal | L2Kind::ZeroAlloc) {
                continue;
            }
            let r = if data_file {
                1
            } else if pass.from_imrt {
                imrt.get((entry & L2E_OFFSET_MASK) >> cb)
            } else {
                match disk.get(raw, (entry & L2E_OFFSET_MASK) >> cb) {
                    Ok(r) => r,
                    Err(_) => continue,
                }
            };
            let (at, guest) = (l2 + (j * stride) as u64, i as u64 * l2_span + j as u64 * cs);
            let what = || "data cluster: l2_entry".to_string();
            if let Some(new) = copied_flag(entry, r, pass, counts, problems, at, guest, &what) {
                table[j * stride..j * stride + 8].copy_from_slice(&new.to_be_bytes());
                dirty = true;
            }
        }
        if dirty {
            // Overlap check: only an L2 table referenced exactly once may be rewritten.
            if imrt.get(l2 >> cb) == 1 {
                raw.write_at(&table, l2, "L2 table (OFLAG_COPIED repair)")?;
            } else {
                counts.check_errors += 1;
                problems.push(
                    "overlap",
                    Some(l2),
                    Some(i as u64 * l2_span),
                    format!("L2 table at 0x{l2:x} overlaps other metadata; not rewritten"),
                );
            }
        }
    }
    Ok(())
}

/// OFLAG_COPIED must be set iff the refcount `r` is 1 (bit 63 in L1 and L2 entries alike). On a
/// mismatch: when fixing, counts it fixed and returns the corrected entry; otherwise counts a
/// corruption and records the problem (QEMU's message, "OFLAG_COPIED <what>=<entry>
/// refcount=<r>").
#[allow(clippy::too_many_arguments)] // the entry, its place and where to account for it
fn copied_flag(
    entry: u64,
    r: u64,
    pass: CopiedPass,
    counts: &mut Counts,
    problems: &mut ProblemLog,
    at: u64,
    guest: u64,
    what: &dyn Fn() -> String,
) -> Option<u64> {
    if (r == 1) == (entry & L2E_COPIED != 0) || (r == 1 && !pass.allow_set) {
        return None;
    }
    if pass.fix {
        counts.corruptions_fixed += 1;
        return Some(if r == 1 { entry | L2E_COPIED } else { entry & !L2E_COPIED });
    }
    counts.corruptions += 1;
    problems.push("copied-flag", Some(at), Some(guest), format!("OFLAG_COPIED {}={entry:x} refcount={r}", what()));
    None
}

fn write_incompatible_features(raw: &mut QcowRawFile, h: &mut QcowHeader, value: u64) -> Result<()> {
    if h.version < 3 || h.incompatible_features == value {
        return Ok(());
    }
    raw.write_at(&value.to_be_bytes(), field_offset::INCOMPATIBLE_FEATURES, "header (incompatible_features)")?;
    raw.sync()?;
    h.incompatible_features = value;
    Ok(())
}

/// One check pass over an open image (QEMU's `qcow2_check_refcounts` plus the bit clearing of
/// `qcow2_co_check_locked`). `force_rebuild` rebuilds even if the refcounts look right.
pub fn check_image(
    raw: &mut QcowRawFile,
    h: &mut QcowHeader,
    repair: Repair,
    force_rebuild: bool,
) -> Result<CheckReport> {
    check_image_keep(raw, h, repair, force_rebuild).map(|(report, _)| report)
}

/// What the last walk of a check pass found; a repair changes only refcounts and OFLAG_COPIED
/// bits, which a new walk would not count differently, so the re-check after a repair reuses
/// it instead of reading every table again.
struct LastWalk {
    imrt: Imrt,
    counts: Counts,
    incomplete: bool,
    /// OFLAG_COPIED may still be wrong (the pass did not fix it, or refused a write).
    copied_unsettled: bool,
}

fn check_image_keep(
    raw: &mut QcowRawFile,
    h: &mut QcowHeader,
    repair: Repair,
    force_rebuild: bool,
) -> Result<(CheckReport, LastWalk)> {
    let mut report = CheckReport::default();
    let hc = h.clone();
    let mut w = Walker::new(raw, &hc)?;
    w.walk()?;
    let Walker { mut imrt, counts, problems, mut rebuild, incomplete, beyond_eof, .. } = w;
    report.counts = counts;
    report.problems = problems;
    let pre_compare = report.counts.clone();
    let mut walk_counts = pre_compare.clone();
    let mut highest = compare(raw, h, &imrt, Repair::None, &mut report.counts, &mut rebuild, &mut report.problems)?;
    rebuild |= force_rebuild;
    let original_incompat = h.incompatible_features;

    if rebuild && repair.errors() {
        let old = report.counts.clone();
        // Mark the image as having stale refcounts while the structure is replaced.
        write_incompatible_features(raw, h, h.incompatible_features | INCOMPAT_DIRTY)?;
        // OFLAG_COPIED follows the counts about to be committed, and is fixed before the
        // commit: an interrupted rebuild then never leaves it wrong, even on v2 images, which
        // have no dirty bit to make the next open redo the repair.
        let mut early = Counts::default();
        let pass = CopiedPass { fix: true, from_imrt: true, allow_set: !incomplete };
        check_oflag_copied(raw, h, &imrt, pass, &mut early, &mut ProblemLog::default())?;
        raw.sync()?;
        write_refcount_structure(raw, h, &mut imrt, incomplete, &beyond_eof)?;
        report.rebuilt = true;
        report.counts.corruptions = 0;
        report.counts.leaks = 0;
        // The old structure is now leaked: recount against the new one and free it. (The old
        // count is dropped first: two of them at once would double the peak memory.)
        imrt.clear();
        let hc = h.clone();
        let mut w = Walker::new(raw, &hc)?;
        w.walk()?;
        let mut rebuild_again = w.rebuild;
        walk_counts = w.counts.clone();
        report.counts.corruptions += w.counts.corruptions;
        report.counts.check_errors += w.counts.check_errors;
        imrt = w.imrt;
        let mut fresh = Counts::default();
        let mut scratch = ProblemLog::default();
        let fix = if incomplete { Repair::None } else { Repair::Leaks };
        highest = compare(raw, h, &imrt, fix, &mut fresh, &mut rebuild_again, &mut scratch)?;
        if rebuild_again {
            report.counts.check_errors += 1;
            report.problems.push("rebuild-failed", None, None, "the rebuilt refcount structure is still broken".into());
        }
        if incomplete && fresh.leaks > 0 {
            report.problems.push("leak-repair-skipped", None, None, format!(
                    "{} leaked clusters were not freed: part of the image could not be walked (see the other problems), so they may still hold live data",
                    fresh.leaks
                ));
        }
        report.counts.corruptions_fixed += old.corruptions.saturating_sub(report.counts.corruptions);
        report.counts.leaks_fixed += old.leaks.saturating_sub(report.counts.leaks);
        report.counts.leaks += fresh.leaks;
        report.counts.corruptions_fixed += early.corruptions_fixed;
    } else if repair != Repair::None {
        if rebuild {
            report.counts.check_errors += 1;
            report.problems.push(
                "rebuild-needed",
                None,
                None,
                "need to rebuild refcount structures (repair=\"all\" does it)".into(),
            );
            let last = LastWalk { imrt, counts: walk_counts, incomplete, copied_unsettled: true };
            return Ok((finish(report, highest, h), last));
        }
        if report.counts.leaks > 0 || report.counts.corruptions > 0 {
            if incomplete && report.counts.leaks > 0 {
                report.problems.push("leak-repair-skipped", None, None, "leaked clusters were not freed: part of the image could not be walked, so they may still hold live data".into());
            }
            report.counts = pre_compare;
            let mut scratch = ProblemLog::default();
            highest = if !incomplete {
                compare(raw, h, &imrt, repair, &mut report.counts, &mut rebuild, &mut scratch)?
            } else if repair.errors() {
                // Raise too-low refcounts, but free nothing.
                compare_errors_only(raw, h, &imrt, &mut report.counts, &mut rebuild, &mut scratch)?
            } else {
                compare(raw, h, &imrt, Repair::None, &mut report.counts, &mut rebuild, &mut scratch)?
            };
        }
    }

    let fix_copied = repair.errors()
        || (repair.leaks()
            && report.counts.check_errors == 0
            && report.counts.corruptions == 0
            && report.counts.leaks == 0);
    let pass = CopiedPass { fix: fix_copied, from_imrt: false, allow_set: !incomplete };
    let errors_before = report.counts.check_errors;
    check_oflag_copied(raw, h, &imrt, pass, &mut report.counts, &mut report.problems)?;
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
        write_incompatible_features(raw, h, bits)?;
    }
    let last = LastWalk { imrt, counts: walk_counts, incomplete, copied_unsettled };
    Ok((finish(report, highest, h), last))
}

/// The check after a repair (qemu-img's "double checking the fixed image"): the refcounts
/// compared again with the last walk's counts, and OFLAG_COPIED checked again if the repair
/// left it unsettled.
fn recheck(raw: &mut QcowRawFile, h: &QcowHeader, last: LastWalk) -> Result<CheckReport> {
    let mut report = CheckReport { counts: last.counts, ..CheckReport::default() };
    let mut rebuild = false;
    let highest = compare(raw, h, &last.imrt, Repair::None, &mut report.counts, &mut rebuild, &mut report.problems)?;
    if last.copied_unsettled {
        let pass = CopiedPass { fix: false, from_imrt: false, allow_set: !last.incomplete };
        check_oflag_copied(raw, h, &last.imrt, pass, &mut report.counts, &mut report.problems)?;
    }
    Ok(finish(report, highest, h))
}

/// Like `compare` with `Repair::All`, but never frees leaks (the walk was incomplete).
fn compare_errors_only(
    raw: &mut QcowRawFile,
    h: &QcowHeader,
    imrt: &Imrt,
    counts: &mut Counts,
    rebuild: &mut bool,
    problems: &mut ProblemLog,
) -> Result<u64> {
    // Fix only the too-low refcounts: raise the IMRT-less-than-disk ones to the disk value so
    // that they compare equal and stay untouched.
    let mut adjusted = imrt.clone();
    let mut disk = DiskRefcounts::load(raw, h);
    for i in 0..imrt.len() {
        if let Ok(r1) = disk.get(raw, i) {
            if r1 > imrt.get(i) {
                adjusted.set(i, r1)?;
                counts.leaks += 1;
            }
        }
    }
    compare(raw, h, &adjusted, Repair::All, counts, rebuild, problems)
}

fn finish(mut report: CheckReport, highest: u64, h: &QcowHeader) -> CheckReport {
    report.image_end_offset = (highest + 1) * h.cluster_size();
    report
}

/// Checks (and with `repair`, repairs) the image at `path`, as `qemu-img check [-r ...]`: after
/// a repair that fixed anything, the image is checked again and the report gives the remaining
/// problems with the `*_fixed` counts of the repair. `Repair::None` opens the file read-only.
pub fn check_path(path: &Path, repair: Repair, force_rebuild: bool) -> Result<CheckReport> {
    let writable = repair != Repair::None;
    let file =
        FsOpenOptions::new().read(true).write(writable).open(path).ctx(|| format!("opening '{}'", path.display()))?;
    crate::lock::lock_image(&file, writable, &format!("'{}'", path.display()))?;
    let mut h = QcowHeader::read_from_lenient(&file)?;
    let mut raw = QcowRawFile::from(file, h.cluster_size(), h.refcount_order, writable)?;
    check_file(&mut raw, &mut h, repair, force_rebuild)
}

/// [`check_path`] on an image that is already open (and locked).
pub fn check_file(
    raw: &mut QcowRawFile,
    h: &mut QcowHeader,
    repair: Repair,
    force_rebuild: bool,
) -> Result<CheckReport> {
    let (first, last) = check_image_keep(raw, h, repair, force_rebuild)?;
    if repair == Repair::None
        || (first.counts.corruptions_fixed == 0 && first.counts.leaks_fixed == 0 && !first.rebuilt)
    {
        return Ok(first);
    }
    let mut second = recheck(raw, h, last)?;
    second.counts.corruptions_fixed = first.counts.corruptions_fixed;
    second.counts.leaks_fixed = first.counts.leaks_fixed;
    second.rebuilt = first.rebuilt;
    second.problems = first.problems;
    Ok(second)
}

/// Whether the image's refcounts are stale: the dirty bit is set, the refcount table is
/// missing or broken, or cluster 0's refcount (read at the image's width) is 0.
pub fn refcounts_stale(raw: &mut QcowRawFile, h: &QcowHeader) -> bool {
    if h.is_dirty() || h.validate_refcount_table(raw.file_len()).is_err() {
        return true;
    }
    let mut disk = DiskRefcounts::load(raw, h);
    !matches!(disk.get(raw, 0), Ok(r) if r > 0)
}
