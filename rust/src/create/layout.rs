//! Where `qemu-img create` puts every structure of a new image, found by replaying QEMU's own
//! allocator (`block/qcow2-refcount.c`, `block/qcow2-cluster.c`, `qcow2_co_truncate`,
//! `preallocate_co`) on an in-memory model of the file.
//!
//! QEMU builds an image in steps: a header cluster, a one-cluster reftable and an empty
//! refblock; `alloc_clusters(3 clusters)`; an L1 table (`grow_l1_table`); then, for
//! preallocation, L2 tables and data clusters allocated one L2 range at a time (metadata), or
//! a refcount area covering the whole disk followed by the data and then the L2 tables
//! (falloc, full). Its allocator leaves holes where a refblock allocation restarts a search,
//! moves the reftable when it fills, and reuses the clusters of the old reftable. Replaying
//! the same decisions gives the same offsets, the same file length, the same written (and
//! hence allocated) byte ranges and the same stale bytes in unwritten clusters.
//!
//! The model records, per cluster, the last whole-cluster structure written there; the
//! contents of refblocks, L2 tables and the live reftable are taken from the final state
//! (QEMU flushes its caches on close), those of replaced reftables as they were replaced.

use std::collections::{BTreeMap, HashMap};

use crate::error::{Error, Result};
use crate::format::{L1E_COPIED, L2E_COPIED};

/// QEMU's `QCOW_MAX_REFTABLE_SIZE` (8 MiB), which it compares with entry counts.
const QCOW_MAX_REFTABLE_SIZE: u64 = 8 << 20;
/// QEMU's `QCOW_MAX_L1_SIZE` (32 MiB).
const QCOW_MAX_L1_SIZE: u64 = 32 << 20;
/// `INT_MAX`, the bound of QEMU's per-call byte counts.
const INT_MAX: u64 = 0x7fff_ffff;
/// `BDRV_REQUEST_MAX_BYTES`: `INT_MAX` rounded down to 512-byte sectors.
const BDRV_REQUEST_MAX_BYTES: u64 = 0x7fff_fe00;

/// Preallocation mode (`qemu-img create -o preallocation=...`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Preallocation {
    /// Only the header, refcount structure and L1 table.
    #[default]
    Off,
    /// L2 tables and data clusters allocated (refcounted and mapped) but not written.
    Metadata,
    /// As `Metadata`, with the data area reserved with `posix_fallocate`.
    Falloc,
    /// As `Metadata`, with zeros written over the data area.
    Full,
}

/// What a whole cluster of the image file holds (the last whole-cluster write there).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Cluster {
    /// The header cluster.
    Header,
    /// Cluster `part` of reftable generation `generation` (the last generation is live).
    Reftable { generation: usize, part: u64 },
    /// The refblock for reftable index `index`.
    Refblock { index: u64 },
    /// The L2 table of L1 index `l1_index`.
    L2 { l1_index: u64 },
}

/// How a file is grown past what was written, as QEMU's file driver does it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Grow {
    /// `ftruncate` (a hole).
    Truncate,
    /// `posix_fallocate` of the new range.
    Fallocate,
    /// Zeros written over the new range.
    WriteZeros,
}

/// Growth of a file from `from` (its length then) to `to`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Extend {
    pub from: u64,
    pub to: u64,
    pub mode: Grow,
}

/// One write or growth of the image or data file, in the order QEMU does them (the order
/// decides how the file system places the blocks, and hence how many it uses).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Event {
    /// The first write of image cluster `index` (its final contents are written then).
    Cluster(u64),
    /// The L1 table.
    L1,
    /// Zeros (copy-on-write of the last cluster's tail; QEMU's "first block" write after a
    /// file grows from length 0: `allocate_first_block` of `file-posix.c`).
    Zeros { data_file: bool, offset: u64, len: u64 },
    /// A file grown (`bdrv_co_truncate` with a preallocation mode).
    Grow { data_file: bool, extend: Extend },
}

/// The inputs of the layout.
#[derive(Clone, Copy, Debug)]
pub(super) struct Params {
    pub cluster_bits: u32,
    pub refcount_order: u32,
    pub extended_l2: bool,
    pub data_file: bool,
    /// Virtual size, already rounded up to 512 bytes.
    pub size: u64,
    pub preallocation: Preallocation,
}

/// A growable bit set: the refcounts of a new image are all 0 or 1.
#[derive(Clone, Debug, Default)]
pub(super) struct Bits(Vec<u64>);

