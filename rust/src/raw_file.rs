//! `QcowRawFile`: positioned reads and writes of whole qcow2 tables (pointer tables and
//! refcount blocks) in single calls, over a [`Storage`]. It knows the cluster size and refcount
//! width, nothing of what the tables mean. Mirrors the seed's `QcowRawFile`; it is the one
//! place that reads and writes tables, and every image write passes through it (the
//! fault-injection hook lives here).

use std::fs::File;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use crate::error::{Error, IoContext, Result};
use crate::format::{be_u64, decode_refcounts, encode_refcounts, RefcountGeometry};
use crate::storage::{FileStorage, Storage};

/// Fault injection for crash tests: the number of write/sync/resize operations still allowed
/// (-1: unlimited). At 0 every further operation fails, as if the process had died there.
static FAULT_BUDGET: AtomicI64 = AtomicI64::new(-1);
/// Write/sync/resize operations done by this process.
static OPS_DONE: AtomicU64 = AtomicU64::new(0);

/// Test hook: after `n` more write/sync/resize operations (of any image), every further one
/// fails with EIO, as if the process had crashed there; `None` turns the hook off.
#[doc(hidden)]
pub fn fail_after_ops(n: Option<u64>) {
    FAULT_BUDGET.store(n.map_or(-1, |n| i64::try_from(n).unwrap_or(i64::MAX)), Ordering::SeqCst);
}

/// Test hook: write/sync/resize operations done so far by this process.
#[doc(hidden)]
pub fn io_ops() -> u64 {
    OPS_DONE.load(Ordering::SeqCst)
}

