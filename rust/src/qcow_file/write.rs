//! The write side of `QcowFile`: executes the write plans of `mapping.rs` (in place, subcluster
//! allocation, whole-cluster copy-on-write), allocates through the `RefcountManager`, and
//! makes it durable in the one order that leaves at worst leaks after a crash:
//!
//! 1. guest data and refblocks, then (after a sync) the reftable, synced;
//! 2. L2 tables, synced;
//! 3. L1 entries, synced;
//! 4. only then the references dropped by the writes are decremented (and their clusters
//!    punched out of the host file).

use std::sync::PoisonError;

use super::QcowFile;
use crate::bitmap::{BitmapStart, BitmapTracker, ClusterAllocator};
use crate::check::{self, Repair};
use crate::error::{Error, Result};
use crate::format::{
    l1_entry_is_copied, l1_entry_l2_offset, ClusterType, L2Entry, SubclusterState, AUTOCLEAR_BITMAPS,
    AUTOCLEAR_DATA_FILE_RAW, INCOMPAT_DIRTY, MAX_L1_BYTES,
};
use crate::header::QcowHeader;
use crate::mapping::{L2ForWrite, Target, WritePlan};
use crate::raw_file::QcowRawFile;
use crate::refcount::RefcountManager;

/// What a writing handle keeps: the allocator and the promises to keep on close.
pub(crate) struct Writer {
    refcounts: RefcountManager,
    /// This handle set the dirty bit (lazy refcounts) and must clear it on a clean close.
    set_dirty_bit: bool,
    /// Persistent bitmaps to update on close.
    bitmaps: Option<BitmapTracker>,
}

impl Writer {
    /// Re-reads the refcounts after a repair replaced them.
    pub(crate) fn reload(&mut self, raw: &QcowRawFile, h: &QcowHeader) -> Result<()> {
        self.refcounts = RefcountManager::load(raw, h)?;
        Ok(())
    }
}

/// The allocator a bitmap update uses at close.
struct CloseAllocator<'a> {
    raw: &'a QcowRawFile,
    header: &'a mut QcowHeader,
    refcounts: &'a mut RefcountManager,
    data: Option<&'a QcowRawFile>,
}

impl ClusterAllocator for CloseAllocator<'_> {
    fn alloc_cluster(&mut self) -> Result<u64> {
        Ok(self.refcounts.alloc(self.raw, self.header, 1)? << self.header.cluster_bits)
    }
    fn make_durable(&mut self) -> Result<()> {
        durable(self.raw, self.refcounts, self.data)
    }
}

/// Refblocks and reftable on disk and synced, together with the guest data written so far.
fn durable(raw: &QcowRawFile, refcounts: &mut RefcountManager, data: Option<&QcowRawFile>) -> Result<()> {
    if refcounts.is_dirty() {
        refcounts.write_dirty_blocks(raw)?;
    }
    raw.sync()?;
    if let Some(d) = data {
        d.sync()?;
    }
    Ok(())
}

impl QcowFile {
    /// The enabled bitmaps this handle keeps up to date (flagged in use by it), if any.
    pub(super) fn bitmap_tracker(&self) -> Option<&BitmapTracker> {
        self.writer.as_ref().and_then(|w| w.bitmaps.as_ref())
    }

    fn writer(&mut self) -> Result<&mut Writer> {
        self.writer
            .as_mut()
            .ok_or_else(|| Error::RefcountRebuildRequired("the image is not prepared for writing".into()))
    }