impl Bits {
    pub fn get(&self, i: u64) -> bool {
        let w = usize::try_from(i / 64).unwrap_or(usize::MAX);
        self.0.get(w).is_some_and(|&x| x >> (i % 64) & 1 == 1)
    }
    fn set(&mut self, i: u64, v: bool) {
        let w = usize::try_from(i / 64).unwrap_or(usize::MAX);
        if w >= self.0.len() {
            if !v {
                return;
            }
            self.0.resize(w + 1, 0);
        }
        if v {
            self.0[w] |= 1 << (i % 64);
        } else {
            self.0[w] &= !(1 << (i % 64));
        }
    }
}

/// Why an allocation step did not complete: QEMU's `-EAGAIN` (a refblock was allocated, the
/// caller restarts its search), or a real error.
enum Step {
    Again,
    Fail(Error),
}

impl From<Error> for Step {
    fn from(e: Error) -> Self {
        Step::Fail(e)
    }
}

type StepResult<T> = std::result::Result<T, Step>;

/// A pending L2 update (QEMU's `QCowL2Meta`) for freshly allocated clusters.
#[derive(Clone, Copy, Debug)]
struct Meta {
    guest_offset: u64,
    alloc_offset: u64,
    nb_clusters: u64,
    /// (offset in the allocation, bytes) of the copy-on-write regions before and after.
    cow_start: (u64, u64),
    cow_end: (u64, u64),
}

/// The model of the image (and data file) as QEMU leaves them.
#[derive(Debug)]
pub(super) struct Layout {
    pub cluster_bits: u32,
    pub refcount_order: u32,
    rb_bits: u32,
    refcount_max: u64,
    /// Entries per L2 table, and 64-bit words per entry (2 with extended L2).
    l2_entries: u64,
    words: usize,
    subcluster_bits: u32,
    data_file: bool,
    pub refcounts: Bits,
    free_cluster_index: u64,
    /// Every reftable the image had, in order; the last is live.
    pub reftables: Vec<Vec<u64>>,
    pub reftable_offset: u64,
    max_reftable_index: u64,
    pub l1: Vec<u64>,
    pub l1_offset: u64,
    pub l2: HashMap<u64, Vec<u64>>,
    pub clusters: BTreeMap<u64, Cluster>,
    /// Lengths of the image and data files in the model.
    pub image_len: u64,
    pub data_len: u64,
    pub events: Vec<Event>,
}

impl Layout {
    /// Replays `qcow2_co_create` for `p` (without the header contents, which the caller
    /// writes from the final state).
    pub fn build(p: &Params) -> Result<Self> {
        let mut l = Layout::new(p);
        let first = l.alloc_clusters(3 << p.cluster_bits)?;
        if first != 0 {
            return Err(Error::corrupt("layout: the first clusters of a new image are in use", first));
        }
        let l1_entries = size_to_l1(p.size, p.cluster_bits, l.l2_entries);
        if l1_entries > QCOW_MAX_L1_SIZE / 8 {
            return Err(Error::UnsupportedFeature(format!(
                "virtual size {}: The image size is too large for file format 'qcow2' (try using a larger cluster size)",
                p.size
            )));
        }
        l.grow_l1(l1_entries)?;
        match p.preallocation {
            Preallocation::Off => {
                if p.data_file {
                    l.grow_file(true, p.size, Grow::Truncate);
                }
            }
            Preallocation::Metadata => l.preallocate(p.size, Grow::Truncate)?,
            Preallocation::Falloc | Preallocation::Full => {
                let grow = if p.preallocation == Preallocation::Full { Grow::WriteZeros } else { Grow::Fallocate };
                if p.data_file {
                    l.preallocate(p.size, grow)?;
                } else {
                    l.preallocate_image(p.size, grow)?;
                }
            }
        }
        Ok(l)
    }

    fn new(p: &Params) -> Self {
        let cb = p.cluster_bits;
        let cs = 1u64 << cb;
        let words = if p.extended_l2 { 2 } else { 1 };
        let geo = crate::format::RefcountGeometry { cluster_bits: cb, refcount_order: p.refcount_order };
        let mut reftable = vec![0u64; usize::try_from(cs / 8).unwrap_or(0)];
        reftable[0] = 2 * cs;
        let mut clusters = BTreeMap::new();
        clusters.insert(0, Cluster::Header);
        clusters.insert(1, Cluster::Reftable { generation: 0, part: 0 });
        clusters.insert(2, Cluster::Refblock { index: 0 });
        Layout {
            cluster_bits: cb,
            refcount_order: p.refcount_order,
            rb_bits: geo.refblock_bits(),
            refcount_max: geo.refcount_max(),
            l2_entries: cs / (8 * words as u64),
            words,
            subcluster_bits: if p.extended_l2 { cb - 5 } else { cb },
            data_file: p.data_file,
            refcounts: Bits::default(),
            free_cluster_index: 0,
            reftables: vec![reftable],
            reftable_offset: cs,
            max_reftable_index: 0,
            l1: Vec::new(),
            l1_offset: 0,
            l2: HashMap::new(),
            clusters,
            image_len: 3 * cs,
            data_len: 0,
            events: vec![Event::Cluster(0), Event::Cluster(1), Event::Cluster(2)],
        }
    }

