//! `compat=0.10` on a v3 image (QEMU's `qcow2_downgrade`): QEMU's refusals, zero clusters
//! expanded (v2 has no zero flag), then the header rewritten as v2.
//!
//! Zero clusters, in every L2 table (the active ones and the snapshots'), table by table:
//! * a preallocated zero cluster (`ZERO_ALLOC`) that only this table references is zeroed in
//!   place and becomes a data cluster, as in QEMU;
//! * a preallocated zero cluster shared with another table is not zeroed (QEMU zeroes it in
//!   place, which changes what the other table's snapshot reads): this table's entry is
//!   handled as a plain zero cluster and its reference dropped after all tables are done;
//! * a plain zero cluster becomes unallocated when the image has no backing file (it reads as
//!   zeros either way), else a new zeroed cluster.
//!
//! Per table: new clusters' refcounts are written and synced, the clusters zeroed and synced,
//! then the table is written (each 8-byte entry lands old or new: both read as zeros) and
//! synced; the dropped references are released last. A crash leaves a v3 image with the same
//! guest content and at most leaked clusters. Persistent bitmaps cannot be kept in a v2 image
//! (QEMU keeps the extension, warns on every open and leaks their clusters): the extension is
//! dropped and the clusters freed by a leak repair at the end.

use std::collections::HashSet;

use crate::check::{check_raw, Repair};
use crate::error::{Error, Result};
use crate::format::{
    l1_entry_l2_offset, ClusterType, L2Geometry, EXT_BITMAPS, EXT_FEATURE_TABLE, INCOMPAT_COMPRESSION, INCOMPAT_DIRTY,
    L2E_COPIED,
};
use crate::header::QcowHeader;
use crate::qcow_file::QcowFile;
use crate::raw_file::QcowRawFile;
use crate::refcount::RefcountManager;
use crate::snapshot::read_snapshot_table;

/// QEMU's refusals, checked before anything is written. `order` and `size` are what the
/// refcount width and the virtual size will be when the downgrade runs.
pub(super) fn refusals(f: &QcowFile, order: u32, size: u64) -> Result<()> {
    let h = f.header();
    let refuse = |m: String| Err(Error::InvalidArgument(m));
    if order != 4 {
        return refuse("compat=0.10 requires refcount_bits=16".into());
    }
    if h.has_data_file() {
        return refuse("Cannot downgrade an image with a data file".into());
    }
    for s in f.snapshots()? {
        let word = |at: usize| s.extra.get(at..at + 8).map(crate::format::be_u64);
        let vm_state = word(0).unwrap_or(u64::from(s.vm_state_size));
        let disk = word(8).unwrap_or(size);
        if vm_state > u64::from(u32::MAX) || disk != size {
            return refuse("Internal snapshots prevent downgrade of image".into());
        }
    }
    let other = h.incompatible_features & !(INCOMPAT_DIRTY | INCOMPAT_COMPRESSION);
    if other != 0 {
        return refuse(format!("Cannot downgrade an image with incompatible features {other:#x} set"));
    }
    // QEMU looks at the active layer only; a compressed cluster a snapshot keeps would read as
    // garbage in a v2 (zlib) image just as well.
    if h.incompatible_features & INCOMPAT_COMPRESSION != 0 && has_compressed(f.raw_file(), h)? {
        return refuse("Cannot downgrade an image with zstd compression type and existing compressed clusters".into());
    }
    Ok(())
}

/// Every L2 table of the image once: the snapshots' first, the active ones last.
fn l2_tables(raw: &QcowRawFile, h: &QcowHeader) -> Result<Vec<u64>> {
    let mut l1s: Vec<(u64, u32)> =
        read_snapshot_table(raw, h)?.snapshots.iter().map(|s| (s.l1_table_offset, s.l1_size)).collect();
    l1s.push((h.l1_table_offset, h.l1_size));
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (off, n) in l1s {
        for e in raw.read_u64_table(off, u64::from(n), "L1 table")? {
            let l2 = l1_entry_l2_offset(e);
            if l2 != 0 && seen.insert(l2) {
                out.push(l2);
            }
        }
    }
    Ok(out)
}

fn geometry(raw: &QcowRawFile) -> L2Geometry {
    L2Geometry::new(raw.cluster_bits(), false, false)
}

