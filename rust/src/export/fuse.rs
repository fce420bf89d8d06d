//! The FUSE export: the guest disk of an open image as one raw file of the virtual size,
//! mounted over an existing regular file (QEMU's FUSE-export convention: the file system's
//! root *is* the disk). Built on `fuser`'s pure-Rust mount (the `fusermount3` helper, or the
//! mount system call as root), so neither libfuse nor its headers are needed.
//!
//! Requests are served by several threads. Reads take the image's read lock and run in
//! parallel (`QcowFile::read_at(&self)`); writes, `fallocate` (punch hole → discard, zero
//! range → write zeroes) and `fsync`/`flush` (→ the image's flush, which makes everything
//! written so far durable) take the write lock. `lseek` with `SEEK_DATA`/`SEEK_HOLE` answers
//! from the image's map, so `cp --sparse`, `qemu-img convert` and `tar -S` see its holes. The export ends when the file system is
//! unmounted (`fusermount3 -u`, or [`FuseExport::unmount`]); [`FuseExport::finish`] then
//! closes the image, leaving it consistent and every write durable.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, LockOwner, MountOption,
    OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyEmpty, ReplyLseek, ReplyOpen, ReplyWrite, Request, Session,
    SessionUnmounter, WriteFlags,
};

use crate::error::{Error, Result};
use crate::QcowFile;

/// How long the kernel may cache the file's attributes: they only change by our own writes.
const ATTR_TTL: Duration = Duration::from_secs(1);

/// Request threads when the machine's parallelism is unknown, and at most.
const MAX_THREADS: usize = 8;

/// `fallocate(2)` modes (linux/falloc.h).
const FALLOC_FL_KEEP_SIZE: i32 = 0x01;
const FALLOC_FL_PUNCH_HOLE: i32 = 0x02;
const FALLOC_FL_ZERO_RANGE: i32 = 0x10;

/// A mounted export: the session runs on its own threads until the file system is unmounted.
pub struct FuseExport {
    image: Arc<RwLock<QcowFile>>,
    mountpoint: PathBuf,
    unmounter: Mutex<SessionUnmounter>,
    /// The session's result, sent when it ends.
    ended: Mutex<Receiver<std::io::Result<()>>>,
    /// Set once the session's end has been received.
    result: Mutex<Option<std::io::Result<()>>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for FuseExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FuseExport").field("mountpoint", &self.mountpoint).finish_non_exhaustive()
    }
}