    fn cs(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    fn live(&self) -> &[u64] {
        self.reftables.last().map_or(&[], Vec::as_slice)
    }

    /// Clusters of the live reftable.
    pub fn reftable_clusters(&self) -> u64 {
        self.live().len() as u64 * 8 / self.cs()
    }

    fn write_cluster(&mut self, index: u64, c: Cluster) {
        self.clusters.insert(index, c);
        self.events.push(Event::Cluster(index));
        self.image_len = self.image_len.max((index + 1) << self.cluster_bits);
    }

    fn file_len(&mut self, data_file: bool) -> &mut u64 {
        if data_file {
            &mut self.data_len
        } else {
            &mut self.image_len
        }
    }

    /// Zeros written at `offset`.
    fn write_zeros(&mut self, data_file: bool, offset: u64, len: u64) {
        if len > 0 {
            self.events.push(Event::Zeros { data_file, offset, len });
            let l = self.file_len(data_file);
            *l = (*l).max(offset + len);
        }
    }

    /// `bdrv_co_truncate` of a regular file to `to` (file-posix `handle_aiocb_truncate`).
    fn grow_file(&mut self, data_file: bool, to: u64, mode: Grow) {
        let from = *self.file_len(data_file);
        if to == from {
            return;
        }
        self.events.push(Event::Grow { data_file, extend: Extend { from, to, mode } });
        *self.file_len(data_file) = to;
        if from == 0 && to > 0 && mode != Grow::WriteZeros {
            self.write_zeros(data_file, 0, if to < 4096 { 512 } else { 4096 });
        }
    }

    /// `qcow2_get_refcount`: 0 where no refblock is hooked up.
    fn get_refcount(&self, index: u64) -> u64 {
        let ti = usize::try_from(index >> self.rb_bits).unwrap_or(usize::MAX);
        match self.live().get(ti) {
            Some(&e) if e != 0 => u64::from(self.refcounts.get(index)),
            _ => 0,
        }
    }

    /// `alloc_clusters_noref`: the first run of `size` bytes of free clusters from
    /// `free_cluster_index`, refcounts untouched.
    fn alloc_clusters_noref(&mut self, size: u64) -> Result<u64> {
        let nb = size.div_ceil(self.cs());
        'retry: loop {
            for _ in 0..nb {
                let i = self.free_cluster_index;
                self.free_cluster_index += 1;
                if self.get_refcount(i) != 0 {
                    continue 'retry;
                }
            }
            break;
        }
        if self.free_cluster_index > 0 && self.free_cluster_index - 1 > (i64::MAX as u64 >> self.cluster_bits) {
            return Err(too_large("a cluster offset beyond 2^63"));
        }
        Ok((self.free_cluster_index - nb) << self.cluster_bits)
    }

    /// `qcow2_alloc_clusters`.
    fn alloc_clusters(&mut self, size: u64) -> Result<u64> {
        loop {
            let offset = self.alloc_clusters_noref(size)?;
            match self.update_refcount(offset, size, false) {
                Ok(()) => return Ok(offset),
                Err(Step::Again) => {}
                Err(Step::Fail(e)) => return Err(e),
            }
        }
    }

    /// `qcow2_alloc_clusters_at`: as many of `nb` clusters from `offset` as are free.
    fn alloc_clusters_at(&mut self, offset: u64, nb: u64) -> Result<u64> {
        if nb == 0 {
            return Ok(0);
        }
        loop {
            let first = offset >> self.cluster_bits;
            let free = (0..nb).take_while(|&i| self.get_refcount(first + i) == 0).count() as u64;
            match self.update_refcount(offset, free << self.cluster_bits, false) {
                Ok(()) => return Ok(free),
                Err(Step::Again) => {}
                Err(Step::Fail(e)) => return Err(e),
            }
        }
    }