fn fault_point(what: &str, offset: u64) -> Result<()> {
    let left = FAULT_BUDGET.load(Ordering::SeqCst);
    if left == 0 {
        return Err(Error::io(
            format!("{what} at 0x{offset:x}: injected fault"),
            std::io::Error::from_raw_os_error(libc::EIO),
        ));
    }
    if left > 0 {
        FAULT_BUDGET.fetch_sub(1, Ordering::SeqCst);
    }
    OPS_DONE.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

/// A qcow2 host file with table-level I/O. Cheap to clone (the storage is shared); every
/// method takes `&self`.
#[derive(Debug)]
pub struct QcowRawFile {
    storage: Arc<dyn Storage>,
    cluster_bits: u32,
    refcount_order: u32,
    writable: bool,
    /// Length of the host file, kept up to date by our own writes.
    file_len: AtomicU64,
    /// `sync` does nothing (QEMU's `cache=unsafe`: a convert target nobody has seen yet).
    no_sync: bool,
}

impl Clone for QcowRawFile {
    fn clone(&self) -> Self {
        QcowRawFile {
            storage: Arc::clone(&self.storage),
            cluster_bits: self.cluster_bits,
            refcount_order: self.refcount_order,
            writable: self.writable,
            file_len: AtomicU64::new(self.file_len()),
            no_sync: self.no_sync,
        }
    }
}

impl QcowRawFile {
    /// Wraps an open file (the seed's constructor). `cluster_size` must be a power of two in
    /// 512..=2 MiB and `refcount_order` at most 6.
    pub fn from(file: File, cluster_size: u64, refcount_order: u32, writable: bool) -> Result<Self> {
        Self::new(Arc::new(FileStorage::new(file)), cluster_size, refcount_order, writable)
    }

    /// Wraps any storage.
    pub fn new(storage: Arc<dyn Storage>, cluster_size: u64, refcount_order: u32, writable: bool) -> Result<Self> {
        if !cluster_size.is_power_of_two() || !(512..=(2 << 20)).contains(&cluster_size) {
            return Err(Error::InvalidClusterSize(format!(
                "cluster size {cluster_size} is not a power of two in 512..2M"
            )));
        }
        if refcount_order > 6 {
            return Err(Error::corrupt(
                format!("refcount_order {refcount_order} above 6"),
                crate::header::field_offset::REFCOUNT_ORDER,
            ));
        }
        let file_len = storage.len().ctx(|| "reading the image file's length".into())?;
        Ok(QcowRawFile {
            storage,
            cluster_bits: cluster_size.trailing_zeros(),
            refcount_order,
            writable,
            file_len: AtomicU64::new(file_len),
            no_sync: false,
        })
    }

    /// Bytes per cluster.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    /// log2 of the cluster size.
    pub fn cluster_bits(&self) -> u32 {
        self.cluster_bits
    }
    /// log2 of the refcount width.
    pub fn refcount_order(&self) -> u32 {
        self.refcount_order
    }
    /// Refcount geometry.
    pub fn refcount_geometry(&self) -> RefcountGeometry {
        RefcountGeometry { cluster_bits: self.cluster_bits, refcount_order: self.refcount_order }
    }
    /// Whether the file was opened for writing.
    pub fn writable(&self) -> bool {
        self.writable
    }
    /// The storage underneath.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }
    /// Re-reads the host file length (after another handle changed the file).
    pub fn refresh_len(&self) -> Result<()> {
        let n = self.storage.len().ctx(|| "reading the image file's length".into())?;
        self.file_len.store(n, Ordering::SeqCst);
        Ok(())
    }
    /// Current length of the host file.
    pub fn file_len(&self) -> u64 {
        self.file_len.load(Ordering::SeqCst)
    }
    /// The host file length rounded up to whole clusters.
    pub fn file_clusters(&self) -> u64 {
        self.file_len().div_ceil(self.cluster_size())
    }

    /// Reads `buf.len()` bytes at `offset`; bytes past the end of the file read as zeros, but
    /// only within the last (partly written) cluster: a table that starts past the end of the
    /// file, or extends past the cluster-rounded end, is an `InvalidOffset` naming `what`.
    pub fn read_table_bytes(&self, offset: u64, buf: &mut [u8], what: &str) -> Result<()> {
        let len = buf.len() as u64;
        let file_len = self.file_len();
        let rounded_eof = self.file_clusters() * self.cluster_size();
        match offset.checked_add(len) {
            Some(end) if len == 0 || (offset < file_len && end <= rounded_eof) => {}
            _ => {
                return Err(Error::offset(
                    what,
                    offset,
                    format!("(0x{len:x} bytes) lies past the end of the file (0x{file_len:x}); the image is truncated"),
                ))
            }
        }
        let n = self.read_at(buf, offset)?;
        buf[n..].fill(0);
        Ok(())
    }

    /// Reads as much of `[offset, offset+len)` as the file holds: a table whose size field is
    /// bogus costs no more than the file is long.
    pub fn read_available(&self, offset: u64, len: u64) -> Result<Vec<u8>> {
        let avail = self.file_len().saturating_sub(offset).min(len);
        let mut buf = vec![0u8; usize::try_from(avail).unwrap_or(0)];
        let n = self.read_at(&mut buf, offset)?;
        buf.truncate(n);
        Ok(buf)
    }

    /// Reads as many of the `count` big-endian u64s at `offset` as the file holds (see
    /// [`QcowRawFile::read_available`]), in one read.
    /// An entry the end of the file cuts through reads with zeros for its missing bytes, as
    /// QEMU reads it (and as the write path reads the whole table).
    pub fn read_u64s_available(&self, offset: u64, count: u64) -> Result<Vec<u64>> {
        let mut bytes = self.read_available(offset, count.saturating_mul(8))?;
        bytes.resize(bytes.len().div_ceil(8) * 8, 0);
        Ok(bytes.chunks_exact(8).map(be_u64).collect())
    }

    /// Reads a table of `count` big-endian u64s at `offset` in one read (see
    /// [`QcowRawFile::read_table_bytes`] for the bounds).
    pub fn read_u64_table(&self, offset: u64, count: u64, what: &str) -> Result<Vec<u64>> {
        let bytes = count
            .checked_mul(8)
            .filter(|&b| b <= self.file_len().saturating_add(self.cluster_size()))
            .ok_or_else(|| {
                Error::offset(
                    what,
                    offset,
                    format!("with {count} entries is larger than the file (0x{:x})", self.file_len()),
                )
            })?;
        let mut buf = vec![0u8; usize::try_from(bytes).unwrap_or(0)];
        self.read_table_bytes(offset, &mut buf, what)?;
        Ok(buf.chunks_exact(8).map(be_u64).collect())
    }

    /// Writes `table` as big-endian u64s at `offset` in one write.
    pub fn write_u64_table(&self, offset: u64, table: &[u64], what: &str) -> Result<()> {
        let mut buf = Vec::with_capacity(table.len() * 8);
        for &e in table {
            buf.extend_from_slice(&e.to_be_bytes());
        }
        self.write_at(&buf, offset, what)
    }

    /// Reads `count` big-endian u64 entries at `offset`, each masked with `mask` if given.
    pub fn read_pointer_table(&self, offset: u64, count: u64, mask: Option<u64>) -> Result<Vec<u64>> {
        let mut t = self.read_u64_table(offset, count, "pointer table")?;
        if let Some(m) = mask {
            t.iter_mut().for_each(|e| *e &= m);
        }
        Ok(t)
    }

    /// Writes `table` as big-endian u64s at `offset`, OR-ing `non_zero_flags` into every entry
    /// that is not zero. One write call.
    pub fn write_pointer_table(&self, offset: u64, table: &[u64], non_zero_flags: u64) -> Result<()> {
        let t: Vec<u64> = table.iter().map(|&e| if e == 0 { 0 } else { e | non_zero_flags }).collect();
        self.write_u64_table(offset, &t, "pointer table")
    }

    /// Reads the refcount block (one cluster) at `offset`, decoded at the image's width.
    pub fn read_refcount_block(&self, offset: u64) -> Result<Vec<u64>> {
        let mut buf = vec![0u8; usize::try_from(self.cluster_size()).unwrap_or(0)];
        self.read_table_bytes(offset, &mut buf, "refcount block")?;
        Ok(decode_refcounts(&buf, self.refcount_order))
    }

    /// Writes a refcount block (one whole cluster; missing trailing entries are zero). Values
    /// above the width's maximum are an error, never silently truncated.
    pub fn write_refcount_block(&self, offset: u64, refcounts: &[u64]) -> Result<()> {
        let geo = self.refcount_geometry();
        if refcounts.len() as u64 > geo.refblock_entries() {
            return Err(Error::InvalidClusterIndex(format!(
                "refcount block at 0x{offset:x}: {} entries given, a block holds {}",
                refcounts.len(),
                geo.refblock_entries()
            )));
        }
        let max = geo.refcount_max();
        if let Some((i, &v)) = refcounts.iter().enumerate().find(|(_, &v)| v > max) {
            return Err(Error::corrupt(
                format!("refcount {v} of entry {i} overflows the {}-bit refcount width", geo.refcount_bits()),
                offset,
            ));
        }
        let mut buf = vec![0u8; usize::try_from(self.cluster_size()).unwrap_or(0)];
        encode_refcounts(refcounts, self.refcount_order, &mut buf);
        self.write_at(&buf, offset, "refcount block")
    }

    /// Reads into `buf` at `offset`; returns the bytes read (short at EOF).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        self.storage.read_at(buf, offset).ctx(|| format!("reading the image file at 0x{offset:x}"))
    }

    /// Writes all of `buf` at `offset`.
    pub fn write_at(&self, buf: &[u8], offset: u64, what: &str) -> Result<()> {
        self.write_checked(buf, offset, what, false)
    }

    /// Writes guest data at `offset`: as [`QcowRawFile::write_at`], its write-back started at
    /// once after [`QcowRawFile::set_write_behind`].
    pub fn write_data_at(&self, buf: &[u8], offset: u64, what: &str) -> Result<()> {
        self.write_checked(buf, offset, what, true)
    }

    fn write_checked(&self, buf: &[u8], offset: u64, what: &str, data: bool) -> Result<()> {
        if !self.writable {
            return Err(Error::ReadOnlyImage(format!("cannot write {what} at 0x{offset:x}")));
        }
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or_else(|| Error::offset(what, offset, "plus its length overflows 64 bits"))?;
        fault_point(what, offset)?;
        let written = if data { self.storage.write_data_at(buf, offset) } else { self.storage.write_at(buf, offset) };
        written.ctx(|| format!("writing {what} at 0x{offset:x}"))?;
        self.file_len.fetch_max(end, Ordering::SeqCst);
        Ok(())
    }

    /// Writes of guest data from now on start their write-back at once (a bulk copy such as
    /// commit's: the device writes overlap the copy instead of all waiting for the final
    /// flush). Ordering and durability are unchanged (`sync` covers them). Returns whether the
    /// storage does.
    pub fn set_write_behind(&self) -> bool {
        self.writable && self.storage.set_write_behind()
    }

    /// QEMU's `cache=unsafe`: from now on `sync` does nothing, so nothing written is known to
    /// be durable and a power cut can leave anything (what `qemu-img convert` does by default;
    /// qcowrs only on request, `convert -t unsafe`).
    pub fn set_unsafe_cache(&mut self) {
        self.no_sync = true;
    }

    /// Makes written data durable (fdatasync).
    pub fn sync(&self) -> Result<()> {
        if self.writable && !self.no_sync {
            fault_point("flush", 0)?;
            self.storage.sync().ctx(|| "flushing the image file (fdatasync)".into())?;
        }
        Ok(())
    }

    /// Sets the host file length.
    pub fn set_len(&self, len: u64) -> Result<()> {
        if !self.writable {
            return Err(Error::ReadOnlyImage("cannot resize the image file".into()));
        }
        fault_point("resize", len)?;
        self.storage.set_len(len).ctx(|| format!("resizing the image file to 0x{len:x}"))?;
        self.file_len.store(len, Ordering::SeqCst);
        Ok(())
    }

    /// Before a range that was synced and that nothing references any more is cut off or
    /// punched: lets the storage drop its cached pages first, on every core (a hint).
    pub fn drop_cached(&self, offset: u64, len: u64) {
        // Without syncs (`set_unsafe_cache`) the pages may be dirty: the hint would write them.
        if self.writable && !self.no_sync {
            self.storage.drop_cached(offset, len);
        }
    }

    /// Deallocates `[offset, offset+len)` of the host file (best effort; it then reads as
    /// zeros). Callers punch only clusters nothing references.
    pub fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
        if !self.writable {
            return Err(Error::ReadOnlyImage(format!("cannot punch a hole at 0x{offset:x}")));
        }
        fault_point("punch hole", offset)?;
        self.storage.punch_hole(offset, len).ctx(|| format!("punching a hole at 0x{offset:x}"))
    }
}
