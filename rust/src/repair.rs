//! Repairs beyond QEMU's: what `qemu-img check -r all` cannot fix, fixed before the refcount
//! pass so that the walk that counts the refcounts is complete.
//!
//! * entries pointing past the end of the file (their data is lost) are cleared: an L1 entry
//!   becomes 0, an L2 entry a zero cluster (unallocated on v2), so that no later allocation
//!   makes them read someone else's data;
//! * the snapshot table keeps its readable, valid entries (an entry whose L1 table is
//!   misaligned, too large or past the end of the file is dropped; entries past an unreadable
//!   one are dropped; too much extra data is cut to 1024 bytes; a v3 entry with less than 16
//!   bytes of it gets them), rewritten at a new place if anything but its length changed;
//! * a misplaced active L1 table (misaligned, over the header, past the end of the file, too
//!   small or too large for the virtual size) is copied, as far as it can be read, to a new
//!   place of the right size.
//!
//! New tables are appended at the end of the file, past any cluster a remaining bad reference
//! names, written and synced, then switched to with one header write each; the dirty bit (v3)
//! is set first and the caller then rebuilds the refcounts, so a crash at any point leaves an
//! image the next repair finishes. Every dropped or changed structure is listed.

use std::collections::BTreeMap;

use crate::count::{Dangling, EntryFix, ReferenceCount};
use crate::error::Result;
use crate::format::{L2Geometry, INCOMPAT_DIRTY};
use crate::header::QcowHeader;
use crate::raw_file::QcowRawFile;
use crate::report::Problem;
use crate::snapshot::{commit_snapshot_table, read_snapshot_table_lenient, Snapshot, SnapshotTable};

/// QEMU's limit on an L1 table, in entries.
const MAX_L1_ENTRIES: u64 = 4 << 20;
/// The type a stray extension is renamed to: no reader knows it, so every reader skips it
/// ("qcrs" dropped).
const IGNORED_EXTENSION: u32 = 0x7163_7273;

/// Whether the count found damage to the structure itself that `fix_structure` repairs.
pub(crate) fn needs_structural_repair(count: &ReferenceCount) -> bool {
    !count.dangling.is_empty()
        || count.l1_problem.is_some()
        || count.snapshots_damaged
        || count.stray_crypto_ext.is_some()
        || count.bitmaps_damaged.is_some()
}

/// Repairs the structure (see the module documentation). `count` is a count of the image as
/// it is. Appends what it did to `dropped`.
pub(crate) fn fix_structure(
    raw: &QcowRawFile,
    h: &mut QcowHeader,
    count: &ReferenceCount,
    dropped: &mut Vec<Problem>,
) -> Result<()> {
    h.commit_incompatible_features(raw, h.incompatible_features | INCOMPAT_DIRTY)?;
    let mut f = Fixer { raw, count, dropped, next_free: raw.file_clusters() };
    let geo = L2Geometry::new(h.cluster_bits, h.extended_l2(), h.has_data_file());
    f.clear_dangling(h, geo)?;
    f.fix_snapshot_table(h)?;
    f.fix_extensions(h)?;
    f.move_l1(h)
}

struct Fixer<'a> {
    raw: &'a QcowRawFile,
    count: &'a ReferenceCount,
    dropped: &'a mut Vec<Problem>,
    /// The first cluster past the end of the file not yet appended.
    next_free: u64,
}