    /// `update_refcount` by one: on failure the clusters already updated are reverted.
    fn update_refcount(&mut self, offset: u64, length: u64, decrease: bool) -> StepResult<()> {
        if length == 0 {
            return Ok(());
        }
        let cs = self.cs();
        let start = offset & !(cs - 1);
        let last = (offset + length - 1) & !(cs - 1);
        let mut old_table_index = None;
        let mut cluster_offset = start;
        while cluster_offset <= last {
            let index = cluster_offset >> self.cluster_bits;
            let table_index = index >> self.rb_bits;
            let mut step = Ok(());
            if old_table_index != Some(table_index) {
                step = self.alloc_refcount_block(index);
                if matches!(step, Err(Step::Again)) {
                    // The caller restarts its search: from the same clusters first.
                    self.free_cluster_index = self.free_cluster_index.min(start >> self.cluster_bits);
                }
            }
            let step = step.and_then(|()| self.add_refcount(index, decrease));
            if let Err(e) = step {
                if cluster_offset > offset {
                    // QEMU ignores the result of the revert.
                    let _ = self.update_refcount(offset, cluster_offset - offset, !decrease);
                }
                return Err(e);
            }
            old_table_index = Some(table_index);
            cluster_offset += cs;
        }
        Ok(())
    }

    fn add_refcount(&mut self, index: u64, decrease: bool) -> StepResult<()> {
        let rc = u64::from(self.refcounts.get(index));
        let new = if decrease { rc.checked_sub(1) } else { rc.checked_add(1).filter(|&v| v <= self.refcount_max) };
        let Some(new) = new else {
            return Err(Step::Fail(Error::InvalidArgument(format!(
                "refcount_bits {}: the refcount of cluster {index} would overflow",
                1u32 << self.refcount_order
            ))));
        };
        if new == 0 && index < self.free_cluster_index {
            self.free_cluster_index = index;
        }
        self.refcounts.set(index, new == 1);
        Ok(())
    }

    /// `alloc_refcount_block`: makes sure the refblock for cluster `index` exists; `Again`
    /// when it had to allocate one (the caller restarts).
    fn alloc_refcount_block(&mut self, index: u64) -> StepResult<()> {
        let table_index = index >> self.rb_bits;
        let ti = usize::try_from(table_index).unwrap_or(usize::MAX);
        if self.live().get(ti).is_some_and(|&e| e != 0) {
            return Ok(());
        }
        let new_block = self.alloc_clusters_noref(self.cs())?;
        let new_index = new_block >> self.cluster_bits;
        if new_index >> self.rb_bits == table_index {
            // The block describes itself.
            self.refcounts.set(new_index, true);
        } else {
            self.update_refcount(new_block, self.cs(), false)?;
        }
        self.write_cluster(new_index, Cluster::Refblock { index: table_index });
        if ti < self.live().len() {
            if let Some(t) = self.reftables.last_mut() {
                t[ti] = new_block;
            }
            self.max_reftable_index = self.max_reftable_index.max(table_index);
            return Err(Step::Again);
        }
        // The reftable is full: a new one, with refblocks covering it, past everything.
        let rb_entries = 1u64 << self.rb_bits;
        let blocks_used = (index + 1).max(new_index + 1).div_ceil(rb_entries);
        let meta_offset = (blocks_used * rb_entries) << self.cluster_bits;
        self.refcount_area(meta_offset, 0, false, table_index, new_block)?;
        Err(Step::Again)
    }

    /// `qcow2_refcount_area`: a new reftable, and new refblocks where needed, at
    /// `start_offset` (the end of the file), covering themselves and `additional` clusters
    /// past them; the old reftable is freed. Returns where the area ends.
    fn refcount_area(
        &mut self,
        start_offset: u64,
        additional: u64,
        exact: bool,
        new_index: u64,
        new_offset: u64,
    ) -> Result<u64> {
        let cs = self.cs();
        let total =
            refcount_metadata_size(start_offset / cs + additional, self.cluster_bits, self.refcount_order, !exact);
        if total > QCOW_MAX_REFTABLE_SIZE {
            return Err(too_large("a refcount table above QEMU's limit"));
        }
        let area_index = (start_offset / cs) >> self.rb_bits;
        let mut table_size = if exact { total } else { total + total.div_ceil(2) };
        table_size = table_size.div_ceil(cs / 8) * (cs / 8);
        if table_size > QCOW_MAX_REFTABLE_SIZE {
            return Err(too_large("a refcount table above QEMU's limit"));
        }
        let table_clusters = table_size * 8 / cs;
        let mut table = vec![0u64; usize::try_from(table_size).map_err(|_| too_large("the refcount table"))?];
        let old = self.live();
        let keep = if table_size > self.max_reftable_index {
            usize::try_from(self.max_reftable_index + 1).unwrap_or(usize::MAX)
        } else {
            table.len()
        };
        let keep = keep.min(old.len());
        table[..keep].copy_from_slice(&old[..keep]);
        if new_offset != 0 {
            table[usize::try_from(new_index).unwrap_or(usize::MAX)] = new_offset;
        }
        let new_blocks = (area_index..total).filter(|&i| table[i as usize] == 0).count() as u64;
        let table_offset = start_offset + new_blocks * cs;
        let end_offset = table_offset + table_clusters * cs;
        let mut block_offset = start_offset;
        for i in area_index..total {
            if table[i as usize] == 0 {
                table[i as usize] = block_offset;
                self.write_cluster(block_offset >> self.cluster_bits, Cluster::Refblock { index: i });
                block_offset += cs;
            }
            self.mark_area(i, start_offset, end_offset);
        }
        let generation = self.reftables.len();
        for part in 0..table_clusters {
            self.write_cluster(table_offset / cs + part, Cluster::Reftable { generation, part });
        }
        let (old_offset, old_len) = (self.reftable_offset, self.live().len() as u64);
        self.reftables.push(table);
        self.reftable_offset = table_offset;
        self.max_reftable_index = self.live().iter().rposition(|&e| e != 0).unwrap_or(0) as u64;
        // `qcow2_free_clusters`: QEMU reports a failure and goes on.
        let _ = self.update_refcount(old_offset, old_len * 8, true);
        Ok(end_offset)
    }

