//! A fresh refcount structure, after the seed (crosvm `rebuild_refcounts`) with its defects
//! fixed.
//!
//! 1. [`Imrt`] is the in-memory refcount table: every refblock the image needs, concatenated,
//!    at the image's own refcount width (so it is exactly what gets written), kept compact (2
//!    bits per cluster) until a refcount above 2 appears. It is sized from the host file, never
//!    from the virtual size. `count.rs` fills it by walking the image.
//! 2. [`write_refcount_structure`] allocates new refblocks and a new reftable in clusters that
//!    are free in the `Imrt` (which counts the old, still-live structure too), holes first,
//!    repeating until the reftable describes itself; writes them; syncs; then switches the
//!    header's `refcount_table_offset` and `refcount_table_clusters` in one write and syncs
//!    again. A crash at any point leaves either the old structure or the new one, never a mix.

use std::collections::BTreeSet;

use crate::error::{Error, Result};
use crate::format::RefcountGeometry;
use crate::header::QcowHeader;
use crate::raw_file::QcowRawFile;

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
    /// For compact chunks: the on-disk bytes of the 4 refcounts one compact byte holds, for
    /// each of the 256 byte values (`256 * (bits / 2)` bytes; empty below 4-bit refcounts).
    expand: Vec<u8>,
}

/// Bit j (j < 4): refcount j of a compact byte is exactly 1.
fn ones_of_compact(b: u8) -> u64 {
    (0..4).filter(|k| (b >> (2 * k)) & 3 == 1).fold(0, |m, k| m | 1 << k)
}

impl Imrt {
    /// An all-zero table for `entries` clusters.
    pub fn new(geo: RefcountGeometry, entries: u64) -> Result<Self> {
        let mut expand = Vec::new();
        if geo.refcount_order >= 2 {
            let w = (4usize << geo.refcount_order) / 8;
            expand = vec![0u8; 256 * w];
            for b in 0..256usize {
                for k in 0..4 {
                    crate::format::set_refcount_at(
                        &mut expand[b * w..(b + 1) * w],
                        geo.refcount_order,
                        k,
                        ((b >> (2 * k)) & 3) as u64,
                    );
                }
            }
        }
        let mut t = Imrt { chunks: Vec::new(), len: 0, geo, expand };
        t.ensure(entries)?;
        Ok(t)
    }

    /// The refcount geometry (width, refblock size).
    pub fn geometry(&self) -> RefcountGeometry {
        self.geo
    }

