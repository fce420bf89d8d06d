//! Refcounts on disk: [`RefcountView`], the read-only view check uses (whole refblocks read
//! once each, kept in a bounded cache), and [`RefcountManager`], the allocator of a writable
//! image (lookups, cluster allocation holes first, deferred frees, new refblocks and reftable
//! growth).
//!
//! Refblocks are kept as their on-disk bytes at the image's width (never decoded into one u64
//! per cluster: a 2 MiB refblock of 1-bit refcounts holds 16 M entries).
//!
//! Ordering contract of the manager (kept by `QcowFile::flush`): refblocks reach the disk
//! before the reftable entries that point at them, and both before any L2/L1 entry that
//! references a newly allocated cluster; decrements (frees) are applied only after the
//! references are gone from the disk. A crash therefore leaves at worst leaked clusters.

use std::sync::Arc;

use crate::cache::TableCache;
use crate::error::{Error, Result};
use crate::format::{refcount_at, set_refcount_at, RefcountGeometry, REFT_OFFSET_MASK};
use crate::header::QcowHeader;
use crate::raw_file::QcowRawFile;

/// Memory spent on cached refblocks by a writer (at least 4 are kept whatever their size).
const REFBLOCK_CACHE_BYTES: u64 = 16 << 20;
/// Memory spent on cached refblocks by the read-only view (at most 64 refblocks: its lookups
/// are local, and a sequential scan gains nothing from a cache).
const VIEW_CACHE_BYTES: u64 = 4 << 20;

fn cache_capacity(cluster_size: u64) -> usize {
    usize::try_from((REFBLOCK_CACHE_BYTES / cluster_size).max(4)).unwrap_or(4)
}

/// The on-disk refcounts, read-only and lenient: a reftable or refblock that cannot be read
/// makes the refcounts it covers unreadable (an `Err` naming why), not the whole view.
pub struct RefcountView {
    geo: RefcountGeometry,
    reftable: Vec<u64>,
    /// The refblock used last (most lookups hit it: metadata and data are mostly near).
    last: Option<(u64, Option<Arc<Vec<u8>>>)>,
    blocks: TableCache<Arc<Vec<u8>>>,
}

impl RefcountView {
    /// Reads the reftable named by the header, as far as the file holds it.
    pub fn load(raw: &QcowRawFile, h: &QcowHeader) -> Self {
        let cs = h.cluster_size();
        let mut reftable = Vec::new();
        if h.refcount_table_offset != 0 && h.refcount_table_offset % cs == 0 {
            let entries = u64::from(h.refcount_table_clusters) * cs / 8;
            reftable = raw.read_u64s_available(h.refcount_table_offset, entries).unwrap_or_default();
        }
        let geo = raw.refcount_geometry();
        let capacity = usize::try_from((VIEW_CACHE_BYTES / raw.cluster_size()).clamp(4, 64)).unwrap_or(4);
        RefcountView { geo, reftable, last: None, blocks: TableCache::new(capacity) }
    }

    /// The refcount geometry.
    pub fn geometry(&self) -> RefcountGeometry {
        self.geo
    }

    /// The bytes of refblock `ri` (`None`: no refblock, every refcount it covers is 0). A
    /// refblock (partly) past the end of the file reads as zeros there, as in QEMU.
    pub fn refblock(&mut self, raw: &QcowRawFile, ri: u64) -> std::result::Result<Option<Arc<Vec<u8>>>, String> {
        if let Some((r, b)) = &self.last {
            if *r == ri {
                return Ok(b.clone());
            }
        }
        let b = self.read_refblock(raw, ri)?;
        self.last = Some((ri, b.clone()));
        Ok(b)
    }