    /// Refcount 1 for the clusters of `[start, end)` that refblock `i` covers.
    fn mark_area(&mut self, i: u64, start: u64, end: u64) {
        let cs = self.cs();
        let rb_entries = 1u64 << self.rb_bits;
        let first = (i * rb_entries) << self.cluster_bits;
        if first >= end {
            return;
        }
        let j0 = if first < start { (start - first) / cs } else { 0 };
        let j1 = ((end - first) / cs).min(rb_entries);
        for j in j0..j1 {
            self.refcounts.set(i * rb_entries + j, true);
        }
    }

    /// `qcow2_grow_l1_table(exact)` from an empty L1 table.
    fn grow_l1(&mut self, entries: u64) -> Result<()> {
        if entries == 0 {
            return Ok(());
        }
        if entries > INT_MAX / 8 || entries > QCOW_MAX_L1_SIZE / 8 {
            return Err(too_large("an L1 table above QEMU's limit of 32 MiB"));
        }
        let offset = self.alloc_clusters(entries * 8)?;
        self.l1 = vec![0; usize::try_from(entries).map_err(|_| too_large("the L1 table"))?];
        self.l1_offset = offset;
        self.events.push(Event::L1);
        self.image_len = self.image_len.max(offset + entries * 8);
        Ok(())
    }

    /// `get_cluster_table`: the L1 index of `guest`, its L2 table allocated if needed.
    fn get_cluster_table(&mut self, guest: u64) -> Result<u64> {
        let l1_index = guest >> self.cluster_bits >> self.l2_entries.trailing_zeros();
        let i = usize::try_from(l1_index).unwrap_or(usize::MAX);
        let Some(&e) = self.l1.get(i) else {
            return Err(Error::corrupt(format!("layout: guest offset 0x{guest:x} past the L1 table"), guest));
        };
        if e & L1E_COPIED == 0 {
            let offset = self.alloc_clusters(self.cs())?;
            if offset == 0 {
                return Err(Error::corrupt("layout: an L2 table at offset 0", 0));
            }
            self.l2.insert(l1_index, vec![0; usize::try_from(self.l2_entries).unwrap_or(0) * self.words]);
            self.write_cluster(offset >> self.cluster_bits, Cluster::L2 { l1_index });
            self.l1[i] = offset | L1E_COPIED;
        }
        Ok(l1_index)
    }

    /// `preallocate_co(0, size)`: L2 tables and clusters for the whole disk, a range of one
    /// L2 table at a time; then the data file (the image itself without an external one) is
    /// grown to cover the last cluster.
    fn preallocate(&mut self, size: u64, grow: Grow) -> Result<()> {
        let chunk = INT_MAX & !(self.cs() - 1);
        let (mut offset, mut bytes) = (0u64, size);
        let mut end = None;
        while bytes > 0 {
            let mut cur = bytes.min(chunk);
            let (host, metas) = self.alloc_host_offset(offset, &mut cur)?;
            for m in &metas {
                self.link_l2(m)?;
            }
            end = Some(host + cur);
            bytes -= cur;
            offset += cur;
        }
        if let Some(end) = end {
            if end > *self.file_len(self.data_file) {
                self.grow_file(self.data_file, end, grow);
            }
        }
        Ok(())
    }

