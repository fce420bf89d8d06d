//! `RefcountManager`: the refcounts of a writable image — lookups, cluster allocation (holes
//! first, never a cluster with a non-zero refcount), deferred frees, new refblocks and reftable
//! growth.
//!
//! Ordering contract (kept by `QcowFile::flush`): refblocks reach the disk before the reftable
//! entries that point at them, and both before any L2/L1 entry that references a newly
//! allocated cluster; decrements (frees) are applied only after the references are gone from
//! the disk. A crash therefore leaves at worst leaked clusters.

use crate::cache::TableCache;
use crate::error::{Error, Result};
use crate::format::{be_u64, decode_refcounts, encode_refcounts, RefcountGeometry, REFT_OFFSET_MASK};
use crate::header::{field_offset, QcowHeader};
use crate::raw_file::QcowRawFile;

/// Refblocks kept decoded in memory.
const REFBLOCK_CACHE: usize = 64;

/// The refcounts of a writable image.
pub struct RefcountManager {
    geo: RefcountGeometry,
    reftable: Vec<u64>,
    reftable_offset: u64,
    reftable_clusters: u32,
    /// Reftable entries changed in memory (new refblocks) and not yet written.
    reftable_dirty: bool,
    /// Decoded refblocks keyed by refblock index.
    blocks: TableCache<Vec<u64>>,
    /// Every cluster at or past this index has refcount 0.
    end_cluster: u64,
    /// No free cluster below this index.
    free_hint: u64,
    /// Clusters whose references are being removed; decremented by `apply_frees` once the
    /// removal is on disk.
    pending_frees: Vec<u64>,
}

impl RefcountManager {
    /// Loads the reftable and finds the end of the used area.
    pub fn load(raw: &mut QcowRawFile, h: &QcowHeader) -> Result<Self> {
        let cs = h.cluster_size();
        let geo = raw.refcount_geometry();
        let bytes = u64::from(h.refcount_table_clusters) * cs;
        let mut buf = vec![0u8; usize::try_from(bytes).unwrap_or(0)];
        raw.read_table_bytes(h.refcount_table_offset, &mut buf, "refcount_table_offset (refcount table)")?;
        let reftable: Vec<u64> = buf.chunks_exact(8).map(be_u64).collect();
        let mut m = RefcountManager {
            geo,
            reftable,
            reftable_offset: h.refcount_table_offset,
            reftable_clusters: h.refcount_table_clusters,
            reftable_dirty: false,
            blocks: TableCache::new(REFBLOCK_CACHE),
            end_cluster: raw.file_len().div_ceil(cs),
            free_hint: 0,
            pending_frees: Vec::new(),
        };
        // Refcounts may extend past the end of the file: find the last non-zero one.
        if let Some(ri) = m.reftable.iter().rposition(|&e| e & REFT_OFFSET_MASK != 0) {
            m.load_block(raw, ri as u64)?;
            if let Some(last) = m.blocks.get(ri as u64).and_then(|b| b.iter().rposition(|&r| r != 0)) {
                let c = ri as u64 * geo.refblock_entries() + last as u64 + 1;
                m.end_cluster = m.end_cluster.max(c);
            }
        }
        Ok(m)
    }

    fn entries_per_block(&self) -> u64 {
        self.geo.refblock_entries()
    }

    /// Loads refblock `ri` into the cache (a missing refblock reads as all-zero).
    fn load_block(&mut self, raw: &mut QcowRawFile, ri: u64) -> Result<()> {
        if self.blocks.get(ri).is_some() {
            return Ok(());
        }
        let off = self.refblock_offset(ri);
        let v = if off == 0 {
            vec![0u64; usize::try_from(self.entries_per_block()).unwrap_or(0)]
        } else {
            let mut buf = vec![0u8; usize::try_from(raw.cluster_size()).unwrap_or(0)];
            raw.read_table_bytes(off, &mut buf, &format!("refcount block {ri}"))?;
            decode_refcounts(&buf, self.geo.refcount_order)
        };
        self.insert_block(raw, ri, v, false)
    }

    fn insert_block(&mut self, raw: &mut QcowRawFile, ri: u64, block: Vec<u64>, dirty: bool) -> Result<()> {
        if let Some((k, evicted)) = self.blocks.insert(ri, block, dirty) {
            // A dirty refblock only holds increments (frees are deferred): it may be written
            // at any time, as long as its reftable entry follows it.
            self.write_block(raw, k, &evicted)?;
            if self.reftable_dirty {
                raw.sync()?;
                raw.write_pointer_table(self.reftable_offset, &self.reftable, 0)?;
                self.reftable_dirty = false;
            }
        }
        Ok(())
    }

    fn refblock_offset(&self, ri: u64) -> u64 {
        usize::try_from(ri).ok().and_then(|r| self.reftable.get(r)).copied().unwrap_or(0) & REFT_OFFSET_MASK
    }