    /// Prepares the first write: the refcounts must be trustworthy, since the allocator hands
    /// out clusters whose refcount is 0.
    fn prepare_write(&mut self) -> Result<()> {
        if !self.raw.writable() {
            return Err(Error::ReadOnlyImage(format!("'{}' is opened read-only", self.path.display())));
        }
        if self.refcounts_stale {
            return Err(Error::RefcountRebuildRequired(
                "the refcounts are stale (dirty bit set, or cluster 0 has refcount 0): open with rebuild=True or call rebuild_refcounts()".into(),
            ));
        }
        if self.writer.is_some() {
            return Ok(());
        }
        let report = check::check_image(&self.raw, &mut self.header, Repair::None, false)?;
        if report.counts.corruptions > 0 || report.counts.check_errors > 0 {
            return Err(Error::RefcountRebuildRequired(format!(
                "the image has {} corruption(s) and {} check error(s) (refcounts or OFLAG_COPIED disagree with the tables); repair it (check(repair=\"all\")) before writing",
                report.counts.corruptions, report.counts.check_errors
            )));
        }
        let refcounts = RefcountManager::load(&self.raw, &self.header)?;
        let mut set_dirty_bit = false;
        if self.header.lazy_refcounts() && !self.header.is_dirty() {
            self.header.commit_incompatible_features(&self.raw, self.header.incompatible_features | INCOMPAT_DIRTY)?;
            set_dirty_bit = true;
        }
        // Enabled persistent bitmaps: flagged in_use now, updated and unflagged on close; if
        // that cannot be done safely, the bitmaps extension is marked inconsistent instead.
        let (bitmaps, keep_bitmaps) = match BitmapTracker::start(&self.raw, &self.header)? {
            BitmapStart::Nothing => (None, true),
            BitmapStart::Track(t) => (Some(t), true),
            BitmapStart::Unsafe => (None, false),
        };
        // A writer must clear autoclear bits it does not maintain (bit 1, raw external data,
        // is kept: qcowrs writes data at its guest offset).
        let keep = AUTOCLEAR_DATA_FILE_RAW | if keep_bitmaps { AUTOCLEAR_BITMAPS } else { 0 };
        self.header.commit_autoclear_features(&self.raw, self.header.autoclear_features & keep)?;
        self.writer = Some(Writer { refcounts, set_dirty_bit, bitmaps });
        Ok(())
    }

    /// Allocates one cluster; returns its host offset.
    fn alloc_cluster(&mut self) -> Result<u64> {
        let w = self
            .writer
            .as_mut()
            .ok_or_else(|| Error::RefcountRebuildRequired("the image is not prepared for writing".into()))?;
        Ok(w.refcounts.alloc(&self.raw, &mut self.header, 1)? << self.header.cluster_bits)
    }

    /// Defers dropping the references a replaced L2 entry held.
    fn free_entry_clusters(&mut self, e: L2Entry) -> Result<()> {
        if let Some((first, last)) = self.tables.geometry().referenced_clusters(e) {
            let w = self.writer()?;
            for c in first..=last {
                w.refcounts.free_later(c);
            }
        }
        Ok(())
    }

    /// Refblocks and reftable on disk and synced (together with the guest data written so far).
    fn write_refcounts_durably(&mut self) -> Result<()> {
        let Some(w) = self.writer.as_mut() else { return self.raw.sync() };
        durable(&self.raw, &mut w.refcounts, self.data.as_ref())
    }

    /// The L2 table for `l1_index`, made private to the active image (allocated, or copied if
    /// shared with a snapshot). Returns its host offset.
    fn l2_for_write(&mut self, l1_index: u64) -> Result<u64> {
        match self.tables.l2_for_write(&self.raw, l1_index)? {
            L2ForWrite::Ready(offset) => Ok(offset),
            L2ForWrite::New { table, shared } => {
                let new = self.alloc_cluster()?;
                if let Some((k, t)) = self.tables.install_l2(l1_index, new, table) {
                    // An evicted dirty table goes to disk after the refcounts it depends on.
                    self.write_refcounts_durably()?;
                    self.raw.write_u64_table(k, &t, "L2 table")?;
                }
                if let Some(old) = shared {
                    let cb = self.header.cluster_bits;
                    self.writer()?.refcounts.free_later(old >> cb);
                }
                Ok(new)
            }
        }
    }

    fn set_entry(&mut self, cluster_index: u64, e: L2Entry) -> Result<()> {
        let l1_index = cluster_index / self.tables.geometry().entries_per_table();
        let table = self.l2_for_write(l1_index)?;
        self.tables.set_entry(cluster_index, table, e)
    }

