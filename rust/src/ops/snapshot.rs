//! Internal snapshots (`qemu-img snapshot -c/-a/-d`): create, apply and delete on an open
//! image, with QEMU's reference counting (each L1 table that names an L2 table counts one
//! reference to it and one to every cluster it names).
//!
//! Crash safety. On a v3 image the dirty bit is set (and synced) before the first refcount
//! changes and cleared only once everything is durable, so a crash anywhere leaves an image
//! that any writer (QEMU's open, qcowrs's `rebuild=True`) repairs from its references before
//! using its refcounts; the references themselves change in single writes (the snapshot
//! table in the header's 12-byte switch, the active L1 with the size in one write of the first
//! sector), so the snapshot list and the active disk are the old or the new ones. Within, the
//! order is QEMU's: references added before the structure naming them, removed after (at most
//! leaks even without the repair), OFLAG_COPIED fixed last. A v2 image has no dirty bit: the
//! same order leaves at worst leaks and stale OFLAG_COPIED flags (as QEMU does).

use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};
use crate::format::{l1_entry_l2_offset, L2Geometry, INCOMPAT_DIRTY, L1E_COPIED, L2E_COPIED, MAX_SNAPSHOTS};
use crate::header::QcowHeader;
use crate::qcow_file::QcowFile;
use crate::raw_file::QcowRawFile;
use crate::refcount::RefcountManager;
use crate::snapshot::{read_snapshot_table, replace_snapshot_table, Snapshot, SnapshotTable};

/// Finds a snapshot by id, else by name (QEMU's `find_snapshot_by_id_or_name`).
pub fn find<'a>(snapshots: &'a [Snapshot], id_or_name: &str) -> Option<(usize, &'a Snapshot)> {
    snapshots
        .iter()
        .enumerate()
        .find(|(_, s)| s.id == id_or_name)
        .or_else(|| snapshots.iter().enumerate().find(|(_, s)| s.name == id_or_name))
}

/// The virtual size a snapshot was taken at (its extra data; the image's size for old
/// entries without it).
pub fn disk_size(s: &Snapshot, current: u64) -> u64 {
    s.extra.get(8..16).map_or(current, crate::format::be_u64)
}

impl QcowFile {
    /// `qemu-img snapshot -c NAME`: records the disk as it is now; returns the new entry.
    pub fn create_snapshot(&mut self, name: &str) -> Result<Snapshot> {
        if name.is_empty() || name.len() > usize::from(u16::MAX) {
            return Err(Error::InvalidArgument("a snapshot needs a name of 1 to 65535 bytes".into()));
        }
        let (raw, mut h, mut mgr, table) = self.begin_snapshot_op()?;
        if table.snapshots.len() >= MAX_SNAPSHOTS as usize {
            return Err(Error::InvalidArgument(format!("the image already has {MAX_SNAPSHOTS} snapshots")));
        }
        let id = table.snapshots.iter().filter_map(|s| s.id.parse::<u64>().ok()).max().unwrap_or(0) + 1;
        let sn = with_dirty_bit(&raw, &mut h, |h| {
            let l1 = raw.read_u64_table(h.l1_table_offset, u64::from(h.l1_size), "l1_table_offset (L1 table)")?;
            adjust_tree(&raw, h, &mut mgr, &l1, true)?;
            let copy: Vec<u64> = l1.iter().map(|e| e & !L1E_COPIED).collect();
            let l1_offset = write_new_table(&raw, h, &mut mgr, &copy, "snapshot L1 table")?;
            fix_copied(&raw, h, &mut mgr)?;
            let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
            let mut extra = Vec::with_capacity(24);
            extra.extend_from_slice(&0u64.to_be_bytes());
            extra.extend_from_slice(&h.size.to_be_bytes());
            extra.extend_from_slice(&0u64.to_be_bytes());
            let sn = Snapshot {
                entry_offset: 0,
                l1_table_offset: l1_offset,
                l1_size: h.l1_size,
                id: id.to_string(),
                name: name.to_string(),
                date_sec: u32::try_from(now.as_secs()).unwrap_or(u32::MAX),
                // QEMU's clock has microseconds.
                date_nsec: now.subsec_micros() * 1000,
                vm_clock_nsec: 0,
                vm_state_size: 0,
                extra_data_size: 24,
                extra,
            };
            let mut next = table.clone();
            next.snapshots.push(sn.clone());
            replace_snapshot_table(&raw, h, &mut mgr, &next, table.size)?;
            Ok(sn)
        });
        self.finish_snapshot_op(sn)
    }