    /// `qcow2_alloc_host_offset` on an unallocated range: clusters for as much of
    /// `[offset, offset + *bytes)` as one contiguous host range holds (`*bytes` shrinks to it).
    fn alloc_host_offset(&mut self, offset: u64, bytes: &mut u64) -> Result<(u64, Vec<Meta>)> {
        let (mut start, mut remaining) = (offset, *bytes);
        let (mut cluster_offset, mut host) = (None::<u64>, None::<u64>);
        let mut cur = 0;
        let mut metas = Vec::new();
        loop {
            if host.is_none() {
                host = cluster_offset;
            }
            start += cur;
            remaining -= cur;
            if let Some(c) = cluster_offset.as_mut() {
                *c += cur;
            }
            if remaining == 0 {
                break;
            }
            cur = remaining;
            // handle_copied: the range is unallocated, but the lookup allocates its L2 table.
            self.get_cluster_table(start)?;
            match self.handle_alloc(start, cluster_offset, cur)? {
                Some((m, c, n)) => {
                    metas.push(m);
                    cluster_offset = Some(c);
                    cur = n;
                }
                None => break,
            }
        }
        *bytes -= remaining;
        let host = host.ok_or_else(|| Error::corrupt("layout: nothing allocated", offset))?;
        Ok((host, metas))
    }

    /// `handle_alloc`: new clusters for `[start, start + cur)` up to the end of its L2 table,
    /// contiguous with `cluster_offset` if given. Returns the update, the host offset of
    /// `start` and the bytes covered; `None` when nothing could be allocated there.
    fn handle_alloc(&mut self, start: u64, cluster_offset: Option<u64>, cur: u64) -> Result<Option<(Meta, u64, u64)>> {
        let cs = self.cs();
        let in_cluster = start & (cs - 1);
        let l2_index = (start >> self.cluster_bits) & (self.l2_entries - 1);
        let mut nb = (in_cluster + cur).div_ceil(cs).min(self.l2_entries - l2_index).min(BDRV_REQUEST_MAX_BYTES / cs);
        self.get_cluster_table(start)?;
        let alloc = if self.data_file {
            start & !(cs - 1)
        } else if let Some(c) = cluster_offset {
            let a = c & !(cs - 1);
            nb = self.alloc_clusters_at(a, nb)?;
            a
        } else {
            self.alloc_clusters(nb * cs)?
        };
        if nb == 0 {
            return Ok(None);
        }
        let covered = (cur + in_cluster).min(nb * cs);
        let cur = cur.min(covered - in_cluster);
        Ok(Some((self.l2_meta(alloc, start, cur), alloc + in_cluster, cur)))
    }

    /// `calculate_l2_meta` for unallocated clusters: copy-on-write from the start of the
    /// (sub)cluster of `guest` and to the end of the (sub)cluster of the last byte.
    fn l2_meta(&self, alloc: u64, guest: u64, bytes: u64) -> Meta {
        let cs = self.cs();
        let sc = 1u64 << self.subcluster_bits;
        let cow_start_to = guest & (cs - 1);
        let cow_end_from = cow_start_to + bytes;
        let cow_start_from = cow_start_to & !(sc - 1);
        let cow_end_to = cow_end_from.div_ceil(sc) * sc;
        Meta {
            guest_offset: guest & !(cs - 1),
            alloc_offset: alloc,
            nb_clusters: cow_end_from.div_ceil(cs),
            cow_start: (cow_start_from, cow_start_to - cow_start_from),
            cow_end: (cow_end_from, cow_end_to - cow_end_from),
        }
    }

    /// `qcow2_alloc_cluster_link_l2` with `prealloc` set: copy-on-write (zeros: nothing is
    /// below a new image) and the L2 entries; the subcluster bitmaps stay clear.
    fn link_l2(&mut self, m: &Meta) -> Result<()> {
        if m.cow_start.1 > 0 || m.cow_end.1 > 0 {
            self.write_zeros(self.data_file, m.alloc_offset + m.cow_start.0, m.cow_start.1);
            self.write_zeros(self.data_file, m.alloc_offset + m.cow_end.0, m.cow_end.1);
        }
        let l1_index = self.get_cluster_table(m.guest_offset)?;
        let first = usize::try_from((m.guest_offset >> self.cluster_bits) & (self.l2_entries - 1)).unwrap_or(0);
        let (cs, words) = (self.cs(), self.words);
        let table =
            self.l2.get_mut(&l1_index).ok_or_else(|| Error::corrupt("layout: L2 table missing", m.guest_offset))?;
        for i in 0..usize::try_from(m.nb_clusters).unwrap_or(0) {
            table[(first + i) * words] = (m.alloc_offset + i as u64 * cs) | L2E_COPIED;
        }
        Ok(())
    }