    fn check_guest_range(&self, offset: u64, len: u64, what: &str) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.virtual_size() => Ok(()),
            _ => Err(Error::offset(
                "guest offset",
                offset,
                format!(
                    "{what} of 0x{len:x} bytes extends past the virtual size 0x{:x}; grow the disk with truncate()",
                    self.virtual_size()
                ),
            )),
        }
    }

    /// Work common to every change of guest data: the range is checked, the handle prepared,
    /// stale decompressed clusters dropped and the range noted for the persistent bitmaps.
    fn begin_change(&mut self, offset: u64, len: u64, what: &str) -> Result<()> {
        self.check_guest_range(offset, len, what)?;
        self.prepare_write()?;
        self.decompressed.get_mut().unwrap_or_else(PoisonError::into_inner).clear();
        if let Some(b) = self.writer()?.bitmaps.as_mut() {
            b.note(offset, len);
        }
        Ok(())
    }

    /// Writes guest data at `offset` (copy-on-write where clusters are shared, compressed,
    /// zero or backed). Metadata is cached and reaches the disk on `flush()`.
    pub fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        if buf.is_empty() {
            return self.check_guest_range(offset, 0, "write");
        }
        self.begin_change(offset, buf.len() as u64, "write")?;
        let cs = self.cluster_size();
        let ept = self.tables.geometry().entries_per_table();
        // Whole clusters whose host clusters turn out contiguous are written with one pwrite
        // (a run never spans two L2 tables, and is written before another table is touched,
        // so no L2 table can reach the disk pointing at data not yet written).
        let mut run: Option<Run> = None;
        let mut done = 0usize;
        while done < buf.len() {
            let off = offset + done as u64;
            let in_cluster = usize::try_from(off & (cs - 1)).unwrap_or(0);
            let n = (usize::try_from(cs).unwrap_or(0) - in_cluster).min(buf.len() - done);
            let ci = off >> self.header.cluster_bits;
            if in_cluster == 0 && n as u64 == cs {
                if run.is_some_and(|r| r.table != ci / ept) {
                    self.write_run(run.take(), buf)?;
                }
                if let Some(host) = self.place_whole_cluster(ci)? {
                    run = match run {
                        Some(r) if r.host + r.len as u64 == host && r.at + r.len == done => {
                            Some(Run { len: r.len + n, ..r })
                        }
                        r => {
                            self.write_run(r, buf)?;
                            Some(Run { host, at: done, len: n, table: ci / ept })
                        }
                    };
                    done += n;
                    continue;
                }
            }
            self.write_run(run.take(), buf)?;
            self.write_cluster(off, &buf[done..done + n])?;
            done += n;
        }
        self.write_run(run, buf)
    }

    fn write_run(&self, run: Option<Run>, buf: &[u8]) -> Result<()> {
        match run {
            Some(r) => self.write_host(&buf[r.at..r.at + r.len], r.host),
            None => Ok(()),
        }
    }

    /// For a write of the whole guest cluster `ci`: where its data goes (the entry already
    /// updated in the cached L2 table, the data not yet written), or `None` when the cluster
    /// needs the general path (subclusters).
    fn place_whole_cluster(&mut self, ci: u64) -> Result<Option<u64>> {
        let cs = self.cluster_size();
        match self.tables.write_plan(&self.raw, ci, 0, cs)? {
            WritePlan::InPlace { host } => Ok(Some(host)),
            WritePlan::Subclusters { .. } => Ok(None),
            WritePlan::Rewrite { target, old } => {
                self.l2_for_write(ci / self.tables.geometry().entries_per_table())?;
                let host = self.target_host(target)?;
                let e = self.tables.data_entry(host);
                self.set_entry(ci, e)?;
                if target == Target::Allocate {
                    self.free_entry_clusters(old)?;
                }
                Ok(Some(host))
            }
        }
    }
}

/// Whole clusters of a write placed at contiguous host offsets, written together.
#[derive(Clone, Copy, Debug)]
struct Run {
    host: u64,
    /// Offset in the caller's buffer.
    at: usize,
    len: usize,
    /// The L2 table the clusters are in.
    table: u64,
}

impl QcowFile {
    /// Writes `data` (within one cluster) at guest offset `off`.
    fn write_cluster(&mut self, off: u64, data: &[u8]) -> Result<()> {
        let cs = self.cluster_size();
        let ci = off >> self.header.cluster_bits;
        let cluster_start = ci << self.header.cluster_bits;
        let in_cluster = off - cluster_start;
        let plan = self.tables.write_plan(&self.raw, ci, in_cluster, data.len() as u64)?;
        if !matches!(plan, WritePlan::InPlace { .. }) {
            // The L2 table first (as QEMU), so that consecutive data clusters stay contiguous.
            self.l2_for_write(ci / self.tables.geometry().entries_per_table())?;
        }
        match plan {
            WritePlan::InPlace { host } => self.write_host(data, host),
            WritePlan::Subclusters { target, first, last, old } => {
                let sc_bits = self.tables.geometry().subcluster_bits();
                let (start, end) = (u64::from(first) << sc_bits, u64::from(last + 1) << sc_bits);
                let buf = self.cluster_image(cluster_start + start, end - start, in_cluster - start, data)?;
                let host = self.target_host(target)?;
                self.write_host(&buf, host + start)?;
                let e = self.tables.subcluster_entry(host, old, first, last);
                self.set_entry(ci, e)
            }
            WritePlan::Rewrite { target, old } => {
                let full = self.cluster_image(cluster_start, cs, in_cluster, data)?;
                let host = self.target_host(target)?;
                self.write_host(&full, host)?;
                let e = self.tables.data_entry(host);
                self.set_entry(ci, e)?;
                if target == Target::Allocate {
                    self.free_entry_clusters(old)?;
                }
                Ok(())
            }
        }
    }

