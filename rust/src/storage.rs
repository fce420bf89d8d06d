//! The I/O seam: every byte qcowrs reads or writes of an image (and of its external data file)
//! goes through a [`Storage`]. Three implementations:
//!
//! * [`FileStorage`]: a host file (positional I/O, `fdatasync`, hole punching);
//! * [`MemStorage`]: a growable in-memory buffer, for fast tests and fuzzing;
//! * [`RecordingStorage`]: wraps another storage and logs every write, sync, resize and punch in
//!   order, so that a test can rebuild every state a crash or power cut could leave
//!   ([`replay`]).
//!
//! Every method takes `&self`: one storage is shared by readers running in parallel.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};

/// Alignment of buffer address, offset and length that direct (`O_DIRECT`) I/O needs: the
/// largest logical block size in use (4 KiB), a multiple of every smaller one.
pub const DIRECT_ALIGN: usize = 4096;

/// A zeroed byte buffer whose start is aligned for direct I/O (no `unsafe`: a `Vec` with room
/// to spare, used from its first aligned byte).
#[derive(Debug, Default)]
pub struct AlignedBuf {
    bytes: Vec<u8>,
    at: usize,
    len: usize,
}

impl AlignedBuf {
    /// `len` zero bytes.
    pub fn new(len: usize) -> Self {
        let bytes = vec![0u8; len + DIRECT_ALIGN];
        let at = bytes.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
        AlignedBuf { bytes, at, len }
    }
    /// Sets the length (at most the capacity it was made with; new bytes unspecified).
    pub fn set_len(&mut self, len: usize) {
        self.len = len.min(self.bytes.len() - self.at);
    }
    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[self.at..self.at + self.len]
    }
    /// The bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.bytes[self.at..self.at + self.len]
    }
}

/// Positional byte storage behind an image.
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// Reads into `buf` at `offset`; returns the bytes read, short only at the end of the data.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Writes all of `buf` at `offset`, growing the storage if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable.
    fn sync(&self) -> io::Result<()>;
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Whether the storage holds no byte.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Sets the length (truncating or zero-extending).
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Deallocates `[offset, offset+len)`, which then reads as zeros; the length is unchanged.
    /// Best effort: storage that cannot punch holes may write zeros or do nothing (callers only
    /// punch clusters nothing references).
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()>;
    /// The host file, for locking (`None` for storage that is not a file).
    fn file(&self) -> Option<&File> {
        None
    }
    /// Asks that later [`Storage::write_data_at`] calls bypass the host's page cache where
    /// they can (large copies: no page cache to fill, nothing left to write back on sync).
    /// Returns whether this storage can. Durability is unchanged: such writes are durable
    /// after `sync`, like any other.
    fn set_direct_data_writes(&self) -> bool {
        false
    }
    /// Writes guest data: as [`Storage::write_at`], bypassing the page cache when asked to
    /// and the write is aligned to [`DIRECT_ALIGN`] (buffer, offset and length).
    fn write_data_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_at(buf, offset)
    }
}

/// A host file.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    /// A second descriptor of the same file opened `O_DIRECT` (`None`: the file system refused).
    direct: OnceLock<Option<File>>,
    /// Direct data writes are asked for and work.
    direct_on: AtomicBool,
}

impl FileStorage {
    /// Wraps an open file.
    pub fn new(file: File) -> Self {
        FileStorage { file, direct: OnceLock::new(), direct_on: AtomicBool::new(false) }
    }

