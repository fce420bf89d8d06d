//! The one metadata walker. [`Walker::walk_all`] visits every structure of an image in QEMU's
//! `calculate_refcounts` order: the header, the active L1/L2 tree, each snapshot's tree, the
//! snapshot table, the refcount table, the encryption header, the bitmaps, and last the
//! refcount table's entries (the refblocks). [`Walker::walk_tree`] visits one L1/L2 tree.
//!
//! The walker reads; the [`Visitor`] judges. It reads every table once, in one positioned read,
//! and never more of it than the file holds, so a bogus size costs nothing. A table it cannot
//! read becomes an [`Event::Unreadable`]; the walk goes on. Check, rebuild, OFLAG_COPIED repair
//! and `allocated_ranges` are visitors of it.

use std::borrow::Cow;

use crate::bitmap::{read_bitmap_directory, BitmapEntry};
use crate::error::{Error, Result};
use crate::format::{l1_entry_l2_offset, L2Entry, L2Geometry, L2E_OFFSET_MASK};
use crate::header::QcowHeader;
use crate::raw_file::QcowRawFile;
use crate::snapshot::{read_snapshot_table, Snapshot, SnapshotTable};

/// Which L1/L2 tree an event belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Tree {
    /// The active image.
    Active,
    /// Snapshot number `n` of the snapshot table.
    Snapshot(usize),
}

impl Tree {
    pub(crate) fn is_active(self) -> bool {
        self == Tree::Active
    }
}

/// A structure the walker could not read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Structure {
    L1Table(Tree),
    L2Table(Tree),
    SnapshotTable,
    Reftable,
    BitmapDirectory,
    BitmapTable,
}

