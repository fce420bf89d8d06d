//! L1/L2 translation: the L2-table state of an open image (the active L1 table, a cache of L2
//! tables, the geometry) and what a guest offset maps to. It answers with plans, [`ReadPlan`]
//! and [`WritePlan`]; `QcowFile` performs the data I/O. The L2 entry bits themselves are read
//! only through `format::L2Geometry`.
//!
//! Lookups take `&self` (the cache sits behind a mutex held only for the lookup), so several
//! threads translate and read at once; changes take `&mut self`.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};

use crate::cache::TableCache;
use crate::error::{Error, Result};
use crate::format::{
    l1_entry_is_copied, l1_entry_l2_offset, l1_entry_make, ClusterType, L2Entry, L2Geometry, SubclusterState,
};
use crate::header::QcowHeader;
use crate::raw_file::QcowRawFile;
use crate::walk::TableSource;

/// Memory spent on cached L2 tables per open image.
const L2_CACHE_BYTES: u64 = 16 << 20;

/// A decoded L2 table: its u64 words (two per entry with extended L2).
pub(crate) type L2Table = Arc<Vec<u64>>;

/// What a guest range reads as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadPlan {
    /// Not allocated here: read the backing file, or zeros.
    Backing,
    /// Reads as zeros.
    Zero,
    /// Stored uncompressed at this host offset (of the data file, if the image has one); the
    /// offset is that of the guest offset asked for, not of the cluster start.
    Data {
        /// Host offset of the first byte.
        host: u64,
    },
    /// The whole cluster is compressed at `[host, host+len)` of the image file.
    Compressed {
        /// Host byte offset of the compressed stream.
        host: u64,
        /// Bytes the stream may occupy (whole sectors).
        len: u64,
    },
}

impl ReadPlan {
    /// The `allocated_ranges` kind of this plan, or `None` when not present in this image.
    pub fn kind(&self) -> Option<&'static str> {
        match self {
            ReadPlan::Backing => None,
            ReadPlan::Zero => Some("zero"),
            ReadPlan::Data { .. } => Some("data"),
            ReadPlan::Compressed { .. } => Some("compressed"),
        }
    }
}

/// Where a write puts a cluster's data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Target {
    /// The cluster the entry already owns (refcount 1).
    Reuse(u64),
    /// The external data file, at this offset (no refcount).
    DataFile(u64),
    /// A newly allocated cluster.
    Allocate,
}

/// How to write data inside one cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WritePlan {
    /// The cluster is private and wholly allocated: write the data at `host`.
    InPlace {
        /// Host offset of the first byte.
        host: u64,
    },
    /// Extended L2: write subclusters `first..=last` (the data, and the rest of the edge
    /// subclusters as the guest sees them now) into the cluster at `target`, then mark them
    /// allocated; the other subclusters keep their state.
    Subclusters {
        /// Where the cluster is.
        target: Target,
        /// First subcluster touched.
        first: u32,
        /// Last subcluster touched.
        last: u32,
        /// The entry now.
        old: L2Entry,
    },
    /// The whole cluster is rebuilt (what the guest sees there now, with the data over it) at
    /// `target`, and the entry points there; `old`'s references are dropped unless reused.
    Rewrite {
        /// Where the cluster goes.
        target: Target,
        /// The entry now.
        old: L2Entry,
    },
}

/// What a write to an L2 table needs first.
pub(crate) enum L2ForWrite {
    /// The table is private to the active image, at this offset (and cached).
    Ready(u64),
    /// A new table must be allocated holding `table` (zeros, or a copy of the shared table at
    /// `shared`, whose reference is then dropped).
    New {
        /// The words of the new table.
        table: Vec<u64>,
        /// The shared table it copies.
        shared: Option<u64>,
    },
}

/// The active L1 table and a cache of L2 tables.
pub(crate) struct L2Tables {
    geo: L2Geometry,
    l1_offset: u64,
    l1: Vec<u64>,
    l1_dirty: BTreeSet<usize>,
    cache: Mutex<TableCache<L2Table>>,
}

impl L2Tables {
    /// Reads the active L1 table named by the header.
    pub(crate) fn load(raw: &QcowRawFile, h: &QcowHeader) -> Result<Self> {
        let geo = L2Geometry::new(h.cluster_bits, h.extended_l2(), h.has_data_file());
        Self::with_l1(raw, geo, h.l1_table_offset, h.l1_size, "l1_table_offset (L1 table)")
    }