    /// `qemu-img snapshot -a`: the disk (and its virtual size) reverts to the snapshot.
    pub fn apply_snapshot(&mut self, id_or_name: &str) -> Result<()> {
        let (raw, mut h, mut mgr, table) = self.begin_snapshot_op()?;
        let (_, sn) = find(&table.snapshots, id_or_name).ok_or_else(|| not_found(id_or_name))?;
        let size = disk_size(sn, h.size);
        let r = with_dirty_bit(&raw, &mut h, |h| {
            let cb = raw.cluster_bits();
            let mut l1 = raw.read_u64_table(sn.l1_table_offset, u64::from(sn.l1_size), "snapshot L1 table")?;
            adjust_tree(&raw, h, &mut mgr, &l1, true)?;
            let mut probe = h.clone();
            probe.size = size;
            let needed = usize::try_from(probe.l1_entries_needed()).unwrap_or(usize::MAX);
            if l1.len() < needed {
                l1.resize(needed, 0);
            }
            for e in &mut l1 {
                *e &= !L1E_COPIED;
            }
            let old = raw.read_u64_table(h.l1_table_offset, u64::from(h.l1_size), "l1_table_offset (L1 table)")?;
            let old_clusters = (h.l1_table_offset >> cb, (u64::from(h.l1_size) * 8).div_ceil(raw.cluster_size()));
            let offset = write_new_table(&raw, h, &mut mgr, &l1, "new L1 table")?;
            let entries = u32::try_from(l1.len()).map_err(|_| Error::InvalidArgument("L1 table too large".into()))?;
            h.commit_size_and_l1(&raw, size, entries, offset)?;
            // The old active tree loses the reference the active L1 held.
            adjust_tree(&raw, h, &mut mgr, &old, false)?;
            for k in 0..old_clusters.1 {
                mgr.free_later(old_clusters.0 + k);
            }
            mgr.apply_frees(&raw, h)?;
            mgr.write_dirty_blocks(&raw)?;
            raw.sync()?;
            fix_copied(&raw, h, &mut mgr)
        });
        self.finish_snapshot_op(r)
    }

    /// `qemu-img snapshot -d`: removes the snapshot; what only it held is freed.
    pub fn delete_snapshot(&mut self, id_or_name: &str) -> Result<()> {
        let (raw, mut h, mut mgr, table) = self.begin_snapshot_op()?;
        let (i, sn) = find(&table.snapshots, id_or_name).ok_or_else(|| not_found(id_or_name))?;
        let r = with_dirty_bit(&raw, &mut h, |h| {
            let cb = raw.cluster_bits();
            let l1 = raw.read_u64_table(sn.l1_table_offset, u64::from(sn.l1_size), "snapshot L1 table")?;
            let mut next = table.clone();
            next.snapshots.remove(i);
            replace_snapshot_table(&raw, h, &mut mgr, &next, table.size)?;
            adjust_tree(&raw, h, &mut mgr, &l1, false)?;
            let clusters = (u64::from(sn.l1_size) * 8).div_ceil(raw.cluster_size());
            for k in 0..clusters {
                mgr.free_later((sn.l1_table_offset >> cb) + k);
            }
            mgr.apply_frees(&raw, h)?;
            mgr.write_dirty_blocks(&raw)?;
            raw.sync()?;
            fix_copied(&raw, h, &mut mgr)
        });
        self.finish_snapshot_op(r)
    }

    /// Flushes, and hands out what a snapshot operation works on.
    fn begin_snapshot_op(&mut self) -> Result<(QcowRawFile, QcowHeader, RefcountManager, SnapshotTable)> {
        if !self.writable() {
            return Err(Error::ReadOnlyImage("snapshot operations need an image opened read-write".into()));
        }
        if self.refcounts_stale() {
            return Err(Error::RefcountRebuildRequired(
                "the refcounts are stale (dirty image): open with rebuild=True first".into(),
            ));
        }
        self.flush()?;
        let r = self.raw_file();
        let raw = QcowRawFile::new(std::sync::Arc::clone(r.storage()), r.cluster_size(), r.refcount_order(), true)?;
        let h = self.header().clone();
        let mgr = RefcountManager::load(&raw, &h)?;
        let table = read_snapshot_table(&raw, &h)?;
        Ok((raw, h, mgr, table))
    }

    fn finish_snapshot_op<T>(&mut self, r: Result<T>) -> Result<T> {
        let v = r?;
        self.reload()?;
        Ok(v)
    }
}

fn not_found(id_or_name: &str) -> Error {
    Error::InvalidArgument(format!("snapshot '{id_or_name}' not found"))
}

/// Runs `f` with the dirty bit set (v3), clearing it once `f` succeeded and all is durable.
fn with_dirty_bit<T>(raw: &QcowRawFile, h: &mut QcowHeader, f: impl FnOnce(&mut QcowHeader) -> Result<T>) -> Result<T> {
    let v3 = h.version >= 3;
    if v3 {
        h.commit_incompatible_features(raw, h.incompatible_features | INCOMPAT_DIRTY)?;
    }
    let v = f(h)?;
    raw.sync()?;
    if v3 {
        h.commit_incompatible_features(raw, h.incompatible_features & !INCOMPAT_DIRTY)?;
    }
    Ok(v)
}