    fn write_block(&self, raw: &mut QcowRawFile, ri: u64, block: &[u64]) -> Result<()> {
        let off = self.refblock_offset(ri);
        if off == 0 {
            return Err(Error::corrupt(format!("refcount block {ri} has no cluster"), self.reftable_offset));
        }
        let mut buf = vec![0u8; usize::try_from(raw.cluster_size()).unwrap_or(0)];
        encode_refcounts(block, self.geo.refcount_order, &mut buf);
        raw.write_at(&buf, off, "refcount block")
    }

    /// Refcount of cluster `c`.
    pub fn get(&mut self, raw: &mut QcowRawFile, c: u64) -> Result<u64> {
        let e = self.entries_per_block();
        self.load_block(raw, c / e)?;
        let idx = usize::try_from(c % e).unwrap_or(0);
        Ok(self.blocks.get(c / e).and_then(|b| b.get(idx)).copied().unwrap_or(0))
    }

    /// Sets the refcount of cluster `c`; clusters in `reserved` are being allocated together
    /// with it and must not host a new refblock.
    fn set(
        &mut self,
        raw: &mut QcowRawFile,
        h: &mut QcowHeader,
        c: u64,
        v: u64,
        reserved: std::ops::Range<u64>,
    ) -> Result<()> {
        if v > self.geo.refcount_max() {
            return Err(Error::corrupt(
                format!(
                    "refcount of cluster 0x{:x} would overflow the {}-bit width",
                    c << self.geo.cluster_bits,
                    self.geo.refcount_bits()
                ),
                c << self.geo.cluster_bits,
            ));
        }
        self.ensure_refblock(raw, h, c, reserved)?;
        let e = self.entries_per_block();
        self.load_block(raw, c / e)?;
        let idx = usize::try_from(c % e).unwrap_or(0);
        if let Some(b) = self.blocks.get_mut(c / e) {
            b[idx] = v;
        }
        Ok(())
    }

    /// Makes sure cluster `c`'s refblock exists, creating it inside its own range if needed
    /// (a self-describing refblock), growing the reftable first if it is too small.
    fn ensure_refblock(
        &mut self,
        raw: &mut QcowRawFile,
        h: &mut QcowHeader,
        c: u64,
        reserved: std::ops::Range<u64>,
    ) -> Result<()> {
        let e = self.entries_per_block();
        let ri = c / e;
        if ri >= self.reftable.len() as u64 {
            self.grow_reftable(raw, h, ri + 1)?;
        }
        if self.refblock_offset(ri) != 0 {
            return Ok(());
        }
        // No refblock: every cluster of the range is free. Use the first one that is not being
        // allocated.
        let first = ri * e;
        let mut b = first;
        while b == c || reserved.contains(&b) {
            b += 1;
        }
        if b >= first + e {
            return Err(Error::InvalidClusterIndex(format!("no room for refcount block {ri}")));
        }
        let idx = usize::try_from(ri).unwrap_or(0);
        self.reftable[idx] = b << self.geo.cluster_bits;
        self.reftable_dirty = true;
        let mut block = vec![0u64; usize::try_from(e).unwrap_or(0)];
        block[usize::try_from(b - first).unwrap_or(0)] = 1;
        self.insert_block(raw, ri, block, true)?;
        self.end_cluster = self.end_cluster.max(b + 1);
        Ok(())
    }