    /// Writes one whole guest cluster compressed (QEMU's compressed write, what `qemu-img
    /// convert -c` does): `offset` is cluster-aligned and `data` a whole cluster, or the rest of
    /// the disk for its last cluster (padded with zeros). The compressed bytes are packed into
    /// shared host clusters; a cluster that does not compress is written normally. Returns
    /// whether it was stored compressed. Not possible with an external data file.
    pub fn write_compressed(&mut self, offset: u64, data: &[u8]) -> Result<bool> {
        let cs = self.cluster_size();
        let len = data.len() as u64;
        let aligned = offset & (cs - 1) == 0;
        let whole = len == cs || (len > 0 && len < cs && offset.checked_add(len) == Some(self.virtual_size()));
        if !aligned || !whole {
            return Err(Error::offset(
                "guest offset",
                offset,
                format!("a compressed write must cover one whole cluster (0x{cs:x} bytes at a multiple of it), not 0x{len:x} bytes"),
            ));
        }
        if self.data.is_some() {
            return Err(Error::UnsupportedFeature(
                "compressed clusters cannot be written to an image with an external data file".into(),
            ));
        }
        let packed = crate::compression::compress_cluster(self.header.compression_type, cs, data);
        self.store_compressed(offset, data, packed.as_deref())
    }

    /// The second half of [`QcowFile::write_compressed`]: stores `packed` (from
    /// [`crate::compression::compress_cluster`] on `data`) for the cluster at `offset`, or `data`
    /// uncompressed when `packed` is `None`. The caller checked the alignment.
    pub(crate) fn store_compressed(&mut self, offset: u64, data: &[u8], packed: Option<&[u8]>) -> Result<bool> {
        let len = data.len() as u64;
        let Some(packed) = packed else {
            self.write_at(data, offset)?;
            return Ok(false);
        };
        self.begin_change(offset, len, "compressed write")?;
        let ci = offset >> self.header.cluster_bits;
        let (old, _) = self.tables.entry(&self.raw, ci)?;
        self.l2_for_write(ci / self.tables.geometry().entries_per_table())?;
        let host = {
            let w = self.writer.as_mut().ok_or_else(|| Error::RefcountRebuildRequired("not prepared".into()))?;
            w.refcounts.alloc_bytes(&self.raw, &mut self.header, packed.len() as u64)?
        };
        self.raw.write_at(packed, host, "compressed guest data")?;
        let e = self.tables.geometry().make_compressed(host, packed.len() as u64);
        self.set_entry(ci, e)?;
        self.free_entry_clusters(old)?;
        Ok(true)
    }