    /// Reads the L1 table at `l1_offset` (a snapshot's, for a read-only view).
    pub(crate) fn with_l1(
        raw: &QcowRawFile,
        geo: L2Geometry,
        l1_offset: u64,
        l1_size: u32,
        what: &str,
    ) -> Result<Self> {
        let l1 = raw.read_u64_table(l1_offset, u64::from(l1_size), what)?;
        let capacity = usize::try_from((L2_CACHE_BYTES / geo.cluster_size()).max(16)).unwrap_or(16);
        Ok(L2Tables { geo, l1_offset, l1, l1_dirty: BTreeSet::new(), cache: Mutex::new(TableCache::new(capacity)) })
    }

    pub(crate) fn geometry(&self) -> L2Geometry {
        self.geo
    }
    pub(crate) fn l1(&self) -> &[u64] {
        &self.l1
    }
    pub(crate) fn l1_offset(&self) -> u64 {
        self.l1_offset
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, TableCache<L2Table>> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The L2 table for L1 index `l1_index` and its offset, or `None` when the L1 entry is
    /// empty.
    pub(crate) fn l2_table(&self, raw: &QcowRawFile, l1_index: u64) -> Result<Option<(u64, L2Table)>> {
        let Some(&l1e) = usize::try_from(l1_index).ok().and_then(|i| self.l1.get(i)) else { return Ok(None) };
        let l2_offset = l1_entry_l2_offset(l1e);
        if l2_offset == 0 {
            return Ok(None);
        }
        let cs = self.geo.cluster_size();
        let l1e_pos = self.l1_offset + l1_index * 8;
        if l2_offset & (cs - 1) != 0 {
            return Err(Error::corrupt(
                format!("L1[{l1_index}] = 0x{l1e:x}: L2 table offset 0x{l2_offset:x} is not cluster aligned"),
                l1e_pos,
            ));
        }
        if let Some(t) = self.cache().get(l2_offset) {
            return Ok(Some((l2_offset, Arc::clone(t))));
        }
        let what = format!("L2 table (L1[{l1_index}] at 0x{l1e_pos:x})");
        // L2 tables are always written whole: one that does not fit in the file is truncated.
        if l2_offset.checked_add(cs).is_none_or(|end| end > raw.file_len()) {
            return Err(Error::offset(
                what,
                l2_offset,
                format!("lies (partly) past the end of the file (0x{:x}); the image is truncated", raw.file_len()),
            ));
        }
        let table: L2Table = Arc::new(raw.read_u64_table(l2_offset, cs / 8, &what)?);
        // Only writers (`&mut self`) make tables dirty, and they keep every table they dirty
        // cached until flushed (see `install_l2`); a reader's insert evicts clean tables only.
        self.cache().insert_clean(l2_offset, Arc::clone(&table));
        Ok(Some((l2_offset, table)))
    }

    /// The entry of guest cluster `cluster_index` and its L1 entry (empty when unmapped).
    pub(crate) fn entry(&self, raw: &QcowRawFile, cluster_index: u64) -> Result<(L2Entry, u64)> {
        let per = self.geo.entries_per_table();
        let l1_index = cluster_index / per;
        let l1e = usize::try_from(l1_index).ok().and_then(|i| self.l1.get(i)).copied().unwrap_or(0);
        let Some((_, t)) = self.l2_table(raw, l1_index)? else { return Ok((L2Entry::default(), l1e)) };
        Ok((self.geo.entry_at(&t, usize::try_from(cluster_index % per).unwrap_or(0)), l1e))
    }

    /// Maps `guest` and returns the plan and the length (<= `max_len`) over which it holds:
    /// contiguous data runs and same-kind runs are merged within one L2 table; compressed
    /// clusters are returned one at a time.
    pub(crate) fn read_plan(&self, raw: &QcowRawFile, guest: u64, max_len: u64) -> Result<(ReadPlan, u64)> {
        let cb = self.geo.cluster_bits;
        let cs = self.geo.cluster_size();
        let per = self.geo.entries_per_table();
        let l1_index = (guest >> cb) / per;
        let span_end = (l1_index + 1).saturating_mul(self.geo.bytes_per_table());
        let limit = max_len.min(span_end - guest);
        let Some((l2_offset, table)) = self.l2_table(raw, l1_index)? else { return Ok((ReadPlan::Backing, limit)) };
        let entry_bytes = 8 * self.geo.words_per_entry() as u64;
        let mut off = guest;
        let mut first: Option<ReadPlan> = None;
        let mut len = 0u64;
        while len < limit {
            let l2_index = (off >> cb) % per;
            let e = self.geo.entry_at(&table, usize::try_from(l2_index).unwrap_or(0));
            let in_cluster = off & (cs - 1);
            let (state, end) = self.geo.read_state(e, in_cluster).map_err(|d| {
                Error::corrupt(
                    format!("L2 entry {l2_index} (L2 table at 0x{l2_offset:x}) = 0x{:x}: {d}", e.entry),
                    l2_offset + l2_index * entry_bytes,
                )
            })?;
            let run = end - in_cluster;
            let plan = if self.geo.cluster_type(e) == ClusterType::Compressed {
                let (host, len) = self.geo.compressed_range(e);
                ReadPlan::Compressed { host, len }
            } else {
                match state {
                    SubclusterState::Unallocated => ReadPlan::Backing,
                    SubclusterState::Zero => ReadPlan::Zero,
                    SubclusterState::Data => ReadPlan::Data { host: e.host_offset() + in_cluster },
                }
            };
            let continues = match (first, plan) {
                (None, _) => true,
                (Some(ReadPlan::Data { host: h0 }), ReadPlan::Data { host }) => host == h0 + len,
                (Some(ReadPlan::Zero), ReadPlan::Zero) | (Some(ReadPlan::Backing), ReadPlan::Backing) => true,
                _ => false,
            };
            if !continues {
                break;
            }
            first.get_or_insert(plan);
            len += run;
            off += run;
            if matches!(plan, ReadPlan::Compressed { .. }) {
                break;
            }
        }
        Ok((first.unwrap_or(ReadPlan::Backing), len.min(limit)))
    }

    /// How to write `len` bytes at `in_cluster` of guest cluster `cluster_index`.
    pub(crate) fn write_plan(
        &self,
        raw: &QcowRawFile,
        cluster_index: u64,
        in_cluster: u64,
        len: u64,
    ) -> Result<WritePlan> {
        let geo = self.geo;
        let (e, l1e) = self.entry(raw, cluster_index)?;
        let ty = geo.cluster_type(e);
        let private = e.is_copied() && l1_entry_is_copied(l1e);
        let cluster_start = cluster_index << geo.cluster_bits;
        if geo.extended && matches!(ty, ClusterType::Normal | ClusterType::Unallocated) {
            if ty == ClusterType::Normal && private && e.alloc_bits() == u32::MAX {
                return Ok(WritePlan::InPlace { host: e.host_offset() + in_cluster });
            }
            // Only the subclusters the write touches are allocated (as QEMU does); the others
            // keep their state (backing file, zero).
            if ty == ClusterType::Unallocated || private {
                let sc = geo.subcluster_bits();
                let target = if ty == ClusterType::Normal {
                    Target::Reuse(e.host_offset())
                } else if geo.data_file {
                    Target::DataFile(cluster_start)
                } else {
                    Target::Allocate
                };
                // Both fit in 5 bits: in_cluster < cluster size.
                #[allow(clippy::cast_possible_truncation)]
                let (first, last) = ((in_cluster >> sc) as u32, ((in_cluster + len - 1) >> sc) as u32);
                return Ok(WritePlan::Subclusters { target, first, last, old: e });
            }
        } else if ty == ClusterType::Normal && private {
            return Ok(WritePlan::InPlace { host: e.host_offset() + in_cluster });
        }
        let target = if geo.data_file {
            Target::DataFile(cluster_start)
        } else if matches!(ty, ClusterType::Normal | ClusterType::ZeroAlloc) && private {
            Target::Reuse(e.host_offset())
        } else {
            Target::Allocate
        };
        Ok(WritePlan::Rewrite { target, old: e })
    }

    /// The entry that makes guest cluster `cluster_index` read as zeros (whole cluster), or
    /// `None` when it already does. `has_backing`: unallocated clusters show a backing file.
    pub(crate) fn zero_plan(
        &self,
        raw: &QcowRawFile,
        cluster_index: u64,
        version: u32,
        has_backing: bool,
    ) -> Result<(Option<L2Entry>, L2Entry)> {
        let (e, _) = self.entry(raw, cluster_index)?;
        let new = self.geo.make_zero(version);
        let reads_zero = match self.geo.cluster_type(e) {
            ClusterType::ZeroPlain => true,
            ClusterType::Unallocated => !has_backing && (!self.geo.extended || e.bitmap == new.bitmap || e.bitmap == 0),
            _ => false,
        };
        Ok((if reads_zero || e == new { None } else { Some(new) }, e))
    }

    /// What a write to L1 index `l1_index` needs: the table is private, or a new one must be
    /// allocated.
    pub(crate) fn l2_for_write(&self, raw: &QcowRawFile, l1_index: u64) -> Result<L2ForWrite> {
        let l1e = usize::try_from(l1_index).ok().and_then(|i| self.l1.get(i)).copied().ok_or_else(|| {
            Error::InvalidClusterIndex(format!("L1 index {l1_index} beyond l1_size {}", self.l1.len()))
        })?;
        let old = l1_entry_l2_offset(l1e);
        if old != 0 && l1_entry_is_copied(l1e) {
            self.l2_table(raw, l1_index)?; // cached from now on
            return Ok(L2ForWrite::Ready(old));
        }
        let table = if old == 0 {
            vec![0u64; usize::try_from(self.geo.cluster_size() / 8).unwrap_or(0)]
        } else {
            self.l2_table(raw, l1_index)?.map(|(_, t)| (*t).clone()).unwrap_or_default()
        };
        Ok(L2ForWrite::New { table, shared: (old != 0).then_some(old) })
    }

    /// Points L1 entry `l1_index` at the new private table `table` at `offset` (cached dirty).
    /// Returns a dirty table evicted from the cache, which the caller must write back.
    pub(crate) fn install_l2(&mut self, l1_index: u64, offset: u64, table: Vec<u64>) -> Option<(u64, L2Table)> {
        let i = usize::try_from(l1_index).unwrap_or(usize::MAX);
        if let Some(slot) = self.l1.get_mut(i) {
            *slot = l1_entry_make(offset, true);
            self.l1_dirty.insert(i);
        }
        self.cache.get_mut().unwrap_or_else(PoisonError::into_inner).insert(offset, Arc::new(table), true)
    }

    /// Sets the entry of guest cluster `cluster_index`, whose table is private and cached
    /// (after [`L2Tables::l2_for_write`]).
    pub(crate) fn set_entry(&mut self, cluster_index: u64, table_offset: u64, e: L2Entry) -> Result<()> {
        let per = self.geo.entries_per_table();
        let geo = self.geo;
        let cache = self.cache.get_mut().unwrap_or_else(PoisonError::into_inner);
        let t = cache
            .get_mut(table_offset)
            .ok_or_else(|| Error::corrupt("L2 table vanished from the cache", table_offset))?;
        geo.set_entry(Arc::make_mut(t).as_mut_slice(), usize::try_from(cluster_index % per).unwrap_or(0), e);
        Ok(())
    }

    /// Dirty L2 tables (sorted by offset); they are marked clean.
    pub(crate) fn take_dirty_tables(&mut self) -> Vec<(u64, L2Table)> {
        let cache = self.cache.get_mut().unwrap_or_else(PoisonError::into_inner);
        let mut out = Vec::new();
        for k in cache.dirty_keys() {
            if let Some(t) = cache.get(k) {
                out.push((k, Arc::clone(t)));
            }
            cache.mark_clean(k);
        }
        out
    }

    /// Changed L1 entries `(index, entry)`; they are marked written.
    pub(crate) fn take_dirty_l1(&mut self) -> Vec<(usize, u64)> {
        std::mem::take(&mut self.l1_dirty).into_iter().filter_map(|i| self.l1.get(i).map(|&e| (i, e))).collect()
    }

    /// Empties L1 entry `l1_index` (written on the next flush) and forgets its table, which the
    /// caller frees. Returns the table's offset (0 if there was none).
    pub(crate) fn drop_l2(&mut self, l1_index: usize) -> u64 {
        let Some(slot) = self.l1.get_mut(l1_index) else { return 0 };
        let offset = l1_entry_l2_offset(*slot);
        if offset != 0 {
            *slot = 0;
            self.l1_dirty.insert(l1_index);
            self.cache.get_mut().unwrap_or_else(PoisonError::into_inner).remove(offset);
        }
        offset
    }

    /// Replaces the L1 table (after it moved to a larger place) keeping the cache.
    pub(crate) fn replace_l1(&mut self, offset: u64, l1: Vec<u64>) {
        self.l1_offset = offset;
        self.l1 = l1;
        self.l1_dirty.clear();
    }

    /// The data-carrying entry of a whole cluster written at `target`.
    pub(crate) fn data_entry(&self, host: u64) -> L2Entry {
        self.geo.make_data(host)
    }

    /// The entry after subclusters `first..=last` were written at `host`: allocated, no longer
    /// zero.
    pub(crate) fn subcluster_entry(&self, host: u64, old: L2Entry, first: u32, last: u32) -> L2Entry {
        let mask = ((1u64 << (last - first + 1)) - 1) << first;
        let bitmap = (old.bitmap | mask) & !(mask << 32);
        L2Entry { entry: host | crate::format::L2E_COPIED, bitmap }
    }
}

/// The tables as the open image sees them (cached and possibly unflushed), for the walker.
pub(crate) struct CachedTables<'a> {
    pub(crate) raw: &'a QcowRawFile,
    pub(crate) tables: &'a L2Tables,
}