fn geometry(raw: &QcowRawFile, h: &QcowHeader) -> L2Geometry {
    L2Geometry::new(raw.cluster_bits(), h.extended_l2(), h.has_data_file())
}

/// Adds (`add`) or drops one reference for an L1 table's tree: each L2 table it names and
/// every cluster those tables name. Added references are written durably before returning;
/// dropped ones are only queued (`apply_frees` once the L1 table is gone from the disk).
fn adjust_tree(raw: &QcowRawFile, h: &mut QcowHeader, mgr: &mut RefcountManager, l1: &[u64], add: bool) -> Result<()> {
    let cb = raw.cluster_bits();
    let geo = geometry(raw, h);
    let words = raw.cluster_size() / 8;
    for &e in l1 {
        let l2 = l1_entry_l2_offset(e);
        if l2 == 0 {
            continue;
        }
        let table = raw.read_u64_table(l2, words, "L2 table")?;
        let mut clusters = vec![l2 >> cb];
        for i in 0..usize::try_from(geo.entries_per_table()).unwrap_or(0) {
            if let Some((first, last)) = geo.referenced_clusters(geo.entry_at(&table, i)) {
                clusters.extend(first..=last);
            }
        }
        for c in clusters {
            if add {
                mgr.add_references(raw, h, c, 1)?;
            } else {
                mgr.free_later(c);
            }
        }
    }
    if add {
        mgr.write_dirty_blocks(raw)?;
        raw.sync()?;
    }
    Ok(())
}

/// Writes `table` (u64 entries) into newly allocated clusters, durable with their refcounts;
/// returns its offset.
fn write_new_table(
    raw: &QcowRawFile,
    h: &mut QcowHeader,
    mgr: &mut RefcountManager,
    table: &[u64],
    what: &str,
) -> Result<u64> {
    let cs = raw.cluster_size();
    let clusters = (table.len() as u64 * 8).div_ceil(cs).max(1);
    let first = mgr.alloc(raw, h, clusters)?;
    mgr.write_dirty_blocks(raw)?;
    raw.sync()?;
    let mut padded = table.to_vec();
    padded.resize(usize::try_from(clusters * cs / 8).unwrap_or(0), 0);
    let offset = first << raw.cluster_bits();
    raw.write_u64_table(offset, &padded, what)?;
    raw.sync()?;
    Ok(offset)
}

/// Sets OFLAG_COPIED in the active tree exactly where the refcount is 1 (L1 entries and the
/// entries of every L2 table the active L1 names).
fn fix_copied(raw: &QcowRawFile, h: &QcowHeader, mgr: &mut RefcountManager) -> Result<()> {
    let cb = raw.cluster_bits();
    let geo = geometry(raw, h);
    let words = raw.cluster_size() / 8;
    let mut l1 = raw.read_u64_table(h.l1_table_offset, u64::from(h.l1_size), "l1_table_offset (L1 table)")?;
    let mut l1_changed = false;
    for e in &mut l1 {
        let l2 = l1_entry_l2_offset(*e);
        if l2 == 0 {
            continue;
        }
        let own = mgr.get(raw, l2 >> cb)? == 1;
        let want = if own { *e | L1E_COPIED } else { *e & !L1E_COPIED };
        l1_changed |= want != *e;
        *e = want;
        // A table shared with a snapshot is fixed too: its flags only matter to the active
        // tree (and every cluster it names is shared as well, so its flags end up clear).
        let mut table = raw.read_u64_table(l2, words, "L2 table")?;
        let mut changed = false;
        for i in 0..usize::try_from(geo.entries_per_table()).unwrap_or(0) {
            let mut en = geo.entry_at(&table, i);
            let copied = match geo.cluster_type(en) {
                crate::format::ClusterType::Normal | crate::format::ClusterType::ZeroAlloc if !h.has_data_file() => {
                    mgr.get(raw, en.host_offset() >> cb)? == 1
                }
                _ => continue,
            };
            let want = if copied { en.entry | L2E_COPIED } else { en.entry & !L2E_COPIED };
            if want != en.entry {
                en.entry = want;
                geo.set_entry(&mut table, i, en);
                changed = true;
            }
        }
        if changed {
            raw.write_u64_table(l2, &table, "L2 table")?;
        }
    }
    raw.sync()?;
    if l1_changed {
        raw.write_u64_table(h.l1_table_offset, &l1, "L1 table")?;
        raw.sync()?;
    }
    Ok(())
}