    /// The data write done directly (`Ok(false)`: it could not be, nothing was written
    /// directly that matters; the caller writes it through the page cache).
    fn write_direct(&self, buf: &[u8], offset: u64) -> io::Result<bool> {
        let Some(Some(d)) = self.direct.get() else { return Ok(false) };
        let aligned = |n: u64| n % DIRECT_ALIGN as u64 == 0;
        if !self.direct_on.load(Ordering::Relaxed) || !aligned(offset) || !aligned(buf.len() as u64) {
            return Ok(false);
        }
        let r = if buf.as_ptr().align_offset(DIRECT_ALIGN) == 0 {
            d.write_all_at(buf, offset)
        } else {
            // An unaligned buffer goes through an aligned copy, a piece at a time.
            let mut bounce = AlignedBuf::new(buf.len().min(1 << 20));
            let mut r = Ok(());
            for (k, piece) in buf.chunks(1 << 20).enumerate() {
                bounce.set_len(piece.len());
                bounce.as_mut_slice().copy_from_slice(piece);
                r = d.write_all_at(bounce.as_slice(), offset + (k << 20) as u64);
                if r.is_err() {
                    break;
                }
            }
            r
        };
        match r {
            Ok(()) => Ok(true),
            // The file system wants another alignment (or no direct I/O at all): from now on
            // everything goes through the page cache, this write included (whatever part of
            // it went out directly is written again).
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                self.direct_on.store(false, Ordering::Relaxed);
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }
}

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        use nix::fcntl::{fallocate, FallocateFlags};
        let (Ok(off), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Ok(());
        };
        // A file system without hole punching keeps the bytes (the cluster is free either way).
        let _ =
            fallocate(&self.file, FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE, off, l);
        Ok(())
    }
    fn file(&self) -> Option<&File> {
        Some(&self.file)
    }
    fn set_direct_data_writes(&self) -> bool {
        use std::os::unix::fs::OpenOptionsExt;
        use std::os::unix::io::AsRawFd;
        // The same open file again (by its descriptor, whatever its path is now), O_DIRECT.
        let d = self.direct.get_or_init(|| {
            std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
                .ok()
        });
        self.direct_on.store(d.is_some(), Ordering::Relaxed);
        d.is_some()
    }
    fn write_data_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.write_direct(buf, offset)? {
            return Ok(());
        }
        self.file.write_all_at(buf, offset)
    }
}

/// An image held in memory.
#[derive(Debug, Default)]
pub struct MemStorage {
    data: RwLock<Vec<u8>>,
}

impl MemStorage {
    /// Storage holding `bytes`.
    pub fn new(bytes: Vec<u8>) -> Self {
        MemStorage { data: RwLock::new(bytes) }
    }
    /// A copy of the bytes.
    pub fn to_vec(&self) -> Vec<u8> {
        self.data.read().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

fn mem_end(offset: u64, len: usize) -> io::Result<usize> {
    usize::try_from(offset)
        .ok()
        .and_then(|o| o.checked_add(len))
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset beyond the address space"))
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let d = self.data.read().unwrap_or_else(PoisonError::into_inner);
        let Ok(start) = usize::try_from(offset) else { return Ok(0) };
        if start >= d.len() {
            return Ok(0);
        }
        let n = buf.len().min(d.len() - start);
        buf[..n].copy_from_slice(&d[start..start + n]);
        Ok(n)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = mem_end(offset, buf.len())?;
        let mut d = self.data.write().unwrap_or_else(PoisonError::into_inner);
        let have = d.len();
        if have < end {
            d.try_reserve(end - have).map_err(|_| io::Error::from(io::ErrorKind::OutOfMemory))?;
            d.resize(end, 0);
        }
        d[end - buf.len()..end].copy_from_slice(buf);
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.data.read().unwrap_or_else(PoisonError::into_inner).len() as u64)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        let len = mem_end(len, 0)?;
        let mut d = self.data.write().unwrap_or_else(PoisonError::into_inner);
        let have = d.len();
        if len > have {
            d.try_reserve(len - have).map_err(|_| io::Error::from(io::ErrorKind::OutOfMemory))?;
        }
        d.resize(len, 0);
        Ok(())
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut d = self.data.write().unwrap_or_else(PoisonError::into_inner);
        let size = d.len() as u64;
        let (s, e) = (offset.min(size), offset.saturating_add(len).min(size));
        // Both are at most the buffer's length, so they fit in usize.
        d[usize::try_from(s).unwrap_or(0)..usize::try_from(e).unwrap_or(0)].fill(0);
        Ok(())
    }
}

/// One mutating operation seen by a [`RecordingStorage`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StorageOp {
    /// Bytes written at an offset.
    Write {
        /// Where.
        offset: u64,
        /// What.
        data: Vec<u8>,
    },
    /// Everything before it is durable.
    Sync,
    /// The length was set.
    SetLen(u64),
    /// A range was deallocated.
    PunchHole {
        /// Where.
        offset: u64,
        /// How many bytes.
        len: u64,
    },
}

/// Wraps a storage and records every mutating operation, in order.
#[derive(Debug)]
pub struct RecordingStorage {
    inner: Arc<dyn Storage>,
    log: Mutex<Vec<StorageOp>>,
}

impl RecordingStorage {
    /// Records the operations done on `inner`.
    pub fn new(inner: Arc<dyn Storage>) -> Self {
        RecordingStorage { inner, log: Mutex::new(Vec::new()) }
    }
    /// The operations so far (the log is emptied).
    pub fn take_log(&self) -> Vec<StorageOp> {
        std::mem::take(&mut *self.log.lock().unwrap_or_else(PoisonError::into_inner))
    }
    fn record(&self, op: StorageOp) {
        self.log.lock().unwrap_or_else(PoisonError::into_inner).push(op);
    }
}