    /// `len` bytes of the guest at `start` as they read now, with `data` over them at `at`.
    /// (A write of the whole range is `data` itself: no copy.)
    fn cluster_image<'d>(&self, start: u64, len: u64, at: u64, data: &'d [u8]) -> Result<std::borrow::Cow<'d, [u8]>> {
        if at == 0 && data.len() as u64 == len {
            return Ok(std::borrow::Cow::Borrowed(data));
        }
        let mut buf = vec![0u8; usize::try_from(len).unwrap_or(0)];
        if data.len() as u64 != len {
            let n = self.read_at(&mut buf, start)?;
            buf[n..].fill(0);
        }
        let s = usize::try_from(at).unwrap_or(0);
        buf[s..s + data.len()].copy_from_slice(data);
        Ok(std::borrow::Cow::Owned(buf))
    }

    fn target_host(&mut self, target: Target) -> Result<u64> {
        match target {
            Target::Reuse(h) | Target::DataFile(h) => Ok(h),
            Target::Allocate => self.alloc_cluster(),
        }
    }

    fn write_host(&self, data: &[u8], host: u64) -> Result<()> {
        match &self.data {
            Some(d) => d.write_data_at(data, host, "the external data file"),
            None => self.raw.write_data_at(data, host, "guest data"),
        }
    }

    /// Guest data written from now on starts its write-back to the disk at once (bulk copies:
    /// the device writes overlap the copy instead of all waiting for the next flush). Metadata
    /// is unaffected and the flush ordering is the same. Returns whether the host file does.
    pub fn set_write_behind(&self) -> bool {
        let image = self.raw.set_write_behind();
        match &self.data {
            Some(d) => d.set_write_behind(),
            None => image,
        }
    }

    /// Makes whole clusters read as zeros (the zero flag on v3; no data written) and writes
    /// zeros into partial ones.
    pub fn write_zeroes(&mut self, offset: u64, length: u64) -> Result<()> {
        self.zero_range(offset, length, false)
    }

    /// Frees the whole clusters of the range (on v3 they then read as zeros; on v2 they read
    /// from the backing file, or as zeros without one); partial clusters are left unchanged.
    /// Freed clusters are punched out of the host file on `flush()`.
    pub fn discard(&mut self, offset: u64, length: u64) -> Result<()> {
        self.zero_range(offset, length, true)
    }

    fn zero_range(&mut self, offset: u64, length: u64, discard: bool) -> Result<()> {
        let what = if discard { "discard" } else { "write_zeroes" };
        if length == 0 {
            return self.check_guest_range(offset, 0, what);
        }
        self.begin_change(offset, length, what)?;
        let cs = self.cluster_size();
        let geo = self.tables.geometry();
        let end = offset + length;
        let mut off = offset;
        while off < end {
            let cluster_start = off & !(cs - 1);
            let n = (cluster_start + cs).min(end) - off;
            let whole = off == cluster_start && (n == cs || off + n == self.virtual_size());
            if whole && !geo.data_file && (self.header.version >= 3 || self.backing.is_none() || discard) {
                let ci = off >> self.header.cluster_bits;
                let (new, old) = self.tables.zero_plan(&self.raw, ci, self.header.version, self.backing.is_some())?;
                if let Some(new) = new {
                    self.set_entry(ci, new)?;
                    self.free_entry_clusters(old)?;
                }
            } else if !discard && geo.extended {
                self.zero_subclusters(off, n)?;
            } else if !discard {
                self.write_cluster(off, &vec![0u8; usize::try_from(n).unwrap_or(0)])?;
            }
            off += n;
        }
        Ok(())
    }

    /// Zeroes `[off, off+n)` inside one cluster of an extended-L2 image: whole subclusters get
    /// their zero bit, partial ones are written.
    fn zero_subclusters(&mut self, off: u64, n: u64) -> Result<()> {
        let geo = self.tables.geometry();
        let cb = geo.cluster_bits;
        let sc_bits = geo.subcluster_bits();
        let sc_size = 1u64 << sc_bits;
        let ci = off >> cb;
        let in_cluster = off - (ci << cb);
        let end = in_cluster + n;
        let mut first_full = in_cluster.div_ceil(sc_size);
        let mut end_full = end >> sc_bits;
        // A partial edge subcluster that already reads as zeros is zeroed whole (as QEMU).
        let (e0, _) = self.tables.entry(&self.raw, ci)?;
        let no_backing = self.backing.is_none();
        let reads_zero = |sc: u64| -> bool {
            // sc < 32.
            #[allow(clippy::cast_possible_truncation)]
            let s = geo.subcluster_state(e0, sc as u32);
            geo.cluster_type(e0) != ClusterType::Compressed
                && (s == SubclusterState::Zero || (s == SubclusterState::Unallocated && no_backing))
        };
        if in_cluster % sc_size != 0 && reads_zero(in_cluster >> sc_bits) {
            first_full = in_cluster >> sc_bits;
        }
        if end % sc_size != 0 && reads_zero(end >> sc_bits) {
            end_full = (end >> sc_bits) + 1;
        }
        let zeros = |len: u64| vec![0u8; usize::try_from(len).unwrap_or(0)];
        if first_full >= end_full {
            return self.write_cluster(off, &zeros(n));
        }
        let head = (first_full << sc_bits).saturating_sub(in_cluster);
        let tail = end.saturating_sub(end_full << sc_bits);
        if head > 0 {
            self.write_cluster(off, &zeros(head))?;
        }
        if tail > 0 {
            self.write_cluster(off + n - tail, &zeros(tail))?;
        }
        let (e, l1e) = self.tables.entry(&self.raw, ci)?;
        let ty = geo.cluster_type(e);
        let private = e.is_copied() && crate::format::l1_entry_is_copied(l1e);
        if !(ty == ClusterType::Unallocated || (ty == ClusterType::Normal && private)) {
            let (b0, b1) = ((first_full << sc_bits).max(in_cluster), (end_full << sc_bits).min(end));
            return self.write_cluster((ci << cb) + b0, &zeros(b1 - b0));
        }
        let mask = ((1u64 << (end_full - first_full)) - 1) << first_full;
        self.set_entry(ci, L2Entry { entry: e.entry, bitmap: (e.bitmap & !mask) | (mask << 32) })
    }

    /// Changes the virtual size. Growing: the L1 table is reallocated if it must grow; the
    /// header switches to it in one write. Shrinking drops guest data past the new end, so it
    /// happens only through [`QcowFile::shrink`].
    pub fn truncate(&mut self, new_size: u64) -> Result<()> {
        let old_size = self.virtual_size();
        if new_size < old_size {
            return Err(Error::UnsupportedFeature(format!(
                "shrinking the virtual size from {old_size} to {new_size} bytes would drop guest data; use shrink() (qemu-img resize --shrink)"
            )));
        }
        if new_size == old_size {
            return Ok(());
        }
        self.refuse_resize_with_bitmaps()?;
        self.prepare_write()?;
        // References past the old end (a shrink cut short by a crash leaves them: its header
        // goes first) would show dropped data again: removed before the area is exposed.
        self.decompressed.get_mut().unwrap_or_else(PoisonError::into_inner).clear();
        self.drop_references_past(old_size)?;
        let mut grown = self.header.clone();
        grown.size = new_size;
        let needed = grown.l1_entries_needed();
        if needed > u64::from(self.header.l1_size) {
            self.grow_l1(needed, new_size)?;
        }
        // The new area reads as zeros even where a longer backing file has data (as QEMU).
        // Those zero entries are made durable before the header exposes the area.
        self.header.size = new_size;
        let backing_end = self.backing.as_ref().map_or(0, |b| b.size()).min(new_size);
        if backing_end > old_size {
            self.write_zeroes(old_size, backing_end - old_size)?;
        }
        self.flush()?;
        self.header.commit_size(&self.raw, new_size)
    }

    fn refuse_resize_with_bitmaps(&self) -> Result<()> {
        if self.header.autoclear_features & AUTOCLEAR_BITMAPS != 0 && self.header.bitmaps().is_some() {
            return Err(Error::UnsupportedFeature(
                "the image has persistent bitmaps, which cannot follow a resize (QEMU refuses too)".into(),
            ));
        }
        Ok(())
    }

    /// Shrinks the virtual size to `new_size` (`qemu-img resize --shrink`): the guest data past
    /// the new end is dropped. Crash-safe in this order: the header's size first (synced: from
    /// then on the guest sees the new size and what lies past it is unreachable), then the
    /// active tree's references past the end are removed (the partial last L2 table's entries
    /// cleared, wholly dropped tables unlinked from the L1 table) and written before the
    /// refcounts of what they pointed at drop (`flush` ordering), so a crash leaves at worst
    /// leaks. Internal snapshots keep their own size and clusters.
    pub fn shrink(&mut self, new_size: u64) -> Result<()> {
        let old_size = self.virtual_size();
        if new_size >= old_size {
            return self.truncate(new_size);
        }
        self.refuse_resize_with_bitmaps()?;
        self.prepare_write()?;
        self.flush()?;
        self.header.commit_size(&self.raw, new_size)?;
        self.decompressed.get_mut().unwrap_or_else(PoisonError::into_inner).clear();
        self.drop_references_past(new_size)?;
        self.flush_cutting_tail(true)
    }

    /// Removes the active tree's references to the clusters wholly past `size`: the partial
    /// last table's entries past it cleared, the tables after it unlinked. The frees follow on
    /// the next flush, after the tables are written.
    fn drop_references_past(&mut self, size: u64) -> Result<()> {
        let cs = self.cluster_size();
        let ept = self.tables.geometry().entries_per_table();
        let first = size.div_ceil(cs);
        let keep = first.div_ceil(ept);
        // The partial last table: its entries past the end cleared.
        if first % ept != 0 {
            if let Some((_, t)) = self.tables.l2_table(&self.raw, keep - 1)? {
                let geo = self.tables.geometry();
                let start = usize::try_from(first % ept).unwrap_or(0);
                let doomed: Vec<(u64, L2Entry)> = (start..usize::try_from(ept).unwrap_or(0))
                    .map(|i| ((keep - 1) * ept + i as u64, geo.entry_at(&t, i)))
                    .filter(|(_, e)| !e.is_empty())
                    .collect();
                for (ci, e) in doomed {
                    self.set_entry(ci, L2Entry::default())?;
                    self.free_entry_clusters(e)?;
                }
            }
        }
        self.drop_tables_from(keep)
    }

    /// Unlinks the L2 tables of L1 entries `keep..` from the active tree: a private table's
    /// clusters are freed with it, a shared one (a snapshot's too) only loses the active
    /// tree's reference. Frees happen on the next flush, after the L1 entries are written.
    fn drop_tables_from(&mut self, keep: u64) -> Result<()> {
        let cb = self.header.cluster_bits;
        let ept = self.tables.geometry().entries_per_table();
        for i in usize::try_from(keep).unwrap_or(usize::MAX)..self.tables.l1().len() {
            let l1e = self.tables.l1()[i];
            if l1_entry_l2_offset(l1e) == 0 {
                continue;
            }
            if l1_entry_is_copied(l1e) {
                if let Some((_, t)) = self.tables.l2_table(&self.raw, i as u64)? {
                    let geo = self.tables.geometry();
                    for k in 0..usize::try_from(ept).unwrap_or(0) {
                        self.free_entry_clusters(geo.entry_at(&t, k))?;
                    }
                }
            }
            let offset = self.tables.drop_l2(i);
            self.writer()?.refcounts.free_later(offset >> cb);
        }
        Ok(())
    }

    /// Empties the image (`qemu-img commit`'s last step, QEMU's `bdrv_make_empty`): every
    /// cluster unallocated again, so the image reads through to its backing file (or as
    /// zeros); the clusters are freed. The L1 entries are written before any refcount drops.
    pub fn make_empty(&mut self) -> Result<()> {
        self.prepare_write()?;
        self.decompressed.get_mut().unwrap_or_else(PoisonError::into_inner).clear();
        let size = self.header.size;
        if let Some(b) = self.writer()?.bitmaps.as_mut() {
            b.note(0, size);
        }
        self.drop_tables_from(0)?;
        self.flush_cutting_tail(true)
    }

    /// Moves the L1 table to a new place with room for `entries`, switching the header to it
    /// in one write once it is durable.
    fn grow_l1(&mut self, entries: u64, new_size: u64) -> Result<()> {
        let entries = u32::try_from(entries)
            .ok()
            .filter(|&n| u64::from(n) * 8 <= MAX_L1_BYTES)
            .ok_or_else(|| Error::UnsupportedFeature(format!("size {new_size} needs an L1 table above 32 MiB")))?;
        self.flush()?;
        let cs = self.cluster_size();
        let cb = self.header.cluster_bits;
        let clusters = (u64::from(entries) * 8).div_ceil(cs);
        let first = {
            let w = self.writer.as_mut().ok_or_else(|| Error::RefcountRebuildRequired("not prepared".into()))?;
            w.refcounts.alloc(&self.raw, &mut self.header, clusters)?
        };
        let mut l1 = self.tables.l1().to_vec();
        l1.resize(entries as usize, 0);
        let mut padded = l1.clone();
        padded.resize(usize::try_from(clusters * cs / 8).unwrap_or(0), 0);
        self.write_refcounts_durably()?;
        self.raw.write_u64_table(first << cb, &padded, "new L1 table")?;
        self.raw.sync()?;
        let old = (self.header.l1_table_offset >> cb, (u64::from(self.header.l1_size) * 8).div_ceil(cs));
        self.header.commit_l1_table(&self.raw, entries, first << cb)?;
        self.tables.replace_l1(first << cb, l1);
        let w = self.writer()?;
        for k in 0..old.1 {
            w.refcounts.free_later(old.0 + k);
        }
        Ok(())
    }

    /// Makes everything written so far durable, in an order that leaves only leaks after a
    /// crash at any point: guest data and refcounts (synced) before L2 tables (synced) before
    /// L1 entries (synced); references dropped before the refcounts of what they pointed at.
    pub fn flush(&mut self) -> Result<()> {
        self.flush_cutting_tail(false)
    }

    /// [`QcowFile::flush`]; with `cut_tail` (shrink and make-empty, where QEMU shortens the
    /// file too) freed clusters that reach the end of the file are cut off rather than punched.
    fn flush_cutting_tail(&mut self, cut_tail: bool) -> Result<()> {
        if !self.raw.writable() || self.writer.is_none() {
            return Ok(());
        }
        self.write_refcounts_durably()?;
        let dirty = self.tables.take_dirty_tables();
        if !dirty.is_empty() {
            for (offset, t) in &dirty {
                self.raw.write_u64_table(*offset, t, "L2 table")?;
            }
            self.raw.sync()?;
        }
        let l1 = self.tables.take_dirty_l1();
        if !l1.is_empty() {
            self.write_l1_entries(&l1)?;
            self.raw.sync()?;
        }
        let Some(w) = self.writer.as_mut() else { return Ok(()) };
        if w.refcounts.has_pending_frees() {
            let freed = w.refcounts.apply_frees(&self.raw, &mut self.header)?;
            durable(&self.raw, &mut w.refcounts, self.data.as_ref())?;
            self.give_back(freed, cut_tail)?;
        }
        Ok(())
    }

    /// Writes changed L1 entries, each run of consecutive ones in one write (the entries are
    /// independent: a torn write leaves each one old or new, as separate writes would).
    fn write_l1_entries(&self, l1: &[(usize, u64)]) -> Result<()> {
        let l1_offset = self.tables.l1_offset();
        let mut i = 0;
        while i < l1.len() {
            let mut j = i + 1;
            while j < l1.len() && l1[j].0 == l1[j - 1].0 + 1 {
                j += 1;
            }
            let bytes: Vec<u8> = l1[i..j].iter().flat_map(|(_, e)| e.to_be_bytes()).collect();
            self.raw.write_at(&bytes, l1_offset + 8 * l1[i].0 as u64, "L1 entry")?;
            i = j;
        }
        Ok(())
    }

    /// Gives freed clusters (refcount 0, durable) back to the host file system: contiguous
    /// clusters in one punch (clusters smaller than the file system's blocks are only given
    /// back that way); with `cut_tail`, a run that reaches the end of the file is cut off
    /// instead (the file no longer keeps the length, as after QEMU's shrink and make-empty).
    fn give_back(&self, mut freed: Vec<u64>, cut_tail: bool) -> Result<()> {
        let cb = self.header.cluster_bits;
        freed.sort_unstable();
        freed.dedup();
        let mut i = 0;
        while i < freed.len() {
            let mut j = i + 1;
            while j < freed.len() && freed[j] == freed[j - 1] + 1 {
                j += 1;
            }
            let (start, end) = (freed[i] << cb, (freed[j - 1] + 1) << cb);
            // `durable` above synced the file: the freed clusters' cached pages are clean.
            if cut_tail && end >= self.raw.file_len() && start < self.raw.file_len() {
                self.raw.drop_cached(start, self.raw.file_len() - start);
                self.raw.set_len(start)?;
            } else {
                self.raw.drop_cached(start, end - start);
                self.raw.punch_hole(start, end - start)?;
            }
            i = j;
        }
        Ok(())
    }

    /// Flushes and, if this handle set the dirty bit (lazy refcounts), clears it; updates the
    /// persistent bitmaps.
    pub fn close(&mut self) -> Result<()> {
        self.flush()?;
        let Some(mut w) = self.writer.take() else { return Ok(()) };
        if let Some(tracker) = w.bitmaps.take() {
            let mut alloc = CloseAllocator {
                raw: &self.raw,
                header: &mut self.header,
                refcounts: &mut w.refcounts,
                data: self.data.as_ref(),
            };
            tracker.finish(&self.raw, &mut alloc)?;
        }
        if w.set_dirty_bit {
            self.header.commit_incompatible_features(&self.raw, self.header.incompatible_features & !INCOMPAT_DIRTY)?;
        }
        Ok(())
    }
}