    /// Moves the reftable to a larger place at the end of the image and commits it with one
    /// header write; everything it needs is written and synced before the header switches.
    fn grow_reftable(&mut self, raw: &mut QcowRawFile, h: &mut QcowHeader, min_entries: u64) -> Result<()> {
        // Whatever is pending goes to the old places first (the old table keeps its size).
        self.write_dirty_blocks(raw)?;
        let cb = self.geo.cluster_bits;
        let cs = 1u64 << cb;
        let e = self.entries_per_block();
        let per_cluster = cs / 8;
        let start = self.end_cluster;
        // Room for the new table's own clusters and the refblocks they may need.
        let mut entries = min_entries.max(self.reftable.len() as u64 * 2);
        let n = loop {
            let n = entries.div_ceil(per_cluster);
            let reach = (start + 2 * n + 2).div_ceil(e);
            if reach <= entries {
                break n;
            }
            entries = reach;
        };
        let entries = n * per_cluster;
        let old = (self.reftable_offset, self.reftable_clusters);
        self.reftable.resize(usize::try_from(entries).unwrap_or(0), 0);
        let mut end = start + n;
        let mut need: Vec<u64> = (start..start + n).collect();
        while let Some(c) = need.pop() {
            let ri = c / e;
            let idx = usize::try_from(ri).unwrap_or(usize::MAX);
            if idx >= self.reftable.len() {
                return Err(Error::InvalidRefcountTableSize("reftable growth does not converge".into()));
            }
            if self.reftable[idx] & REFT_OFFSET_MASK == 0 {
                let b = end;
                end += 1;
                self.reftable[idx] = b << cb;
                self.insert_block(raw, ri, vec![0u64; usize::try_from(e).unwrap_or(0)], true)?;
                need.push(b);
            }
            self.load_block(raw, ri)?;
            if let Some(bl) = self.blocks.get_mut(ri) {
                bl[usize::try_from(c % e).unwrap_or(0)] = 1;
            }
        }
        self.end_cluster = end;
        // Every refblock first, then the new table, durable; then one header write.
        self.reftable_dirty = false;
        let keys = self.blocks.dirty_keys();
        for ri in keys {
            if let Some(b) = self.blocks.get(ri).cloned() {
                self.write_block(raw, ri, &b)?;
            }
            self.blocks.mark_clean(ri);
        }
        raw.write_pointer_table(start << cb, &self.reftable, 0)?;
        raw.sync()?;
        let clusters =
            u32::try_from(n).map_err(|_| Error::InvalidRefcountTableSize(format!("a reftable of {n} clusters")))?;
        let mut commit = [0u8; 12];
        commit[..8].copy_from_slice(&(start << cb).to_be_bytes());
        commit[8..].copy_from_slice(&clusters.to_be_bytes());
        raw.write_at(&commit, field_offset::REFCOUNT_TABLE_OFFSET, "header (refcount table)")?;
        raw.sync()?;
        self.reftable_offset = start << cb;
        self.reftable_clusters = clusters;
        h.refcount_table_offset = self.reftable_offset;
        h.refcount_table_clusters = clusters;
        // The old reftable is no longer referenced by anything on disk.
        for k in 0..u64::from(old.1) {
            self.pending_frees.push((old.0 >> cb) + k);
        }
        Ok(())
    }

    /// Allocates `n` contiguous clusters (holes first for single clusters; at the end of the
    /// image for runs) and sets their refcount to 1. Returns the first cluster index.
    pub fn alloc(&mut self, raw: &mut QcowRawFile, h: &mut QcowHeader, n: u64) -> Result<u64> {
        let c = if n == 1 {
            let mut c = self.free_hint;
            while c < self.end_cluster && self.get(raw, c)? != 0 {
                c += 1;
            }
            self.free_hint = c + 1;
            c
        } else {
            self.end_cluster
        };
        self.end_cluster = self.end_cluster.max(c + n);
        for k in c..c + n {
            self.set(raw, h, k, 1, c..c + n)?;
        }
        Ok(c)
    }

    /// Adds one reference to cluster `c` (a shared cluster gaining a user).
    pub fn increment(&mut self, raw: &mut QcowRawFile, h: &mut QcowHeader, c: u64) -> Result<()> {
        let r = self.get(raw, c)?;
        self.set(raw, h, c, r + 1, c..c)
    }

    /// Defers dropping one reference to cluster `c` until `apply_frees`.
    pub fn free_later(&mut self, c: u64) {
        self.pending_frees.push(c);
    }

    /// Whether frees are pending.
    pub fn has_pending_frees(&self) -> bool {
        !self.pending_frees.is_empty()
    }

    /// Drops the deferred references (call only once the references are gone from the disk).
    /// Returns the clusters whose refcount reached 0.
    pub fn apply_frees(&mut self, raw: &mut QcowRawFile, h: &mut QcowHeader) -> Result<Vec<u64>> {
        let mut freed = Vec::new();
        for c in std::mem::take(&mut self.pending_frees) {
            let r = self.get(raw, c)?;
            if r == 0 {
                continue;
            }
            self.set(raw, h, c, r - 1, c..c)?;
            if r == 1 {
                freed.push(c);
                self.free_hint = self.free_hint.min(c);
            }
        }
        Ok(freed)
    }

    /// Whether any refblock or reftable entry awaits writing.
    pub fn is_dirty(&self) -> bool {
        self.reftable_dirty || !self.blocks.dirty_keys().is_empty()
    }

    /// Writes dirty refblocks, then (after a sync, so they are durable first) the changed
    /// reftable. Does not sync at the end.
    pub fn write_dirty_blocks(&mut self, raw: &mut QcowRawFile) -> Result<()> {
        for ri in self.blocks.dirty_keys() {
            if let Some(b) = self.blocks.get(ri).cloned() {
                self.write_block(raw, ri, &b)?;
            }
            self.blocks.mark_clean(ri);
        }
        if self.reftable_dirty {
            raw.sync()?;
            raw.write_pointer_table(self.reftable_offset, &self.reftable, 0)?;
            self.reftable_dirty = false;
        }
        Ok(())
    }
}
