//! `QcowRawFile`: positioned reads and writes of whole qcow2 tables (pointer tables and
//! refcount blocks) in single calls. It knows the cluster size and refcount width, nothing of
//! what the tables mean. Mirrors the seed's `QcowRawFile`.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use crate::error::{Error, IoContext, Result};
use crate::format::{be_u64, decode_refcounts, encode_refcounts, RefcountGeometry};

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

/// A qcow2 host file with table-level I/O.
#[derive(Debug)]
pub struct QcowRawFile {
    file: File,
    cluster_bits: u32,
    refcount_order: u32,
    writable: bool,
    /// Length of the host file, kept up to date by our own writes.
    file_len: u64,
}

impl QcowRawFile {
    /// Wraps an open file. `cluster_size` must be a power of two in 512..=2 MiB and
    /// `refcount_order` at most 6; returns `None` otherwise (as the seed's `from`).
    pub fn from(file: File, cluster_size: u64, refcount_order: u32, writable: bool) -> Result<Self> {
        if !cluster_size.is_power_of_two() || !(512..=(2 << 20)).contains(&cluster_size) {
            return Err(Error::InvalidClusterSize(format!(
                "cluster size {cluster_size} is not a power of two in 512..2M"
            )));
        }
        if refcount_order > 6 {
            return Err(Error::corrupt(format!("refcount_order {refcount_order} above 6"), 96));
        }
        let file_len = file.metadata().ctx(|| "reading image file metadata".into())?.len();
        Ok(QcowRawFile { file, cluster_bits: cluster_size.trailing_zeros(), refcount_order, writable, file_len })
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
    /// Re-reads the host file length (after another handle changed the file).
    pub fn refresh_len(&mut self) -> Result<()> {
        self.file_len = self.file.metadata().ctx(|| "reading image file metadata".into())?.len();
        Ok(())
    }

    /// Current length of the host file.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }
    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Reads `buf.len()` bytes at `offset`; bytes past the end of the file read as zeros, but
    /// only within the last (partly written) cluster: a table that starts past the end of the
    /// file, or extends past the cluster-rounded end, is an `InvalidOffset` naming `what`.
    pub fn read_table_bytes(&self, offset: u64, buf: &mut [u8], what: &str) -> Result<()> {
        let len = buf.len() as u64;
        let end = offset.checked_add(len);
        let rounded_eof = self.file_len.div_ceil(self.cluster_size()) * self.cluster_size();
        match end {
            Some(end) if len == 0 || (offset < self.file_len && end <= rounded_eof) => {}
            _ => {
                return Err(Error::offset(
                    what,
                    offset,
                    format!(
                        "(0x{len:x} bytes) lies past the end of the file (0x{:x}); the image is truncated",
                        self.file_len
                    ),
                ))
            }
        }
        let avail = usize::try_from(self.file_len - offset).unwrap_or(usize::MAX).min(buf.len());
        let (head, tail) = buf.split_at_mut(avail);
        self.file.read_exact_at(head, offset).ctx(|| format!("reading {what} at 0x{offset:x}"))?;
        tail.fill(0);
        Ok(())
    }

    /// Reads `count` big-endian u64 entries at `offset`, each masked with `mask` if given.
    pub fn read_pointer_table(&self, offset: u64, count: u64, mask: Option<u64>) -> Result<Vec<u64>> {
        let bytes = count.checked_mul(8).filter(|&b| b <= self.file_len.saturating_add(self.cluster_size()));
        let bytes = bytes.ok_or_else(|| {
            Error::offset(
                "pointer table",
                offset,
                format!("with {count} entries is larger than the file (0x{:x})", self.file_len),
            )
        })?;
        let mut buf = vec![0u8; usize::try_from(bytes).unwrap_or(0)];
        self.read_table_bytes(offset, &mut buf, "pointer table")?;
        let m = mask.unwrap_or(u64::MAX);
        Ok(buf.chunks_exact(8).map(|c| be_u64(c) & m).collect())
    }

    /// Writes `table` as big-endian u64s at `offset`, OR-ing `non_zero_flags` into every entry
    /// that is not zero. One write call.
    pub fn write_pointer_table(&mut self, offset: u64, table: &[u64], non_zero_flags: u64) -> Result<()> {
        let mut buf = Vec::with_capacity(table.len() * 8);
        for &e in table {
            let v = if e == 0 { 0 } else { e | non_zero_flags };
            buf.extend_from_slice(&v.to_be_bytes());
        }
        self.write_at(&buf, offset, "pointer table")
    }

    /// Reads the refcount block (one cluster) at `offset`, decoded at the image's width.
    pub fn read_refcount_block(&self, offset: u64) -> Result<Vec<u64>> {
        let mut buf = vec![0u8; usize::try_from(self.cluster_size()).unwrap_or(0)];
        self.read_table_bytes(offset, &mut buf, "refcount block")?;
        Ok(decode_refcounts(&buf, self.refcount_order))
    }

    /// Writes a refcount block (one whole cluster; missing trailing entries are zero). Values
    /// above the width's maximum are an error, never silently truncated.
    pub fn write_refcount_block(&mut self, offset: u64, refcounts: &[u64]) -> Result<()> {
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
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io(format!("reading host file at 0x{:x}", offset + done as u64), e)),
            }
        }
        Ok(done)
    }

    /// Writes all of `buf` at `offset`.
    pub fn write_at(&mut self, buf: &[u8], offset: u64, what: &str) -> Result<()> {
        if !self.writable {
            return Err(Error::ReadOnly(format!("cannot write {what} at 0x{offset:x}")));
        }
        fault_point(what, offset)?;
        self.file.write_all_at(buf, offset).ctx(|| format!("writing {what} at 0x{offset:x}"))?;
        self.file_len = self.file_len.max(offset + buf.len() as u64);
        Ok(())
    }

    /// Makes written data durable (fdatasync).
    pub fn sync(&self) -> Result<()> {
        if self.writable {
            fault_point("flush", 0)?;
            self.file.sync_data().ctx(|| "flushing the image file (fdatasync)".into())?;
        }
        Ok(())
    }

    /// Sets the host file length.
    pub fn set_len(&mut self, len: u64) -> Result<()> {
        if !self.writable {
            return Err(Error::ReadOnly("cannot resize the image file".into()));
        }
        fault_point("resize", len)?;
        self.file.set_len(len).ctx(|| format!("resizing the image file to 0x{len:x}"))?;
        self.file_len = len;
        Ok(())
    }
}
