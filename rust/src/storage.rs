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

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

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
    /// Asks that later [`Storage::write_data_at`] calls start writing their data back to the
    /// disk at once (write-behind), so that a bulk copy's device writes overlap the copy
    /// instead of all waiting for the flush at the end. Returns whether this storage does.
    /// Durability is unchanged: the data is durable after `sync`, like any other write.
    fn set_write_behind(&self) -> bool {
        false
    }
    /// Writes guest data: as [`Storage::write_at`], its write-back started at once when asked
    /// to (see [`Storage::set_write_behind`]).
    fn write_data_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_at(buf, offset)
    }
    /// A hint before `[offset, offset+len)` is cut off or punched: its bytes are no longer
    /// needed and were synced, so cached copies can go. Changes no byte.
    fn drop_cached(&self, _offset: u64, _len: u64) {}
}

/// A host file.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    /// Data writes start their write-back at once.
    write_behind: AtomicBool,
    /// With write-behind: the data ranges written whose write-back was started, oldest first,
    /// and their bytes; past [`DROP_BEHIND`] bytes the oldest are dropped from the page cache.
    behind: Mutex<(VecDeque<(u64, u64)>, u64)>,
}

/// Bytes of bulk data writes kept in the page cache behind the newest (see
/// [`FileStorage::write_data_at`]).
const DROP_BEHIND: u64 = 16 << 20;

impl FileStorage {
    /// Wraps an open file.
    pub fn new(file: File) -> Self {
        FileStorage { file, write_behind: AtomicBool::new(false), behind: Mutex::new((VecDeque::new(), 0)) }
    }
    /// The file.
    pub fn as_file(&self) -> &File {
        &self.file
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
    fn set_write_behind(&self) -> bool {
        self.write_behind.store(true, Ordering::Relaxed);
        true
    }
    fn write_data_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)?;
        if self.write_behind.load(Ordering::Relaxed) {
            // POSIX_FADV_DONTNEED starts the write-back of the range's dirty pages without
            // waiting for it (and drops none of them until they are written). Only a hint:
            // whatever it does not do, the next sync does.
            let len = buf.len() as u64;
            self.dont_need(offset, len);
            // Drop-behind: the ranges written DROP_BEHIND bytes ago are written back by now,
            // and dropping their clean pages lets the next writes reuse them. A bulk copy then
            // keeps ~16 MiB of page cache instead of all it wrote (evicting nothing else), and
            // its page allocations stay cheap: on a VM whose free memory goes back to the host
            // (balloon free-page reporting), writing into never-reused pages cost ~6 us per
            // page here, ten times the copy itself.
            let oldest = {
                let mut b = self.behind.lock().unwrap_or_else(PoisonError::into_inner);
                b.0.push_back((offset, len));
                b.1 += len;
                let mut out = Vec::new();
                while b.1 > DROP_BEHIND {
                    let Some((o, l)) = b.0.pop_front() else { break };
                    b.1 -= l;
                    out.push((o, l));
                }
                out
            };
            for (o, l) in oldest {
                self.dont_need(o, l);
            }
        }
        Ok(())
    }
    fn drop_cached(&self, offset: u64, len: u64) {
        // Truncating or punching a range drops its cached pages one by one on one core (for
        // a 4 GiB image shrunk to a quarter, ~200k pages: about half the cut's time). The
        // range was synced, so its pages are clean and POSIX_FADV_DONTNEED drops them at once;
        // large ranges are split so that every core drops a part. Only a hint either way.
        const PART_MIN: u64 = 32 << 20;
        if len < 2 * PART_MIN {
            return; // one core's work: the cut itself drops them
        }
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let parts = (len / PART_MIN).clamp(1, cores.min(8) as u64);
        let part = (len / parts).next_multiple_of(1 << 16);
        std::thread::scope(|s| {
            for k in 1..parts {
                let at = offset + k * part;
                let l = part.min((offset + len).saturating_sub(at));
                s.spawn(move || self.dont_need(at, l));
            }
            self.dont_need(offset, part.min(len));
        });
    }
}

impl FileStorage {
    /// posix_fadvise(POSIX_FADV_DONTNEED) on a range (a hint: errors ignored).
    fn dont_need(&self, offset: u64, len: u64) {
        use nix::fcntl::{posix_fadvise, PosixFadviseAdvice};
        if let (Ok(o), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) {
            let _ = posix_fadvise(&self.file, o, l, PosixFadviseAdvice::POSIX_FADV_DONTNEED);
        }
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

    /// A new empty file (in a directory that lives as long as the first value).
    fn temp_file_storage() -> (tempfile::TempDir, FileStorage) {
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f"))
            .unwrap();
        (dir, FileStorage::new(file))
    }

    #[test]
    fn write_behind_data_reads_back() {
        let (_dir, f) = temp_file_storage();
        f.write_at(&[7u8; 100], 0).unwrap();
        assert!(f.set_write_behind());
        f.write_data_at(&[1u8; 3 * 4096], 4096).unwrap();
        f.write_data_at(&[3u8; 10], 5).unwrap();
        let mut back = vec![0u8; 4 * 4096];
        assert_eq!(f.read_at(&mut back, 0).unwrap(), 4 * 4096);
        assert!(back[..5].iter().all(|&b| b == 7) && back[5..15].iter().all(|&b| b == 3));
        assert!(back[15..100].iter().all(|&b| b == 7) && back[100..4096].iter().all(|&b| b == 0));
        assert!(back[4096..].iter().all(|&b| b == 1));
    }

    #[test]
    fn drop_behind_and_drop_cached_keep_every_byte() {
        // Past DROP_BEHIND bytes of data writes the oldest ranges are dropped from the page
        // cache, unsynced (still dirty: the hint must not lose them) and after a sync; a
        // large synced range is then dropped on several threads. Every byte still reads back.
        let (_dir, f) = temp_file_storage();
        assert!(f.set_write_behind());
        let piece = 1u64 << 20;
        let pieces = 3 * DROP_BEHIND / piece;
        for k in 0..pieces {
            #[allow(clippy::cast_possible_truncation)]
            f.write_data_at(&vec![k as u8 + 1; piece as usize], k * piece).unwrap();
            if k == pieces / 2 {
                f.sync().unwrap();
            }
        }
        assert!(f.behind.lock().unwrap().1 <= DROP_BEHIND);
        f.sync().unwrap();
        f.drop_cached(piece, (pieces - 1) * piece);
        let mut back = vec![0u8; usize::try_from(piece).unwrap()];
        for k in 0..pieces {
            assert_eq!(f.read_at(&mut back, k * piece).unwrap(), back.len());
            assert!(back.iter().all(|&b| u64::from(b) == k + 1), "piece {k}");
        }
        f.set_len(piece).unwrap();
        assert_eq!(f.len().unwrap(), piece);
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