impl TableSource for CachedTables<'_> {
    fn table(&self, offset: u64, words: u64) -> Result<Cow<'_, [u64]>> {
        if offset == self.tables.l1_offset && words == self.tables.l1.len() as u64 {
            return Ok(Cow::Borrowed(&self.tables.l1));
        }
        if let Some(t) = self.tables.cache().get(offset) {
            return Ok(Cow::Owned(t.as_ref().clone()));
        }
        self.raw.table(offset, words)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::create::{create_on, CreateOptions};
    use crate::storage::MemStorage;

    fn image(extended: bool) -> (Arc<MemStorage>, crate::QcowFile) {
        let mem = Arc::new(MemStorage::default());
        let opts = CreateOptions {
            virtual_size: 8 << 20,
            cluster_size: 65536,
            extended_l2: extended,
            ..CreateOptions::default()
        };
        let f = create_on(mem.clone(), &opts).unwrap();
        (mem, f)
    }

    #[test]
    fn read_plans_merge_runs_within_one_table() {
        let (_mem, mut f) = image(false);
        f.write_at(&[1u8; 3 * 65536], 65536).unwrap();
        f.write_at(&[2u8; 2 * 65536], 5 * 65536).unwrap();
        // Zeroing written clusters sets the zero flag.
        f.write_zeroes(5 * 65536, 2 * 65536).unwrap();
        let (raw, t) = (f.raw_file(), f.tables());
        let (p, n) = t.read_plan(raw, 0, 8 << 20).unwrap();
        assert_eq!((p, n), (ReadPlan::Backing, 65536));
        let (p, n) = t.read_plan(raw, 65536 + 10, 8 << 20).unwrap();
        assert!(matches!(p, ReadPlan::Data { .. }));
        assert_eq!(n, 3 * 65536 - 10, "contiguous data clusters are one run");
        let (p, n) = t.read_plan(raw, 5 * 65536, 8 << 20).unwrap();
        assert_eq!((p, n), (ReadPlan::Zero, 2 * 65536));
        let (p, n) = t.read_plan(raw, 5 * 65536, 100).unwrap();
        assert_eq!((p, n), (ReadPlan::Zero, 100), "a run never exceeds what was asked");
    }

    #[test]
    fn write_plans_follow_cluster_state() {
        let (_mem, mut f) = image(false);
        let (raw, t) = (f.raw_file().clone(), f.tables());
        assert!(matches!(t.write_plan(&raw, 3, 0, 512).unwrap(), WritePlan::Rewrite { target: Target::Allocate, .. }));
        f.write_at(&[1u8; 512], 3 * 65536).unwrap();
        let t = f.tables();
        assert!(matches!(t.write_plan(&raw, 3, 100, 512).unwrap(), WritePlan::InPlace { .. }));
        let (e, _) = t.entry(&raw, 3).unwrap();
        let WritePlan::InPlace { host } = t.write_plan(&raw, 3, 100, 512).unwrap() else { unreachable!() };
        assert_eq!(host, e.host_offset() + 100);
    }

    #[test]
    fn extended_writes_plan_only_the_touched_subclusters() {
        let (_mem, f) = image(true);
        let (raw, t) = (f.raw_file().clone(), f.tables());
        // 64 KiB clusters: 2 KiB subclusters. Bytes 3000..7000 touch subclusters 1..=3.
        let p = t.write_plan(&raw, 0, 3000, 4000).unwrap();
        assert_eq!(p, WritePlan::Subclusters { target: Target::Allocate, first: 1, last: 3, old: L2Entry::default() });
        let e = t.subcluster_entry(0x50000, L2Entry { entry: 0, bitmap: 0b1111u64 << 32 }, 1, 3);
        assert_eq!(e.alloc_bits(), 0b1110);
        assert_eq!(e.zero_bits(), 0b0001);
    }
}