    /// Falloc and full preallocation without a data file (`qcow2_co_truncate`): a refcount
    /// area at the end of the file covering the data and L2 tables, the data clusters after
    /// it, the file grown over them, then the L2 tables (allocated where there is room).
    fn preallocate_image(&mut self, size: u64, grow: Grow) -> Result<()> {
        let cs = self.cs();
        let old_file_size = match self.last_cluster() {
            Some(c) => (c + 1) * cs,
            None => self.image_len.div_ceil(cs) * cs,
        };
        let data_clusters = size.div_ceil(cs);
        let l2_tables = data_clusters.div_ceil(self.l2_entries) + 1;
        let start = self.refcount_area(old_file_size, data_clusters + l2_tables, true, 0, 0)?;
        let n = self.alloc_clusters_at(start, data_clusters)?;
        if n != data_clusters {
            return Err(Error::corrupt("layout: the preallocated data area is in use", start));
        }
        self.grow_file(false, start + data_clusters * cs, grow);
        let (mut host, mut guest, mut left) = (start, 0u64, data_clusters);
        while left > 0 {
            let nb = left.min(self.l2_entries - ((guest >> self.cluster_bits) & (self.l2_entries - 1)));
            let m = Meta {
                guest_offset: guest,
                alloc_offset: host,
                nb_clusters: nb,
                cow_start: (0, 0),
                cow_end: (nb * cs, 0),
            };
            self.link_l2(&m)?;
            guest += nb * cs;
            host += nb * cs;
            left -= nb;
        }
        Ok(())
    }

    /// `qcow2_get_last_cluster`: the last cluster of the file with a refcount.
    fn last_cluster(&self) -> Option<u64> {
        let n = self.image_len.div_ceil(self.cs());
        (0..n).rev().find(|&i| self.get_refcount(i) > 0)
    }
}

/// `size_to_l1`: L1 entries for `size` bytes.
fn size_to_l1(size: u64, cluster_bits: u32, l2_entries: u64) -> u64 {
    let shift = cluster_bits + l2_entries.trailing_zeros();
    size.div_ceil(1u64 << shift)
}

/// `qcow2_refcount_metadata_size`: the refblocks needed to count `clusters` clusters and the
/// refcount structure itself (with half the table again if `generous`).
pub(super) fn refcount_metadata_size(clusters: u64, cluster_bits: u32, refcount_order: u32, generous: bool) -> u64 {
    refcount_metadata_clusters(clusters, cluster_bits, refcount_order, generous).0
}

/// `qcow2_refcount_metadata_size` in full: `(refblocks, reftable clusters)` that count
/// `clusters` clusters and themselves (QEMU returns their sum in bytes).
pub(crate) fn refcount_metadata_clusters(
    clusters: u64,
    cluster_bits: u32,
    refcount_order: u32,
    generous: bool,
) -> (u64, u64) {
    let cs = 1u64 << cluster_bits;
    let per_table_cluster = cs / 8;
    let per_block = (cs * 8) >> refcount_order;
    let (mut clusters, mut generous) = (clusters, generous);
    let (mut table, mut blocks, mut n) = (0u64, 0u64, 0u64);
    loop {
        let last = n;
        blocks = (clusters + table + blocks).div_ceil(per_block);
        table = blocks.div_ceil(per_table_cluster);
        n = clusters + blocks + table;
        if n == last && generous {
            clusters += table.div_ceil(2);
            n = 0;
            generous = false;
        }
        if n == last {
            return (blocks, table);
        }
    }
}

fn too_large(what: &str) -> Error {
    Error::UnsupportedFeature(format!("virtual size too large: the image would need {what} (qemu-img: File too large)"))
}

/// Where the layout is written: the image file, its data file, or a [`Storage`].
pub(super) trait Sink {
    /// Writes `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()>;
    /// Grows the file as QEMU's file driver would.
    fn grow(&self, e: Extend) -> std::io::Result<()>;
    /// `fdatasync`.
    fn sync(&self) -> std::io::Result<()>;
}

/// Bytes per write when the layout is written (runs of clusters, zero fills).
const WRITE_CHUNK: u64 = 1 << 20;

/// Writes `len` zero bytes at `offset`, a chunk at a time.
pub(super) fn write_zeros(sink: &dyn Sink, offset: u64, len: u64) -> std::io::Result<()> {
    let zeros = vec![0u8; usize::try_from(len.min(WRITE_CHUNK)).unwrap_or(0)];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(WRITE_CHUNK);
        sink.write_at(&zeros[..usize::try_from(n).unwrap_or(0)], offset + done)?;
        done += n;
    }
    Ok(())
}