    fn read_refblock(&mut self, raw: &QcowRawFile, ri: u64) -> std::result::Result<Option<Arc<Vec<u8>>>, String> {
        if let Some(b) = self.blocks.get(ri) {
            return Ok(Some(Arc::clone(b)));
        }
        let e = usize::try_from(ri).ok().and_then(|r| self.reftable.get(r)).copied().unwrap_or(0);
        let off = e & REFT_OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        if off % raw.cluster_size() != 0 {
            return Err(format!("refcount block {ri} at 0x{off:x} is not cluster aligned"));
        }
        let mut buf = vec![0u8; usize::try_from(raw.cluster_size()).unwrap_or(0)];
        let n = if off < raw.file_len() { raw.read_at(&mut buf, off).map_err(|e| e.to_string())? } else { 0 };
        buf[n..].fill(0);
        let b = Arc::new(buf);
        // Read-only: nothing dirty is ever handed back.
        let _ = self.blocks.insert(ri, Arc::clone(&b), false);
        Ok(Some(b))
    }

    /// Refcount of cluster `c`; `Err` names why it cannot be read.
    pub fn get(&mut self, raw: &QcowRawFile, c: u64) -> std::result::Result<u64, String> {
        let bits = self.geo.refblock_bits();
        let idx = usize::try_from(c & ((1 << bits) - 1)).unwrap_or(0);
        let ri = c >> bits;
        if let Some((r, b)) = &self.last {
            if *r == ri {
                return Ok(b.as_ref().map_or(0, |b| refcount_at(b, self.geo.refcount_order, idx)));
            }
        }
        Ok(match self.refblock(raw, ri)? {
            Some(b) => refcount_at(&b, self.geo.refcount_order, idx),
            None => 0,
        })
    }

    /// Host offset of refblock `ri` (0: none).
    pub fn refblock_offset(&self, ri: u64) -> u64 {
        usize::try_from(ri).ok().and_then(|r| self.reftable.get(r)).copied().unwrap_or(0) & REFT_OFFSET_MASK
    }

    /// Writes a changed refblock back (a repair) and updates the cache.
    pub fn write_refblock(&mut self, raw: &QcowRawFile, ri: u64, bytes: Vec<u8>, what: &str) -> Result<()> {
        let off = self.refblock_offset(ri);
        raw.write_at(&bytes, off, what)?;
        let b = Arc::new(bytes);
        self.last = Some((ri, Some(Arc::clone(&b))));
        let _ = self.blocks.insert(ri, b, false);
        Ok(())
    }
}

fn write_block_at(raw: &QcowRawFile, off: u64, ri: u64, block: &[u8]) -> Result<()> {
    if off == 0 {
        return Err(Error::InvalidClusterIndex(format!("refcount block {ri} has no cluster")));
    }
    raw.write_at(block, off, "refcount block")
}

/// The refcounts of a writable image.
pub struct RefcountManager {
    geo: RefcountGeometry,
    reftable: Vec<u64>,
    reftable_offset: u64,
    reftable_clusters: u32,
    /// Reftable entries changed in memory (new refblocks) and not yet written.
    reftable_dirty: bool,
    /// Refblocks (on-disk bytes) keyed by refblock index.
    blocks: TableCache<Vec<u8>>,
    /// Every cluster at or past this index has refcount 0.
    end_cluster: u64,
    /// No free cluster below this index.
    free_hint: u64,
    /// Clusters whose references are being removed; decremented by `apply_frees` once the
    /// removal is on disk.
    pending_frees: Vec<u64>,
    /// The next free byte of the cluster compressed data is being packed into (0: none).
    free_byte_offset: u64,
}