impl FuseExport {
    /// Mounts `image` (opened read-write for a writable export; its locks are QEMU's for that
    /// mode) over `mountpoint`, an existing regular file, and starts serving it. Writes are
    /// refused (`EROFS`) unless the image was opened writable.
    pub fn mount(image: QcowFile, mountpoint: &Path) -> Result<Self> {
        let meta = std::fs::metadata(mountpoint)
            .map_err(|e| Error::io(format!("mount point '{}'", mountpoint.display()), e))?;
        if !meta.is_file() {
            return Err(Error::InvalidArgument(format!(
                "mount point '{}' is not a regular file (the disk is exported over an existing file, \
                 as QEMU's FUSE export does)",
                mountpoint.display()
            )));
        }
        let writable = image.writable();
        let fs = DiskFs::new(image, &meta);
        let image = Arc::clone(&fs.image);
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName(fs.image_path.display().to_string()),
            MountOption::Subtype("qcowrs".into()),
            if writable { MountOption::RW } else { MountOption::RO },
        ];
        config.n_threads =
            Some(std::thread::available_parallelism().map_or(MAX_THREADS, |n| n.get().clamp(2, MAX_THREADS)));
        config.clone_fd = true;
        let mut session = Session::new(fs, mountpoint, &config)
            .map_err(|e| Error::io(format!("mounting '{}'", mountpoint.display()), e))?;
        let unmounter = session.unmount_callable();
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("qcowrs-fuse".into())
            .spawn(move || {
                // The receiver may be gone (the export dropped): nobody waits for the result.
                let _ = tx.send(session.run());
            })
            .map_err(|e| Error::io("starting the FUSE session thread", e))?;
        Ok(FuseExport {
            image,
            mountpoint: mountpoint.to_path_buf(),
            unmounter: Mutex::new(unmounter),
            ended: Mutex::new(rx),
            result: Mutex::new(None),
            thread: Some(thread),
        })
    }

    /// Waits at most `timeout` for the session to end (the file system unmounted); true once
    /// it has.
    pub fn wait(&self, timeout: Duration) -> bool {
        let mut result = self.result.lock().unwrap_or_else(PoisonError::into_inner);
        if result.is_some() {
            return true;
        }
        let rx = self.ended.lock().unwrap_or_else(PoisonError::into_inner);
        match rx.recv_timeout(timeout) {
            Ok(r) => {
                *result = Some(r);
                true
            }
            Err(RecvTimeoutError::Timeout) => false,
            Err(RecvTimeoutError::Disconnected) => {
                *result = Some(Err(std::io::Error::other("the FUSE session thread ended without a result")));
                true
            }
        }
    }

    /// Unmounts the file system, which ends the session. A mount point still in use is
    /// detached lazily (`fusermount3 -u -z`): the session then ends when its last user
    /// closes the file.
    pub fn unmount(&self) -> Result<()> {
        let r = self.unmounter.lock().unwrap_or_else(PoisonError::into_inner).unmount();
        if r.is_err() && !self.wait(Duration::ZERO) {
            let status = std::process::Command::new("fusermount3")
                .arg("-u")
                .arg("-z")
                .arg("-q")
                .arg(&self.mountpoint)
                .status()
                .map_err(|e| Error::io("running fusermount3 -u -z", e))?;
            if !status.success() && !self.wait(Duration::ZERO) {
                return r.map_err(|e| Error::io(format!("unmounting '{}'", self.mountpoint.display()), e));
            }
        }
        Ok(())
    }

    /// Waits for the session to end (unmount first, or let `fusermount3 -u` end it), then
    /// flushes and closes the image: every write durable, the image consistent, its locks
    /// released when the image is dropped. The session's own error, if it had one, is
    /// returned after the image is closed.
    pub fn finish(mut self) -> Result<()> {
        while !self.wait(Duration::from_secs(1)) {}
        if let Some(t) = self.thread.take() {
            // The thread only sends the session's result: it cannot panic.
            let _ = t.join();
        }
        let closed = self.image.write().unwrap_or_else(PoisonError::into_inner).close();
        let session = self.result.lock().unwrap_or_else(PoisonError::into_inner).take();
        closed?;
        match session {
            Some(Err(e)) => Err(Error::io(format!("serving '{}'", self.mountpoint.display()), e)),
            _ => Ok(()),
        }
    }
}

/// The file system: one regular file, the root inode, that is the guest disk.
struct DiskFs {
    image: Arc<RwLock<QcowFile>>,
    image_path: PathBuf,
    size: u64,
    writable: bool,
    cluster_size: u64,
    /// Whether discarded clusters would show the backing file (v2 with a backing file): a
    /// punched hole is then written as zeros.
    discard_shows_backing: bool,
    /// The attributes of the file mounted over, kept for the disk (owner, times, mode).
    uid: u32,
    gid: u32,
    perm: u16,
    time: SystemTime,
}

impl DiskFs {
    fn new(image: QcowFile, mountpoint: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        let writable = image.writable();
        let mode = u16::try_from(mountpoint.mode() & 0o777).unwrap_or(0o644);
        DiskFs {
            image_path: image.path().to_path_buf(),
            size: image.virtual_size(),
            cluster_size: image.cluster_size(),
            discard_shows_backing: image.header().version < 3 && image.backing_file().is_some(),
            writable,
            uid: mountpoint.uid(),
            gid: mountpoint.gid(),
            // Read-only: no write bits, so that tools see the file as such before trying.
            perm: if writable { mode | 0o600 } else { (mode | 0o400) & !0o222 },
            time: mountpoint.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            image: Arc::new(RwLock::new(image)),
        }
    }