impl Fixer<'_> {
    fn note(&mut self, kind: &'static str, host: Option<u64>, guest: Option<u64>, message: String) {
        self.dropped.push(Problem { kind, host_offset: host, guest_offset: guest, message, qemu: None });
    }

    /// `n` clusters at the end of the file, past every cluster a bad reference names.
    fn append(&mut self, n: u64) -> u64 {
        let mut c = self.next_free;
        while let Some(&bad) = self.count.beyond_eof.range(c..c.saturating_add(n)).next_back() {
            c = bad + 1;
        }
        self.next_free = c + n;
        c
    }

    /// Whether the entries at `entries` of the table at `offset` may be written in place:
    /// nothing but the table's own references use the clusters written (an L2 table: only L1
    /// entries name it; an L1 table: the clusters holding the entries have refcount 1).
    fn table_is_private(&self, offset: u64, entries: &[Dangling], l2: bool, cb: u32) -> bool {
        if l2 {
            return self.count.only_an_l2_table(offset, cb);
        }
        entries.iter().all(|d| {
            let c = d.at >> cb;
            self.count.imrt.get(c) == 1 && !self.count.overflowed.contains(&c)
        })
    }

    /// Clears the entries that point past the end of the file, one table at a time, where the
    /// table may be written.
    fn clear_dangling(&mut self, h: &QcowHeader, geo: L2Geometry) -> Result<()> {
        let cb = h.cluster_bits;
        let mut by_table: BTreeMap<(u64, bool), Vec<Dangling>> = BTreeMap::new();
        for d in &self.count.dangling {
            // A misplaced active L1 table is cleared in its moved copy instead.
            if d.l1 && d.active && self.count.l1_problem.is_some() {
                continue;
            }
            by_table.entry((d.table, d.l1)).or_default().push(*d);
        }
        for ((table, l1), entries) in by_table {
            if table % h.cluster_size() != 0 || !self.table_is_private(table, &entries, !l1, cb) {
                let msg = format!(
                    "{} bad entries of the table at 0x{table:x} (pointing past the end of the file, or compressed with a subcluster bitmap) are left as they are: the table shares its clusters with other data",
                    entries.len()
                );
                self.note("repair-refused", Some(table), None, msg);
                continue;
            }
            for d in entries {
                let fix = match d.fix {
                    EntryFix::Compressed(off, len) => self.shorten_compressed(h, geo, off, len)?,
                    other => other,
                };
                if let EntryFix::Set(entry, bitmap) = fix {
                    let mut bytes = entry.to_be_bytes().to_vec();
                    if geo.extended && !l1 {
                        bytes.extend_from_slice(&bitmap.to_be_bytes());
                    }
                    self.raw.write_at(&bytes, d.at, "table entry (repaired)")?;
                    let what = if l1 { "l1-entry" } else { "l2-entry" };
                    let msg = format!("entry at 0x{:x} repaired to 0x{entry:x} (invalid bits removed)", d.at);
                    self.note(what, Some(d.at), d.guest, msg);
                } else if l1 {
                    self.raw.write_at(&[0u8; 8], d.at, "L1 entry (cleared: its L2 table cannot be read)")?;
                    let msg = format!("L1 entry at 0x{:x} cleared: its L2 table lay past the end of the file or at a misaligned offset", d.at);
                    self.note("l1-entry", Some(d.at), d.guest, msg);
                } else {
                    let e = geo.make_zero(h.version);
                    let mut bytes = e.entry.to_be_bytes().to_vec();
                    if geo.extended {
                        bytes.extend_from_slice(&e.bitmap.to_be_bytes());
                    }
                    self.raw.write_at(&bytes, d.at, "L2 entry (cleared: its data lies past the end of the file)")?;
                    let msg = format!("L2 entry at 0x{:x} made a zero cluster: its data lay past the end of the file or at a misaligned offset", d.at);
                    self.note("l2-entry", Some(d.at), d.guest, msg);
                }
            }
        }
        self.raw.sync()
    }

    /// A compressed cluster running past the end of the file: if its stream decompresses from
    /// the bytes the file holds, its descriptor is cut to them (its data kept); else cleared.
    fn shorten_compressed(&self, h: &QcowHeader, geo: L2Geometry, off: u64, len: u64) -> Result<EntryFix> {
        let avail = self.raw.file_len().saturating_sub(off).min(len);
        if avail == 0 {
            return Ok(EntryFix::Clear);
        }
        let input = self.raw.read_available(off, avail)?;
        let mut out = vec![0u8; usize::try_from(h.cluster_size()).unwrap_or(0)];
        if crate::compression::decompress(h.compression_type, &input, &mut out).is_err() {
            return Ok(EntryFix::Clear);
        }
        let e = geo.make_compressed(off, avail);
        Ok(EntryFix::Set(e.entry, e.bitmap))
    }

    /// Keeps the readable, valid snapshots (see the module documentation).
    fn fix_snapshot_table(&mut self, h: &mut QcowHeader) -> Result<()> {
        if !self.count.snapshots_damaged {
            return Ok(());
        }
        let (table, damage) = read_snapshot_table_lenient(self.raw, h, true);
        let mut keep: Vec<Snapshot> = Vec::new();
        let mut changed = damage.is_some() || h.snapshots_offset % h.cluster_size() != 0;
        if let Some(d) = &damage {
            let msg = format!("snapshots {}.. dropped: {}", d.index, d.reason);
            self.note("snapshot", Some(d.offset), None, msg);
        }
        for (i, sn) in table.snapshots.into_iter().enumerate() {
            if let Some(why) = self.snapshot_unusable(h, &sn) {
                let msg = format!("snapshot {i} (id {:?}, name {:?}) dropped: {why}", sn.id, sn.name);
                self.note("snapshot", Some(sn.entry_offset), None, msg);
                changed = true;
                continue;
            }
            let mut sn = sn;
            if h.version >= 3 && sn.extra.len() < 16 {
                // As QEMU's repair: the 64-bit VM state size and the disk size are recorded.
                let mut extra = u64::from(sn.vm_state_size).to_be_bytes().to_vec();
                extra.extend_from_slice(&h.size.to_be_bytes());
                sn.extra = extra;
                sn.extra_data_size = 16;
                changed = true;
            }
            keep.push(sn);
        }
        let past_eof = h.snapshots_offset.saturating_add(table.size) > self.raw.file_len();
        if !changed && !past_eof {
            return Ok(());
        }
        let new = SnapshotTable { size: 0, snapshots: keep };
        let n = u32::try_from(new.snapshots.len()).unwrap_or(u32::MAX);
        if n == 0 {
            return commit_snapshot_table(self.raw, h, 0, 0);
        }
        let bytes = new.to_bytes();
        let first = self.append((bytes.len() as u64).div_ceil(h.cluster_size()));
        let at = first << h.cluster_bits;
        self.raw.write_at(&bytes, at, "repaired snapshot table")?;
        self.raw.sync()?;
        let msg = format!("snapshot table rewritten at 0x{at:x} with {n} entries");
        self.note("snapshot-table", Some(at), None, msg);
        commit_snapshot_table(self.raw, h, n, at)
    }

    /// Why a snapshot cannot be kept, if it cannot.
    fn snapshot_unusable(&self, h: &QcowHeader, sn: &Snapshot) -> Option<String> {
        let cs = h.cluster_size();
        if h.snapshots_offset == 0 {
            return Some("the snapshot table lies over the header".into());
        }
        if h.has_data_file() {
            return Some("an image with an external data file cannot have snapshots".into());
        }
        let entry_len = 40 + sn.extra.len() as u64 + sn.id.len() as u64 + sn.name.len() as u64;
        if sn.entry_offset.saturating_add(entry_len) > self.raw.file_len() {
            return Some(format!("its table entry at 0x{:x} lies past the end of the file", sn.entry_offset));
        }
        if sn.l1_table_offset % cs != 0 {
            return Some(format!("its L1 table offset 0x{:x} is not cluster aligned", sn.l1_table_offset));
        }
        if u64::from(sn.l1_size) > MAX_L1_ENTRIES {
            return Some(format!("its L1 table has {} entries, above QEMU's limit", sn.l1_size));
        }
        let end = sn.l1_table_offset.saturating_add(u64::from(sn.l1_size) * 8);
        if sn.l1_size > 0 && (sn.l1_table_offset == 0 || end > self.raw.file_clusters() * cs) {
            return Some(format!("its L1 table at 0x{:x} lies outside the file", sn.l1_table_offset));
        }
        None
    }

    /// Header extensions QEMU refuses or bitmaps that cannot be trusted: a crypto header
    /// extension on an unencrypted image is renamed to an unknown type (which every reader
    /// ignores; one 4-byte write), and unusable bitmaps are given up by clearing autoclear bit
    /// 0 (QEMU then ignores the bitmaps extension; the bitmaps' clusters become leaks).
    fn fix_extensions(&mut self, h: &mut QcowHeader) -> Result<()> {
        if let Some(at) = self.count.stray_crypto_ext {
            self.raw.write_at(
                &IGNORED_EXTENSION.to_be_bytes(),
                at,
                "header extension type (crypto header on an unencrypted image)",
            )?;
            self.raw.sync()?;
            let msg =
                format!("crypto header extension at 0x{at:x} renamed to an ignored type: the image is not encrypted");
            self.note("header-extension", Some(at), None, msg);
        }
        if let Some(why) = self.count.bitmaps_damaged.clone() {
            h.commit_autoclear_features(self.raw, h.autoclear_features & !crate::format::AUTOCLEAR_BITMAPS)?;
            let msg = format!("persistent bitmaps given up (marked inconsistent): {why}");
            self.note("bitmaps", Some(crate::header::field_offset::AUTOCLEAR_FEATURES), None, msg);
        }
        Ok(())
    }

    /// Copies a misplaced active L1 table to a new place of the right size.
    fn move_l1(&mut self, h: &mut QcowHeader) -> Result<()> {
        let Some(problem) = self.count.l1_problem.clone() else { return Ok(()) };
        let cs = h.cluster_size();
        let needed = h.l1_entries_needed();
        if needed > MAX_L1_ENTRIES {
            return Err(crate::error::Error::corrupt(
                format!("repair refused: the virtual size {} needs an L1 table above QEMU's 32 MiB limit", h.size),
                crate::header::field_offset::SIZE,
            ));
        }
        let old = u64::from(h.l1_size);
        let readable = if h.l1_table_offset == 0 { 0 } else { old.min(MAX_L1_ENTRIES) };
        let mut l1 = self.raw.read_u64s_available(h.l1_table_offset, readable)?;
        for d in self.count.dangling.iter().filter(|d| d.l1 && d.active) {
            let slot = d.at.checked_sub(h.l1_table_offset).and_then(|o| usize::try_from(o / 8).ok());
            if let Some(e) = slot.and_then(|i| l1.get_mut(i)) {
                *e = match d.fix {
                    EntryFix::Set(v, _) => v,
                    EntryFix::Clear | EntryFix::Compressed(..) => 0,
                };
            }
        }
        let len = if old > MAX_L1_ENTRIES { needed } else { needed.max(old) };
        let len = usize::try_from(len).unwrap_or(0);
        let lost = l1.iter().skip(len).filter(|&&e| e != 0).count();
        l1.resize(len, 0);
        let clusters = (len as u64 * 8).div_ceil(cs).max(1);
        let mut padded = l1;
        padded.resize(usize::try_from(clusters * cs / 8).unwrap_or(0), 0);
        let first = self.append(clusters);
        let at = first << h.cluster_bits;
        self.raw.write_u64_table(at, &padded, "moved L1 table")?;
        self.raw.sync()?;
        let mut msg = format!("active L1 table copied to 0x{at:x} ({len} entries): {problem}");
        if lost > 0 {
            msg.push_str(&format!("; {lost} entries past the virtual size dropped"));
        }
        self.note("l1-table", Some(at), None, msg);
        h.commit_l1_table(self.raw, u32::try_from(len).unwrap_or(u32::MAX), at)
    }
}