fn has_compressed(raw: &QcowRawFile, h: &QcowHeader) -> Result<bool> {
    let geo = geometry(raw);
    for l2 in l2_tables(raw, h)? {
        let table = raw.read_u64_table(l2, geo.entries_per_table(), "L2 table")?;
        if (0..table.len()).any(|i| geo.cluster_type(geo.entry_at(&table, i)) == ClusterType::Compressed) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Expands the zero clusters and rewrites the header as v2 (see the module documentation).
pub(super) fn downgrade(raw: &QcowRawFile, h: &mut QcowHeader) -> Result<()> {
    let mut z = Expander {
        geo: geometry(raw),
        has_backing: h.backing_file.as_deref().is_some_and(|b| !b.is_empty()),
        mgr: RefcountManager::load(raw, h)?,
        shared: HashSet::new(),
        frees: Vec::new(),
        zeros: vec![0u8; usize::try_from(raw.cluster_size()).unwrap_or(0)],
    };
    for l2 in l2_tables(raw, h)? {
        z.expand_table(raw, h, l2)?;
    }
    for (c, n) in std::mem::take(&mut z.frees) {
        for _ in 0..n {
            z.mgr.free_later(c);
        }
    }
    z.mgr.apply_frees(raw, h)?;
    z.mgr.write_dirty_blocks(raw)?;
    raw.sync()?;

    let mut next = h.clone();
    next.version = 2;
    next.header_length = crate::format::V2_HEADER_LEN;
    next.compression_type = 0;
    next.extra_header_bytes.clear();
    next.incompatible_features = 0;
    next.compatible_features = 0;
    next.autoclear_features = 0;
    next.extensions.retain(|e| e.kind != EXT_FEATURE_TABLE && e.kind != EXT_BITMAPS);
    super::rewrite_header(raw, h, next)?;
    // Dropped bitmaps' clusters (and the references of a pathological table the frees left
    // with a stale OFLAG_COPIED) are repaired now.
    if !check_raw(raw, h, Repair::None, false)?.is_clean() {
        check_raw(raw, h, Repair::All, false)?;
    }
    Ok(())
}

struct Expander {
    geo: L2Geometry,
    has_backing: bool,
    mgr: RefcountManager,
    /// Preallocated zero clusters found shared: every table's reference to them is dropped.
    shared: HashSet<u64>,
    /// (cluster, references) to drop once every table is rewritten.
    frees: Vec<(u64, u64)>,
    zeros: Vec<u8>,
}

impl Expander {
    fn expand_table(&mut self, raw: &QcowRawFile, h: &mut QcowHeader, l2: u64) -> Result<()> {
        let cb = raw.cluster_bits();
        let mut table = raw.read_u64_table(l2, self.geo.entries_per_table(), "L2 table")?;
        let zero: Vec<usize> = (0..table.len())
            .filter(|&i| {
                matches!(
                    self.geo.cluster_type(self.geo.entry_at(&table, i)),
                    ClusterType::ZeroPlain | ClusterType::ZeroAlloc
                )
            })
            .collect();
        if zero.is_empty() {
            return Ok(());
        }
        // Each L1 table that names this table counts one reference to its clusters.
        let refs = self.mgr.get(raw, l2 >> cb)?.max(1);
        let copied = if refs == 1 { L2E_COPIED } else { 0 };
        let mut fill = Vec::new();
        for i in zero {
            let e = self.geo.entry_at(&table, i);
            let x = e.host_offset();
            let alloc = self.geo.cluster_type(e) == ClusterType::ZeroAlloc;
            let own = alloc && !self.shared.contains(&x) && self.mgr.get(raw, x >> cb)? == refs;
            table[i] = if own {
                fill.push(x);
                x | copied
            } else {
                if alloc {
                    self.shared.insert(x);
                    self.frees.push((x >> cb, refs));
                }
                if self.has_backing {
                    let c = self.mgr.alloc(raw, h, 1)?;
                    if refs > 1 {
                        self.mgr.add_references(raw, h, c, refs - 1)?;
                    }
                    fill.push(c << cb);
                    (c << cb) | copied
                } else {
                    0
                }
            };
        }
        if self.mgr.is_dirty() {
            self.mgr.write_dirty_blocks(raw)?;
            raw.sync()?;
        }
        for &t in &fill {
            raw.write_at(&self.zeros, t, "zeroed data cluster")?;
        }
        if !fill.is_empty() {
            raw.sync()?;
        }
        raw.write_u64_table(l2, &table, "L2 table")?;
        raw.sync()
    }
}