    fn read_image(&self) -> RwLockReadGuard<'_, QcowFile> {
        self.image.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_image(&self) -> RwLockWriteGuard<'_, QcowFile> {
        self.image.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn attr(&self) -> FileAttr {
        use std::os::unix::fs::MetadataExt;
        // Blocks: what the image file takes on the host (as QEMU's export reports).
        let blocks = std::fs::metadata(&self.image_path).map_or(0, |m| m.blocks());
        FileAttr {
            ino: INodeNo::ROOT,
            size: self.size,
            blocks,
            atime: self.time,
            mtime: self.time,
            ctime: self.time,
            crtime: self.time,
            kind: FileType::RegularFile,
            perm: self.perm,
            nlink: 1,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    /// A range of the disk, or `None` when `offset` is at or past its end; `len` is cut at it.
    fn clamp(&self, offset: u64, len: u64) -> Option<u64> {
        (offset < self.size).then(|| len.min(self.size - offset))
    }

    /// `lseek` with `SEEK_DATA` or `SEEK_HOLE` (the kernel answers the other kinds itself):
    /// data is what the image's map says reads data (through the backing chain), holes are
    /// unallocated and zero clusters; the end of the disk is a hole, as in a sparse file.
    fn seek(&self, offset: i64, whence: i32) -> std::result::Result<i64, Errno> {
        let data = match whence {
            libc::SEEK_DATA => true,
            libc::SEEK_HOLE => false,
            _ => return Err(Errno::EINVAL),
        };
        let Ok(off) = u64::try_from(offset) else { return Err(Errno::ENXIO) };
        if off >= self.size {
            return Err(Errno::ENXIO);
        }
        let map = crate::ops::map::map_image(&self.read_image(), off, None).map_err(|e| errno(&e))?;
        let found = map.entries.iter().find(|e| e.start + e.length > off && e.data == data).map(|e| e.start.max(off));
        match (found, data) {
            (Some(at), _) => i64::try_from(at).map_err(|_| Errno::EOVERFLOW),
            (None, false) => i64::try_from(self.size).map_err(|_| Errno::EOVERFLOW),
            (None, true) => Err(Errno::ENXIO),
        }
    }

    /// `fallocate` on the disk: punch hole (with keep size) → discard, the range reading as
    /// zeros afterwards; zero range → write zeroes; plain allocation within the disk → done
    /// (a disk has no holes to fill).
    fn fallocate(&self, offset: u64, length: u64, mode: i32) -> std::result::Result<(), Errno> {
        if !self.writable {
            return Err(Errno::EROFS);
        }
        let Some(len) = self.clamp(offset, length) else {
            return Err(if mode & FALLOC_FL_KEEP_SIZE != 0 { Errno::EINVAL } else { Errno::ENOSPC });
        };
        if len < length && mode & FALLOC_FL_KEEP_SIZE == 0 {
            return Err(Errno::ENOSPC);
        }
        match mode & !FALLOC_FL_KEEP_SIZE {
            0 => Ok(()),
            FALLOC_FL_PUNCH_HOLE if mode & FALLOC_FL_KEEP_SIZE != 0 => {
                self.punch_hole(offset, len).map_err(|e| errno(&e))
            }
            FALLOC_FL_ZERO_RANGE => self.write_image().write_zeroes(offset, len).map_err(|e| errno(&e)),
            FALLOC_FL_PUNCH_HOLE => Err(Errno::EINVAL),
            _ => Err(Errno::EOPNOTSUPP),
        }
    }

    /// Discards the whole clusters of the range and writes zeros into its partial ones: the
    /// range reads as zeros and its clusters are given back (on the image's next flush).
    fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
        let end = offset + len;
        let cs = self.cluster_size;
        let first = offset.div_ceil(cs) * cs;
        let last = end / cs * cs;
        let mut image = self.write_image();
        if first >= last || self.discard_shows_backing {
            return image.write_zeroes(offset, len);
        }
        if offset < first {
            image.write_zeroes(offset, first - offset)?;
        }
        image.discard(first, last - first)?;
        if last < end {
            image.write_zeroes(last, end - last)?;
        }
        Ok(())
    }
}

/// The errno a failed image operation answers with.
fn errno(e: &Error) -> Errno {
    match e {
        Error::Io { source, .. } => source.raw_os_error().map_or(Errno::EIO, Errno::from_i32),
        Error::ReadOnlyImage(_) => Errno::EROFS,
        Error::InvalidArgument(_) => Errno::EINVAL,
        Error::ImageLocked(_) => Errno::EAGAIN,
        _ => Errno::EIO,
    }
}

impl Filesystem for DiskFs {
    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino == INodeNo::ROOT {
            reply.attr(&ATTR_TTL, &self.attr());
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // The disk keeps its size (resize the image instead); owner, mode and times stay
        // those of the file mounted over, and changing them is accepted as a no-op.
        match size {
            Some(s) if s != self.size => reply.error(if self.writable { Errno::EPERM } else { Errno::EROFS }),
            _ => reply.attr(&ATTR_TTL, &self.attr()),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if ino != INodeNo::ROOT {
            reply.error(Errno::ENOENT);
        } else if !self.writable && flags.acc_mode() != OpenAccMode::O_RDONLY {
            reply.error(Errno::EROFS);
        } else {
            reply.opened(FileHandle(0), FopenFlags::empty());
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(len) = self.clamp(offset, u64::from(size)) else {
            reply.data(&[]);
            return;
        };
        let mut buf = vec![0u8; usize::try_from(len).unwrap_or(0)];
        match self.read_image().read_at(&mut buf, offset) {
            Ok(n) => reply.data(&buf[..n]),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if !self.writable {
            reply.error(Errno::EROFS);
            return;
        }
        // As a block device: a write stops at the end of the disk, and none starts there.
        let Some(len) = self.clamp(offset, data.len() as u64) else {
            reply.error(Errno::ENOSPC);
            return;
        };
        let len = usize::try_from(len).unwrap_or(0);
        match self.write_image().write_at(&data[..len], offset) {
            Ok(()) => reply.written(u32::try_from(len).unwrap_or(u32::MAX)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _owner: LockOwner, reply: ReplyEmpty) {
        // Every close of a descriptor: what it wrote becomes durable, as QEMU's export does.
        match self.write_image().flush() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        match self.write_image().flush() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        match DiskFs::fallocate(self, offset, length, mode) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn lseek(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, offset: i64, whence: i32, reply: ReplyLseek) {
        match self.seek(offset, whence) {
            Ok(at) => reply.offset(at),
            Err(e) => reply.error(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_answer_with_their_errno() {
        let io = Error::io("reading", std::io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(errno(&io), Errno::ENOSPC);
        assert_eq!(errno(&Error::io("x", std::io::Error::other("no errno"))), Errno::EIO);
        assert_eq!(errno(&Error::ReadOnlyImage("ro".into())), Errno::EROFS);
        assert_eq!(errno(&Error::InvalidArgument("bad".into())), Errno::EINVAL);
        assert_eq!(errno(&Error::ImageLocked("held".into())), Errno::EAGAIN);
        assert_eq!(errno(&Error::corrupt("L2 table", 0x30000)), Errno::EIO);
    }

    #[test]
    fn mountpoint_must_be_a_regular_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("a.qcow2");
        let opts = crate::CreateOptions { virtual_size: 1 << 20, ..crate::CreateOptions::default() };
        let f = QcowFile::create(&image, &opts).expect("create");
        let e = FuseExport::mount(f, dir.path()).expect_err("a directory is refused");
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }
}