impl Layout {
    /// The bytes of cluster `c` as QEMU leaves them (`header`: the header cluster's bytes).
    fn cluster_bytes(&self, c: Cluster, header: &[u8], buf: &mut [u8]) {
        buf.fill(0);
        match c {
            Cluster::Header => {
                let n = header.len().min(buf.len());
                buf[..n].copy_from_slice(&header[..n]);
            }
            Cluster::Reftable { generation, part } => {
                let per = buf.len() / 8;
                let table = self.reftables.get(generation).map_or(&[][..], Vec::as_slice);
                let from = usize::try_from(part).unwrap_or(usize::MAX).saturating_mul(per);
                put_be64(buf, table.get(from..).unwrap_or(&[]));
            }
            Cluster::Refblock { index } => self.refblock_bytes(index, buf),
            Cluster::L2 { l1_index } => put_be64(buf, self.l2.get(&l1_index).map_or(&[][..], Vec::as_slice)),
        }
    }

    fn refblock_bytes(&self, index: u64, buf: &mut [u8]) {
        let entries = 1u64 << self.rb_bits;
        // Whole 64-bit words of the bit set (a refblock covers a multiple of 64 clusters, or
        // fewer than 64 from a word boundary).
        let first = index * entries;
        let w0 = usize::try_from(first / 64).unwrap_or(usize::MAX);
        let words = usize::try_from(entries.div_ceil(64)).unwrap_or(0);
        for (k, &w) in self.refcounts.0.iter().skip(w0).take(words).enumerate() {
            let mut w = w;
            while w != 0 {
                let i = (k * 64) as u64 + u64::from(w.trailing_zeros()) + w0 as u64 * 64 - first;
                w &= w - 1;
                if i < entries {
                    crate::format::set_refcount_at(buf, self.refcount_order, usize::try_from(i).unwrap_or(0), 1);
                }
            }
        }
    }

    /// Writes the image (and the data file, if `data` is given) in QEMU's order: each
    /// cluster with its final contents when QEMU first writes it, the L1 table, the zeros,
    /// the growth.
    pub fn write(&self, image: &dyn Sink, header: &[u8], data: Option<&dyn Sink>) -> std::io::Result<()> {
        let cs = usize::try_from(self.cs()).unwrap_or(0);
        let max_run = usize::try_from(WRITE_CHUNK).unwrap_or(0).max(cs) / cs;
        let mut written = Bits::default();
        let mut run = Run { start: 0, bytes: Vec::new() };
        for &e in &self.events {
            if let Event::Cluster(index) = e {
                if written.get(index) {
                    continue;
                }
                written.set(index, true);
                if run.bytes.is_empty()
                    || run.start + (run.bytes.len() / cs) as u64 != index
                    || run.bytes.len() / cs >= max_run
                {
                    run.flush(image, self.cluster_bits)?;
                    run.start = index;
                }
                let at = run.bytes.len();
                run.bytes.resize(at + cs, 0);
                let c = self.clusters.get(&index).copied().unwrap_or(Cluster::Header);
                self.cluster_bytes(c, header, &mut run.bytes[at..]);
                continue;
            }
            run.flush(image, self.cluster_bits)?;
            let sink = |data_file: bool| if data_file { data } else { Some(image) };
            match e {
                Event::L1 => {
                    let mut l1 = vec![0u8; self.l1.len() * 8];
                    put_be64(&mut l1, &self.l1);
                    image.write_at(&l1, self.l1_offset)?;
                }
                Event::Zeros { data_file, offset, len } => {
                    if let Some(s) = sink(data_file) {
                        write_zeros(s, offset, len)?;
                    }
                }
                Event::Grow { data_file, extend } => {
                    // QEMU has synced what it wrote before (its caches flush to disk): the file
                    // system places those blocks before the grown range.
                    image.sync()?;
                    if let Some(d) = data {
                        d.sync()?;
                    }
                    if let Some(s) = sink(data_file) {
                        s.grow(extend)?;
                    }
                }
                Event::Cluster(_) => {}
            }
        }
        run.flush(image, self.cluster_bits)
    }
}

/// Consecutive clusters waiting to be written at once.
struct Run {
    start: u64,
    bytes: Vec<u8>,
}

impl Run {
    fn flush(&mut self, sink: &dyn Sink, cluster_bits: u32) -> std::io::Result<()> {
        if !self.bytes.is_empty() {
            sink.write_at(&self.bytes, self.start << cluster_bits)?;
            self.bytes.clear();
        }
        Ok(())
    }
}

/// Big-endian `u64`s into `buf` (as many as fit).
fn put_be64(buf: &mut [u8], values: &[u64]) {
    for (chunk, v) in buf.chunks_exact_mut(8).zip(values) {
        chunk.copy_from_slice(&v.to_be_bytes());
    }
}