    /// Number of clusters described.
    pub fn len(&self) -> u64 {
        self.len
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

    /// Adds one to the refcount of cluster `i` (growing the table). Returns `false`, changing
    /// nothing, if the refcount is already at the width's maximum.
    #[inline]
    pub fn increment(&mut self, i: u64) -> Result<bool> {
        if i < self.len {
            let (ri, idx) = self.split(i);
            if let Some(Chunk::Small(v)) = self.chunks.get_mut(ri) {
                let shift = (idx % 4) * 2;
                let cur = (v[idx / 4] >> shift) & 3;
                if cur < 2 {
                    v[idx / 4] += 1 << shift;
                    return Ok(true);
                }
            }
        }
        let r = self.get(i);
        if r >= self.geo.refcount_max() {
            return Ok(false);
        }
        self.set(i, r + 1)?;
        Ok(true)
    }

    /// Whether refblock `ri`'s refcounts equal the on-disk refblock `disk` (`None`: there is
    /// none, every refcount is 0). Compares whole byte runs, not refcount by refcount.
    pub fn refblock_equals(&self, ri: u64, disk: Option<&[u8]>) -> bool {
        let chunk = usize::try_from(ri).ok().and_then(|r| self.chunks.get(r));
        match (chunk, disk) {
            (None | Some(Chunk::Zero), None) => true,
            (None | Some(Chunk::Zero), Some(d)) => d.iter().all(|&b| b == 0),
            (Some(Chunk::Small(v) | Chunk::Wide(v)), None) => v.iter().all(|&b| b == 0),
            (Some(Chunk::Wide(v)), Some(d)) => v.as_slice() == d,
            (Some(Chunk::Small(v)), Some(d)) => {
                let w = self.expand.len() / 256;
                w > 0
                    && d.len() == v.len() * w
                    && v.iter().zip(d.chunks_exact(w)).all(|(&b, dc)| &self.expand[usize::from(b) * w..][..w] == dc)
            }
        }
    }

    /// Bit j set iff cluster `first + j` has refcount exactly 1 (`first` a multiple of 64).
    pub fn ones_mask(&self, first: u64) -> u64 {
        let (ri, idx) = self.split(first);
        match self.chunks.get(ri) {
            Some(Chunk::Small(v)) if idx % 4 == 0 => {
                let bytes = v.get(idx / 4..(idx / 4 + 16).min(v.len())).unwrap_or(&[]);
                bytes.iter().enumerate().fold(0, |m, (j, &b)| m | ones_of_compact(b) << (4 * j))
            }
            _ => (0..64).filter(|&j| self.get(first + j) == 1).fold(0, |m, j| m | 1 << j),
        }
    }

    /// The last cluster of refblock `ri`'s range with a non-zero refcount.
    pub fn last_used_in(&self, ri: u64) -> Option<u64> {
        let first = ri << self.geo.refblock_bits();
        let (v, small) = match usize::try_from(ri).ok().and_then(|r| self.chunks.get(r)) {
            Some(Chunk::Small(v)) => (v, true),
            Some(Chunk::Wide(v)) => (v, false),
            _ => return None,
        };
        let byte = v.iter().rposition(|&b| b != 0)? as u64;
        let order = self.geo.refcount_order;
        // One past the last refcount that the last non-zero byte holds a part of.
        let end = if small {
            (byte + 1) * 4
        } else if order >= 3 {
            byte / (1 << (order - 3)) + 1
        } else {
            (byte + 1) * (8 >> order)
        };
        (0..end).rev().map(|i| first + i).find(|&c| self.get(c) != 0)
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

    /// Adds the refcounts of `other` (counted over the same image) to these. A sum above the
    /// width's maximum stays at the maximum; the clusters where that happened are returned, once
    /// for every reference that did not fit.
    pub fn absorb(&mut self, other: Imrt) -> Result<Vec<u64>> {
        self.ensure(other.len)?;
        let mut overflowed = Vec::new();
        let per = self.geo.refblock_entries();
        let max = self.geo.refcount_max();
        for (ri, theirs) in other.chunks.into_iter().enumerate() {
            if matches!(theirs, Chunk::Zero) {
                continue;
            }
            if matches!(self.chunks[ri], Chunk::Zero) {
                self.chunks[ri] = theirs;
                continue;
            }
            let first = ri as u64 * per;
            let part = Imrt { chunks: vec![theirs], len: per, geo: self.geo, expand: Vec::new() };
            for i in 0..per.min(self.len - first) {
                let add = part.get(i);
                if add == 0 {
                    continue;
                }
                let mine = self.get(first + i);
                let sum = mine.saturating_add(add);
                for _ in 0..sum.saturating_sub(max) {
                    overflowed.push(first + i);
                }
                self.set(first + i, sum.min(max))?;
            }
        }
        Ok(overflowed)
    }

    /// Number of refblocks the table spans.
    pub fn refblocks(&self) -> u64 {
        self.len.div_ceil(self.geo.refblock_entries())
    }
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

/// A new refcount structure placed in `imrt` (its clusters marked used) but not yet written.
#[derive(Clone, Debug)]
pub struct Placed {
    /// The new reftable's entries (refblock offsets), one cluster's worth per table cluster.
    reftable: Vec<u64>,
    /// First cluster of the new reftable.
    first: u64,
    /// Its length in clusters.
    clusters: u32,
}

/// Allocates, writes and commits a new refcount structure describing `imrt` (which must count
/// every live cluster, the old structure included). `append_only` places it past the end of the
/// file (used when the walk was incomplete, so that no uncounted cluster is overwritten).
pub fn write_refcount_structure(
    raw: &QcowRawFile,
    h: &mut QcowHeader,
    imrt: &mut Imrt,
    append_only: bool,
    avoid: &BTreeSet<u64>,
) -> Result<NewStructure> {
    let placed = place_refcount_structure(raw, imrt, append_only, avoid)?;
    let new = write_placed(raw, imrt, &placed)?;
    // The commit point. One write switches offset and size together.
    h.commit_refcount_table(raw, new.reftable_offset, new.reftable_clusters)?;
    Ok(new)
}

/// Phase 1: allocates refblocks and a reftable for `imrt` in clusters it marks free (and that
/// are not in `avoid`), until stable. Nothing is written, so an allocation can be undone.
pub fn place_refcount_structure(
    raw: &QcowRawFile,
    imrt: &mut Imrt,
    append_only: bool,
    avoid: &BTreeSet<u64>,
) -> Result<Placed> {
    let cb = imrt.geometry().cluster_bits;
    let ptrs_per_cluster = (1u64 << cb) / 8;
    let start = if append_only { raw.file_clusters().max(imrt.len()) } else { 0 };
    let mut hint = start;
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
    let (first, rt_clusters) =
        reftable_at.ok_or_else(|| Error::InvalidRefcountTableSize("no reftable allocated".into()))?;
    let clusters = u32::try_from(rt_clusters)
        .map_err(|_| Error::InvalidRefcountTableSize(format!("a reftable of {rt_clusters} clusters is too large")))?;
    reftable.resize(usize::try_from(rt_clusters * ptrs_per_cluster).unwrap_or(0), 0);
    Ok(Placed { reftable, first, clusters })
}

/// Phase 2: writes the placed refblocks (encoded from `imrt`) and reftable into their free
/// clusters and makes them durable. The header still names the old structure.
pub fn write_placed(raw: &QcowRawFile, imrt: &Imrt, placed: &Placed) -> Result<NewStructure> {
    let mut refblocks = 0;
    for (ri, &off) in placed.reftable.iter().enumerate() {
        if off != 0 {
            raw.write_at(&imrt.refblock_bytes(ri as u64), off, "new refcount block")?;
            refblocks += 1;
        }
    }
    let rt_offset = placed.first << imrt.geometry().cluster_bits;
    raw.write_u64_table(rt_offset, &placed.reftable, "new refcount table")?;
    raw.sync()?;
    Ok(NewStructure { reftable_offset: rt_offset, reftable_clusters: placed.clusters, refblocks })
}

/// The seed's entry point: recounts every reference of the image and writes a fresh refcount
/// structure (no other repair). Prefer `check::check_image` with `Repair::All`, which also fixes
/// leaks of the old structure and OFLAG_COPIED.
pub fn rebuild_refcounts(raw: &QcowRawFile, h: &mut QcowHeader) -> Result<NewStructure> {
    let mut c = crate::count::count_references(raw, h, false)?;
    write_refcount_structure(raw, h, &mut c.imrt, c.incomplete, &c.beyond_eof)
}

/// Rewrites the refcount structure with `2^order`-bit refcounts (`qemu-img amend -o
/// refcount_bits=N`), by the rebuild's machinery: every reference is counted, the counts are
/// re-encoded into a new structure placed in free clusters and made durable, and one write of
/// the header's first sector switches table, size and width together. Until that write the old
/// structure is intact; after it the old one's clusters are free in the new counts (they are
/// released before the new refblocks are encoded), so a crash at any point leaves a valid
/// image without even a leak. A count that does not fit the new width is refused as QEMU
/// refuses it. `raw` is the image opened with the old width.
pub fn change_refcount_order(raw: &QcowRawFile, h: &mut QcowHeader, order: u32) -> Result<NewStructure> {
    let mut c = crate::count::count_references(raw, h, false)?;
    if c.incomplete || !c.beyond_eof.is_empty() {
        return Err(Error::corrupt(
            "the image's metadata cannot all be walked; repair it (check -r all) before changing refcount_bits",
            h.l1_table_offset,
        ));
    }
    let cb = raw.cluster_bits();
    let geo = RefcountGeometry { cluster_bits: cb, refcount_order: order };
    let mut imrt = Imrt::new(geo, c.imrt.len())?;
    for i in 0..c.imrt.len() {
        let v = c.imrt.get(i);
        if v > geo.refcount_max() {
            return Err(Error::InvalidArgument(format!(
                "Cannot decrease refcount entry width to {} bits: Cluster at offset {:#x} has a refcount of {v}",
                geo.refcount_bits(),
                i << cb
            )));
        }
        if v != 0 {
            imrt.set(i, v)?;
        }
    }
    let old = old_structure(raw, h)?;
    let placed = place_refcount_structure(raw, &mut imrt, false, &BTreeSet::new())?;
    for k in old {
        let v = imrt.get(k);
        if v > 0 {
            imrt.set(k, v - 1)?;
        }
    }
    c.imrt = imrt;
    let new = write_placed(raw, &c.imrt, &placed)?;
    h.commit_refcount_structure(raw, new.reftable_offset, new.reftable_clusters, order)?;
    Ok(new)
}

/// The clusters of the current refcount structure: its reftable and every refblock it names.
fn old_structure(raw: &QcowRawFile, h: &QcowHeader) -> Result<Vec<u64>> {
    let cb = raw.cluster_bits();
    let first = h.refcount_table_offset >> cb;
    let clusters = u64::from(h.refcount_table_clusters);
    let table = raw.read_u64_table(h.refcount_table_offset, (clusters << cb) / 8, "refcount_table_offset")?;
    let mut out: Vec<u64> = (first..first + clusters).collect();
    out.extend(table.iter().map(|e| e & crate::format::REFT_OFFSET_MASK).filter(|&o| o != 0).map(|o| o >> cb));
    Ok(out)
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