/// One step of a walk.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Event<'a> {
    /// Cluster 0: the header, its extensions and the backing file name.
    Header { cluster_size: u64 },
    /// An L1 table's bytes (visited before its entries, readable or not).
    L1Table { tree: Tree, offset: u64, entries: u32 },
    /// A non-zero L1 entry. `Flow::Skip` (or an L2 offset of 0) keeps the walker out of its
    /// L2 table.
    L1Entry { tree: Tree, index: u64, at: u64, entry: u64 },
    /// An L2 table about to be walked (`len` bytes of it are in the file).
    L2Table { offset: u64, len: u64 },
    /// A non-empty L2 entry; `index` is its place in the table.
    L2Entry { tree: Tree, index: usize, guest: u64, at: u64, entry: L2Entry },
    /// The end of an L2 table, with its words as read.
    L2TableEnd { l1_index: u64, offset: u64, table: &'a [u64] },
    /// The snapshot table was read.
    Snapshots { table: &'a SnapshotTable },
    /// One snapshot, before its tree. `Flow::Skip` keeps the walker out of its tree.
    Snapshot { index: usize, snapshot: &'a Snapshot },
    /// The snapshot table's bytes.
    SnapshotTable { offset: u64, size: u64 },
    /// The refcount table's bytes.
    Reftable { offset: u64, bytes: u64 },
    /// The full disk encryption header.
    CryptoHeader { offset: u64, len: u64 },
    /// The bitmap directory's bytes.
    BitmapDirectory { offset: u64, size: u64 },
    /// One bitmap's table.
    BitmapTable { bitmap: &'a BitmapEntry, offset: u64, bytes: u64 },
    /// One data cluster of a bitmap.
    BitmapData { bitmap: &'a BitmapEntry, index: usize, offset: u64 },
    /// The header names no refcount table (offset or size 0).
    NoReftable,
    /// One refcount table entry (zero entries included).
    ReftableEntry { index: u64, at: u64, entry: u64 },
    /// A structure that could not be read.
    Unreadable { what: Structure, offset: u64, error: &'a Error },
}

/// What the walker does after an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Flow {
    /// Go on, into the children of the event if it has any.
    Continue,
    /// Go on, but not into the children (an L2 table, a snapshot's tree).
    Skip,
}

/// Receives the events of a walk.
pub(crate) trait Visitor {
    /// Handles one event.
    fn visit(&mut self, event: Event<'_>) -> Result<Flow>;
}

/// A visitor that can be split, to walk part of a tree on another thread, and joined back.
/// Joining must leave the visitor as if it had seen the other's events after its own.
pub(crate) trait Fork: Visitor + Send + Sized {
    /// A fresh visitor for the same image, with nothing counted yet.
    fn fork(&self) -> Result<Self>;
    /// Takes in what a fork saw.
    fn join(&mut self, other: Self) -> Result<()>;
}

/// The active tree is walked on two threads when it has at least this many L2 tables.
const FORK_MIN_TABLES: usize = 64;

/// Where the walker reads L1 and L2 tables (an open `QcowFile` supplies its cached, possibly
/// unflushed, tables).
pub(crate) trait TableSource {
    /// The words of the table at `offset` (at most `words` of them: fewer if the file ends).
    fn table(&self, offset: u64, words: u64) -> Result<Cow<'_, [u64]>>;
}

impl TableSource for QcowRawFile {
    fn table(&self, offset: u64, words: u64) -> Result<Cow<'_, [u64]>> {
        Ok(Cow::Owned(self.read_u64s_available(offset, words)?))
    }
}

/// Walks the structures of one image.
pub(crate) struct Walker<'a> {
    raw: &'a QcowRawFile,
    h: &'a QcowHeader,
    geo: L2Geometry,
    source: &'a (dyn TableSource + Sync),
}

impl<'a> Walker<'a> {
    /// A walker reading tables from the file itself.
    pub(crate) fn new(raw: &'a QcowRawFile, h: &'a QcowHeader) -> Self {
        Self::with_source(raw, h, raw)
    }

    /// A walker reading L1/L2 tables from `source`.
    pub(crate) fn with_source(raw: &'a QcowRawFile, h: &'a QcowHeader, source: &'a (dyn TableSource + Sync)) -> Self {
        let geo = L2Geometry::new(h.cluster_bits, h.extended_l2(), h.has_data_file());
        Walker { raw, h, geo, source }
    }

    /// The L2 geometry of the image.
    pub(crate) fn geometry(&self) -> L2Geometry {
        self.geo
    }

    /// Visits everything (QEMU's `calculate_refcounts` order). Returns the snapshot table.
    #[cfg(test)]
    pub(crate) fn walk_all<V: Visitor + ?Sized>(&self, v: &mut V) -> Result<SnapshotTable> {
        self.walk_all_with(v, |w, v| w.walk_tree(Tree::Active, w.h.l1_table_offset, w.h.l1_size, v))
    }

    /// [`Walker::walk_all`], with the active tree's L2 tables split between two threads when
    /// there are many (the events of each half arrive in order; the halves are then joined).
    pub(crate) fn walk_all_forked<V: Fork>(&self, v: &mut V) -> Result<SnapshotTable> {
        self.walk_all_with(v, |w, v| w.walk_active_forked(v))
    }

    fn walk_all_with<V: Visitor + ?Sized>(
        &self,
        v: &mut V,
        active: impl FnOnce(&Self, &mut V) -> Result<()>,
    ) -> Result<SnapshotTable> {
        let h = self.h;
        let cs = h.cluster_size();
        v.visit(Event::Header { cluster_size: cs })?;
        active(self, v)?;

        let snapshots = match read_snapshot_table(self.raw, h) {
            Ok(t) => t,
            Err(error) => {
                let what = Structure::SnapshotTable;
                v.visit(Event::Unreadable { what, offset: h.snapshots_offset, error: &error })?;
                SnapshotTable::default()
            }
        };
        v.visit(Event::Snapshots { table: &snapshots })?;
        for (index, sn) in snapshots.snapshots.iter().enumerate() {
            if v.visit(Event::Snapshot { index, snapshot: sn })? == Flow::Continue {
                self.walk_tree(Tree::Snapshot(index), sn.l1_table_offset, sn.l1_size, v)?;
            }
        }
        v.visit(Event::SnapshotTable { offset: h.snapshots_offset, size: snapshots.size })?;

        if h.refcount_table_offset != 0 {
            let bytes = u64::from(h.refcount_table_clusters) * cs;
            v.visit(Event::Reftable { offset: h.refcount_table_offset, bytes })?;
        }
        if let Some((offset, len)) = h.crypto_header() {
            v.visit(Event::CryptoHeader { offset, len })?;
        }
        // Bitmaps count only when the extension is marked consistent (as QEMU).
        if h.autoclear_features & crate::format::AUTOCLEAR_BITMAPS != 0 {
            self.walk_bitmaps(v)?;
        }
        self.walk_reftable(v)?;
        Ok(snapshots)
    }

    /// Visits one L1/L2 tree: the L1 table, its non-zero entries and the L2 tables they name.
    pub(crate) fn walk_tree<V: Visitor + ?Sized>(
        &self,
        tree: Tree,
        l1_offset: u64,
        l1_size: u32,
        v: &mut V,
    ) -> Result<()> {
        let Some(l1) = self.read_l1(tree, l1_offset, l1_size, v)? else { return Ok(()) };
        self.walk_l1_entries(tree, l1_offset, &l1, 0..l1.len(), v)
    }

    fn read_l1<V: Visitor + ?Sized>(
        &self,
        tree: Tree,
        l1_offset: u64,
        l1_size: u32,
        v: &mut V,
    ) -> Result<Option<Cow<'_, [u64]>>> {
        if v.visit(Event::L1Table { tree, offset: l1_offset, entries: l1_size })? == Flow::Skip {
            return Ok(None);
        }
        match self.source.table(l1_offset, u64::from(l1_size)) {
            Ok(t) => Ok(Some(t)),
            Err(error) => {
                v.visit(Event::Unreadable { what: Structure::L1Table(tree), offset: l1_offset, error: &error })?;
                Ok(None)
            }
        }
    }

    /// The active tree, its second half of L2 tables on another thread when it is large.
    fn walk_active_forked<V: Fork>(&self, v: &mut V) -> Result<()> {
        let (tree, l1_offset) = (Tree::Active, self.h.l1_table_offset);
        let Some(l1) = self.read_l1(tree, l1_offset, self.h.l1_size, v)? else { return Ok(()) };
        let tables = l1.iter().filter(|&&e| e != 0).count();
        if tables < FORK_MIN_TABLES {
            return self.walk_l1_entries(tree, l1_offset, &l1, 0..l1.len(), v);
        }
        // Split where half of the tables lie on each side.
        let mut seen = 0;
        let mid = l1.iter().position(|&e| {
            seen += usize::from(e != 0);
            seen > tables / 2
        });
        let mid = mid.unwrap_or(l1.len());
        let mut other = v.fork()?;
        let (first, second) = std::thread::scope(|s| {
            let worker = s.spawn(|| self.walk_l1_entries(tree, l1_offset, &l1, mid..l1.len(), &mut other));
            let first = self.walk_l1_entries(tree, l1_offset, &l1, 0..mid, v);
            let second = worker.join().unwrap_or_else(|_| {
                Err(crate::error::Error::io(
                    "walking the active L1 table",
                    std::io::Error::other("a worker thread panicked"),
                ))
            });
            (first, second)
        });
        first?;
        second?;
        v.join(other)
    }

    fn walk_l1_entries<V: Visitor + ?Sized>(
        &self,
        tree: Tree,
        l1_offset: u64,
        l1: &[u64],
        range: std::ops::Range<usize>,
        v: &mut V,
    ) -> Result<()> {
        let l2_span = self.geo.bytes_per_table();
        for i in range {
            let entry = l1[i];
            if entry == 0 {
                continue;
            }
            let index = i as u64;
            let at = l1_offset + 8 * index;
            let flow = v.visit(Event::L1Entry { tree, index, at, entry })?;
            let l2 = l1_entry_l2_offset(entry);
            if flow == Flow::Skip || l2 == 0 {
                continue;
            }
            self.walk_l2(tree, index, l2, index.saturating_mul(l2_span), v)?;
        }
        Ok(())
    }

    fn walk_l2<V: Visitor + ?Sized>(
        &self,
        tree: Tree,
        l1_index: u64,
        offset: u64,
        guest_base: u64,
        v: &mut V,
    ) -> Result<()> {
        let cs = self.geo.cluster_size();
        let table = match self.source.table(offset, cs / 8) {
            Ok(t) => t,
            Err(error) => {
                return v.visit(Event::Unreadable { what: Structure::L2Table(tree), offset, error: &error }).map(|_| ())
            }
        };
        let len = table.len() as u64 * 8;
        if v.visit(Event::L2Table { offset, len })? == Flow::Skip {
            return Ok(());
        }
        let stride = self.geo.words_per_entry();
        let entry_bytes = 8 * stride as u64;
        for index in 0..table.len() / stride {
            let entry = self.geo.entry_at(&table, index);
            if entry.is_empty() {
                continue;
            }
            let guest = guest_base.saturating_add((index as u64) << self.geo.cluster_bits);
            let at = offset + index as u64 * entry_bytes;
            v.visit(Event::L2Entry { tree, index, guest, at, entry })?;
        }
        v.visit(Event::L2TableEnd { l1_index, offset, table: &table })?;
        Ok(())
    }

    fn walk_bitmaps<V: Visitor + ?Sized>(&self, v: &mut V) -> Result<()> {
        let Some(ext) = self.h.bitmaps() else { return Ok(()) };
        let dir_offset = ext.bitmap_directory_offset;
        v.visit(Event::BitmapDirectory { offset: dir_offset, size: ext.bitmap_directory_size })?;
        let dir = match read_bitmap_directory(self.raw, self.h) {
            Ok(d) => d,
            Err(error) => {
                return v
                    .visit(Event::Unreadable { what: Structure::BitmapDirectory, offset: dir_offset, error: &error })
                    .map(|_| ())
            }
        };
        for b in &dir {
            let bytes = u64::from(b.bitmap_table_size) * 8;
            v.visit(Event::BitmapTable { bitmap: b, offset: b.bitmap_table_offset, bytes })?;
            let table = match self.raw.read_u64s_available(b.bitmap_table_offset, u64::from(b.bitmap_table_size)) {
                Ok(t) => t,
                Err(error) => {
                    let what = Structure::BitmapTable;
                    v.visit(Event::Unreadable { what, offset: b.bitmap_table_offset, error: &error })?;
                    continue;
                }
            };
            for (index, &e) in table.iter().enumerate() {
                let offset = e & L2E_OFFSET_MASK;
                if offset != 0 {
                    v.visit(Event::BitmapData { bitmap: b, index, offset })?;
                }
            }
        }
        Ok(())
    }

    fn walk_reftable<V: Visitor + ?Sized>(&self, v: &mut V) -> Result<()> {
        let h = self.h;
        if h.refcount_table_offset == 0 || h.refcount_table_clusters == 0 {
            return v.visit(Event::NoReftable).map(|_| ());
        }
        let bytes = u64::from(h.refcount_table_clusters) * h.cluster_size();
        let table = match self.raw.read_u64s_available(h.refcount_table_offset, bytes / 8) {
            Ok(t) => t,
            Err(error) => {
                let what = Structure::Reftable;
                return v.visit(Event::Unreadable { what, offset: h.refcount_table_offset, error: &error }).map(|_| ());
            }
        };
        for (i, &entry) in table.iter().enumerate() {
            let index = i as u64;
            v.visit(Event::ReftableEntry { index, at: h.refcount_table_offset + 8 * index, entry })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::create::{create_on, CreateOptions};
    use crate::storage::MemStorage;
    use std::sync::Arc;

    /// Counts events by kind.
    #[derive(Default)]
    struct Tally {
        l1_entries: usize,
        l2_tables: usize,
        l2_entries: Vec<(u64, L2Entry)>,
        reftable_entries: usize,
        header: bool,
        skip_l2: bool,
    }

    impl Visitor for Tally {
        fn visit(&mut self, e: Event<'_>) -> Result<Flow> {
            match e {
                Event::Header { .. } => self.header = true,
                Event::L1Entry { .. } => {
                    self.l1_entries += 1;
                    if self.skip_l2 {
                        return Ok(Flow::Skip);
                    }
                }
                Event::L2Table { .. } => self.l2_tables += 1,
                Event::L2Entry { guest, entry, .. } => self.l2_entries.push((guest, entry)),
                Event::ReftableEntry { .. } => self.reftable_entries += 1,
                _ => {}
            }
            Ok(Flow::Continue)
        }
    }

    #[test]
    fn visits_every_allocated_entry_in_guest_order() {
        let mem = Arc::new(MemStorage::default());
        let opts = CreateOptions { virtual_size: 4 << 20, cluster_size: 512, ..CreateOptions::default() };
        let mut f = create_on(mem.clone(), &opts).unwrap();
        for off in [0u64, 70_000, 3 << 20] {
            f.write_at(&[7u8; 512], off).unwrap();
        }
        f.write_zeroes(0, 512).unwrap();
        f.close().unwrap();
        drop(f);
        let raw = QcowRawFile::new(mem.clone(), 512, 4, false).unwrap();
        let h = QcowHeader::read_from(&*mem).unwrap();
        let mut t = Tally::default();
        Walker::new(&raw, &h).walk_all(&mut t).unwrap();
        assert!(t.header);
        let guests: Vec<u64> = t.l2_entries.iter().map(|(g, _)| *g).collect();
        // 512-byte clusters: 64 entries of 512 bytes per L2 table.
        // 512 bytes at 70000 touch two clusters.
        assert_eq!(guests, vec![0, 69_632, 70_144, 3 << 20]);
        assert_eq!(t.l2_tables, 3);
        assert_eq!(t.l1_entries, 3);
        assert_eq!(t.reftable_entries as u64, u64::from(h.refcount_table_clusters) * 512 / 8);
        let geo = L2Geometry::new(9, false, false);
        assert_eq!(geo.cluster_type(t.l2_entries[0].1), crate::format::ClusterType::ZeroPlain);
        // Skipping an L1 entry keeps the walker out of its table.
        let mut s = Tally { skip_l2: true, ..Tally::default() };
        Walker::new(&raw, &h).walk_tree(Tree::Active, h.l1_table_offset, h.l1_size, &mut s).unwrap();
        assert_eq!((s.l1_entries, s.l2_tables, s.l2_entries.len()), (3, 0, 0));
    }

    #[test]
    fn an_l1_table_past_the_end_of_the_file_is_visited_as_far_as_it_exists() {
        let mem = Arc::new(MemStorage::new(vec![0u8; 1024]));
        let raw = QcowRawFile::new(mem, 512, 4, false).unwrap();
        let mut h = crate::header::tests::header_for_tests();
        h.cluster_bits = 9;
        h.l1_table_offset = 512;
        h.l1_size = 1 << 20;
        let mut t = Tally::default();
        Walker::new(&raw, &h).walk_tree(Tree::Active, h.l1_table_offset, h.l1_size, &mut t).unwrap();
        assert_eq!(t.l1_entries, 0);
    }
}