impl RefcountManager {
    /// Loads the reftable and finds the end of the used area.
    pub fn load(raw: &QcowRawFile, h: &QcowHeader) -> Result<Self> {
        let cs = h.cluster_size();
        let reftable = raw.read_u64_table(
            h.refcount_table_offset,
            u64::from(h.refcount_table_clusters) * cs / 8,
            "refcount_table_offset (refcount table)",
        )?;
        let mut m = RefcountManager {
            geo: raw.refcount_geometry(),
            reftable,
            reftable_offset: h.refcount_table_offset,
            reftable_clusters: h.refcount_table_clusters,
            reftable_dirty: false,
            blocks: TableCache::new(cache_capacity(cs)),
            end_cluster: raw.file_clusters(),
            free_hint: 0,
            pending_frees: Vec::new(),
            free_byte_offset: 0,
        };
        // Refcounts may extend past the end of the file: find the last non-zero one.
        if let Some(ri) = m.reftable.iter().rposition(|&e| e & REFT_OFFSET_MASK != 0) {
            let ri = ri as u64;
            m.load_block(raw, ri)?;
            let order = m.geo.refcount_order;
            let n = usize::try_from(m.geo.refblock_entries()).unwrap_or(0);
            if let Some(last) = m.blocks.get(ri).and_then(|b| (0..n).rev().find(|&i| refcount_at(b, order, i) != 0)) {
                m.end_cluster = m.end_cluster.max(ri * m.geo.refblock_entries() + last as u64 + 1);
            }
        }
        Ok(m)
    }

    fn entries_per_block(&self) -> u64 {
        self.geo.refblock_entries()
    }

    /// Loads refblock `ri` into the cache (a missing refblock reads as all-zero).
    fn load_block(&mut self, raw: &QcowRawFile, ri: u64) -> Result<()> {
        if self.blocks.get(ri).is_some() {
            return Ok(());
        }
        let off = self.refblock_offset(ri);
        let mut buf = vec![0u8; usize::try_from(raw.cluster_size()).unwrap_or(0)];
        if off != 0 {
            raw.read_table_bytes(off, &mut buf, &format!("refcount block {ri}"))?;
        }
        self.insert_block(raw, ri, buf, false)
    }

    fn insert_block(&mut self, raw: &QcowRawFile, ri: u64, block: Vec<u8>, dirty: bool) -> Result<()> {
        if let Some((k, evicted)) = self.blocks.insert(ri, block, dirty) {
            // A dirty refblock only holds increments (frees are deferred): it may be written
            // at any time, as long as its reftable entry follows it.
            self.write_block(raw, k, &evicted)?;
            if self.reftable_dirty {
                raw.sync()?;
                raw.write_u64_table(self.reftable_offset, &self.reftable, "refcount table")?;
                self.reftable_dirty = false;
            }
        }
        Ok(())
    }

    fn refblock_offset(&self, ri: u64) -> u64 {
        usize::try_from(ri).ok().and_then(|r| self.reftable.get(r)).copied().unwrap_or(0) & REFT_OFFSET_MASK
    }

    fn write_block(&self, raw: &QcowRawFile, ri: u64, block: &[u8]) -> Result<()> {
        write_block_at(raw, self.refblock_offset(ri), ri, block)
    }

    fn index(&self, c: u64) -> (u64, usize) {
        let e = self.entries_per_block();
        (c / e, usize::try_from(c % e).unwrap_or(0))
    }

    /// Refcount of cluster `c`.
    pub fn get(&mut self, raw: &QcowRawFile, c: u64) -> Result<u64> {
        let (ri, idx) = self.index(c);
        self.load_block(raw, ri)?;
        let order = self.geo.refcount_order;
        Ok(self.blocks.get(ri).map_or(0, |b| refcount_at(b, order, idx)))
    }

    /// Sets the refcount of cluster `c`; clusters in `reserved` are being allocated together
    /// with it and must not host a new refblock.
    fn set(
        &mut self,
        raw: &QcowRawFile,
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
        let (ri, idx) = self.index(c);
        self.load_block(raw, ri)?;
        let order = self.geo.refcount_order;
        if let Some(b) = self.blocks.get_mut(ri) {
            set_refcount_at(b, order, idx, v);
        }
        Ok(())
    }