impl Storage for RecordingStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_at(buf, offset)?;
        self.record(StorageOp::Write { offset, data: buf.to_vec() });
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        self.inner.sync()?;
        self.record(StorageOp::Sync);
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)?;
        self.record(StorageOp::SetLen(len));
        Ok(())
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.punch_hole(offset, len)?;
        self.record(StorageOp::PunchHole { offset, len });
        Ok(())
    }
    fn file(&self) -> Option<&File> {
        self.inner.file()
    }
}

/// Applies `ops` to a copy of `base`: the bytes a storage holds after those operations.
pub fn replay(base: &[u8], ops: &[StorageOp]) -> io::Result<Vec<u8>> {
    let m = MemStorage::new(base.to_vec());
    for op in ops {
        match op {
            StorageOp::Write { offset, data } => m.write_at(data, *offset)?,
            StorageOp::Sync => {}
            StorageOp::SetLen(n) => m.set_len(*n)?,
            StorageOp::PunchHole { offset, len } => m.punch_hole(*offset, *len)?,
        }
    }
    Ok(m.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_storage_reads_writes_grows_and_punches() {
        let m = MemStorage::default();
        m.write_at(b"hello", 10).unwrap();
        assert_eq!(m.len().unwrap(), 15);
        let mut b = [9u8; 20];
        assert_eq!(m.read_at(&mut b, 8).unwrap(), 7);
        assert_eq!(&b[..7], b"\0\0hello");
        m.punch_hole(11, 2).unwrap();
        assert_eq!(&m.to_vec()[10..15], b"h\0\0lo");
        m.set_len(4).unwrap();
        assert_eq!(m.read_at(&mut b, 8).unwrap(), 0);
    }

    #[test]
    fn direct_data_writes_read_back_whatever_the_alignment() {
        // A file system that refuses O_DIRECT (older tmpfs) takes every write through the
        // page cache: it must read back all the same.
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f"))
            .unwrap();
        let f = FileStorage::new(file);
        f.write_at(&[7u8; 100], 0).unwrap();
        let direct = f.set_direct_data_writes();
        let mut aligned = AlignedBuf::new(3 * DIRECT_ALIGN);
        aligned.as_mut_slice().fill(1);
        f.write_data_at(aligned.as_slice(), DIRECT_ALIGN as u64).unwrap();
        // Not aligned in memory (a bounce buffer), then not aligned at all (page cache).
        let v = vec![2u8; 2 * DIRECT_ALIGN + 1];
        f.write_data_at(&v[1..], 4 * DIRECT_ALIGN as u64).unwrap();
        f.write_data_at(&[3u8; 10], 5).unwrap();
        f.sync().unwrap();
        let mut back = vec![0u8; 6 * DIRECT_ALIGN];
        assert_eq!(f.read_at(&mut back, 0).unwrap(), 6 * DIRECT_ALIGN);
        assert!(back[..5].iter().all(|&b| b == 7) && back[5..15].iter().all(|&b| b == 3));
        assert!(back[15..100].iter().all(|&b| b == 7) && back[100..DIRECT_ALIGN].iter().all(|&b| b == 0));
        assert!(back[DIRECT_ALIGN..4 * DIRECT_ALIGN].iter().all(|&b| b == 1), "direct: {direct}");
        assert!(back[4 * DIRECT_ALIGN..].iter().all(|&b| b == 2));
    }

    #[test]
    fn recording_logs_in_order_and_replays() {
        let base = vec![1u8; 8];
        let r = RecordingStorage::new(Arc::new(MemStorage::new(base.clone())));
        r.write_at(b"ab", 2).unwrap();
        r.sync().unwrap();
        r.set_len(12).unwrap();
        r.punch_hole(0, 1).unwrap();
        let log = r.take_log();
        assert_eq!(log.len(), 4);
        assert_eq!(log[1], StorageOp::Sync);
        assert_eq!(replay(&base, &log[..1]).unwrap(), vec![1, 1, b'a', b'b', 1, 1, 1, 1]);
        assert_eq!(replay(&base, &log).unwrap(), vec![0, 1, b'a', b'b', 1, 1, 1, 1, 0, 0, 0, 0]);
        assert!(r.take_log().is_empty());
    }
}