    /// Makes sure cluster `c`'s refblock exists, creating it inside its own range if needed
    /// (a self-describing refblock), growing the reftable first if it is too small.
    fn ensure_refblock(
        &mut self,
        raw: &QcowRawFile,
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
            // Everything the refblock would describe is being allocated (a large allocation
            // with small clusters): it goes right after the allocation instead, its own
            // refcount kept by the refblock of that range.
            return self.place_refblock_after(raw, h, ri, reserved);
        }
        let idx = usize::try_from(ri).unwrap_or(0);
        self.reftable[idx] = b << self.geo.cluster_bits;
        self.reftable_dirty = true;
        let mut block = vec![0u8; usize::try_from(raw.cluster_size()).unwrap_or(0)];
        set_refcount_at(&mut block, self.geo.refcount_order, usize::try_from(b - first).unwrap_or(0), 1);
        self.insert_block(raw, ri, block, true)?;
        self.end_cluster = self.end_cluster.max(b + 1);
        Ok(())
    }

    /// The refblock of range `ri` at the first cluster past `reserved` (and past the end of the
    /// image): an empty block, referenced from the reftable, whose own cluster gets refcount 1.
    fn place_refblock_after(
        &mut self,
        raw: &QcowRawFile,
        h: &mut QcowHeader,
        ri: u64,
        reserved: std::ops::Range<u64>,
    ) -> Result<()> {
        let b = reserved.end.max(self.end_cluster);
        self.end_cluster = b + 1;
        let idx = usize::try_from(ri).unwrap_or(0);
        self.reftable[idx] = b << self.geo.cluster_bits;
        self.reftable_dirty = true;
        let block = vec![0u8; usize::try_from(raw.cluster_size()).unwrap_or(0)];
        self.insert_block(raw, ri, block, true)?;
        self.set(raw, h, b, 1, reserved)
    }

    /// Moves the reftable to a larger place at the end of the image and commits it with one
    /// header write; everything it needs is written and synced before the header switches.
    fn grow_reftable(&mut self, raw: &QcowRawFile, h: &mut QcowHeader, min_entries: u64) -> Result<()> {
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
        if n * cs > crate::format::MAX_REFTABLE_BYTES {
            return Err(Error::InvalidRefcountTableSize(format!(
                "the refcount table would need {n} clusters, above QEMU's limit of 8 MiB"
            )));
        }
        let entries = n * per_cluster;
        let old = (self.reftable_offset, self.reftable_clusters);
        self.reftable.resize(usize::try_from(entries).unwrap_or(0), 0);
        let mut end = start + n;
        let mut need: Vec<u64> = (start..start + n).collect();
        let zero_block = vec![0u8; usize::try_from(cs).unwrap_or(0)];
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
                self.insert_block(raw, ri, zero_block.clone(), true)?;
                need.push(b);
            }
            self.load_block(raw, ri)?;
            let order = self.geo.refcount_order;
            if let Some(bl) = self.blocks.get_mut(ri) {
                set_refcount_at(bl, order, usize::try_from(c % e).unwrap_or(0), 1);
            }
        }
        self.end_cluster = end;
        // Every refblock first, then the new table, durable; then one header write.
        self.reftable_dirty = false;
        for ri in self.blocks.dirty_keys() {
            let off = self.refblock_offset(ri);
            if let Some(b) = self.blocks.get(ri) {
                write_block_at(raw, off, ri, b)?;
            }
            self.blocks.mark_clean(ri);
        }
        raw.write_u64_table(start << cb, &self.reftable, "new refcount table")?;
        raw.sync()?;
        let clusters =
            u32::try_from(n).map_err(|_| Error::InvalidRefcountTableSize(format!("a reftable of {n} clusters")))?;
        h.commit_refcount_table(raw, start << cb, clusters)?;
        self.reftable_offset = start << cb;
        self.reftable_clusters = clusters;
        // The old reftable is no longer referenced by anything on disk.
        for k in 0..u64::from(old.1) {
            self.pending_frees.push((old.0 >> cb) + k);
        }
        Ok(())
    }

    /// Allocates `n` contiguous clusters (holes first for single clusters; at the end of the
    /// image for runs) and sets their refcount to 1. Returns the first cluster index.
    pub fn alloc(&mut self, raw: &QcowRawFile, h: &mut QcowHeader, n: u64) -> Result<u64> {
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
        let end = c.checked_add(n).filter(|&e| e <= (1u64 << (56 - self.geo.cluster_bits))).ok_or_else(|| {
            Error::InvalidClusterIndex(format!(
                "allocating {n} clusters at cluster {c} would pass the 2^56-byte limit of host offsets"
            ))
        })?;
        self.end_cluster = self.end_cluster.max(end);
        for k in c..end {
            self.set(raw, h, k, 1, c..end)?;
        }
        Ok(c)
    }

    /// Allocates `size` bytes (at most a cluster) for compressed data, packed after the
    /// previous allocation as QEMU's `qcow2_alloc_bytes` does: in the same host cluster while
    /// it has room, running into the next cluster when that one is free and adjacent, else in
    /// a new cluster. Every host cluster the bytes touch gains one reference. Returns the byte
    /// offset.
    pub fn alloc_bytes(&mut self, raw: &QcowRawFile, h: &mut QcowHeader, size: u64) -> Result<u64> {
        let cb = self.geo.cluster_bits;
        let cs = 1u64 << cb;
        if size == 0 || size > cs {
            return Err(Error::InvalidClusterIndex(format!("cannot allocate {size} bytes of compressed data")));
        }
        let mut offset = self.free_byte_offset;
        if offset != 0 {
            // A cluster freed meanwhile (refcount 0) may be reused for anything: start afresh.
            let r = self.get(raw, offset >> cb)?;
            if r == 0 || r >= self.geo.refcount_max() {
                offset = 0;
            }
        }
        let free_in_cluster = if offset == 0 { 0 } else { cs - (offset & (cs - 1)) };
        if offset == 0 || free_in_cluster < size {
            let next = self.alloc(raw, h, 1)? << cb;
            if offset != 0 && next == (offset | (cs - 1)) + 1 {
                // The data runs on into the adjacent new cluster: it holds one reference now.
                self.increment(raw, h, offset >> cb)?;
            } else {
                // (The tail of the old cluster, if any, stays unused.)
                offset = next;
                let end = offset + size;
                self.free_byte_offset = if end & (cs - 1) == 0 { 0 } else { end };
                return Ok(offset);
            }
        } else {
            self.increment(raw, h, offset >> cb)?;
        }
        let end = offset + size;
        self.free_byte_offset = if end & (cs - 1) == 0 { 0 } else { end };
        Ok(offset)
    }

    /// Adds one reference to cluster `c`.
    fn increment(&mut self, raw: &QcowRawFile, h: &mut QcowHeader, c: u64) -> Result<()> {
        let r = self.get(raw, c)?;
        self.set(raw, h, c, r + 1, c..c)
    }

    /// Adds `n` references to cluster `c` (an allocation shared by `n + 1` tables).
    pub fn add_references(&mut self, raw: &QcowRawFile, h: &mut QcowHeader, c: u64, n: u64) -> Result<()> {
        let r = self.get(raw, c)?;
        self.set(raw, h, c, r.saturating_add(n), c..c)
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
    pub fn apply_frees(&mut self, raw: &QcowRawFile, h: &mut QcowHeader) -> Result<Vec<u64>> {
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
        self.reftable_dirty || self.blocks.has_dirty()
    }

    /// Writes dirty refblocks, then (after a sync, so they are durable first) the changed
    /// reftable. Does not sync at the end.
    pub fn write_dirty_blocks(&mut self, raw: &QcowRawFile) -> Result<()> {
        for ri in self.blocks.dirty_keys() {
            let off = self.refblock_offset(ri);
            if let Some(b) = self.blocks.get(ri) {
                write_block_at(raw, off, ri, b)?;
            }
            self.blocks.mark_clean(ri);
        }
        if self.reftable_dirty {
            raw.sync()?;
            raw.write_u64_table(self.reftable_offset, &self.reftable, "refcount table")?;
            self.reftable_dirty = false;
        }
        Ok(())
    }
}
