//! Image locking compatible with QEMU's (`block/file-posix.c`): open-file-description byte
//! locks at offset 100 + permission bit for the permissions a user holds, and 200 + bit for the
//! permissions it does not share. qcowrs and QEMU thus refuse to write an image the other has
//! open, as two QEMU processes do.
//!
//! Read-write opens hold "consistent read", "write" and "resize" and share neither write nor
//! resize (as a qcow2 writer in QEMU); read-only opens hold "consistent read" and share
//! neither write nor resize (as `qemu-img` without `-U`).

use std::fs::File;

use nix::fcntl::{fcntl, FcntlArg};

use crate::error::{Error, Result};

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;
const PERM_CONSISTENT_READ: u32 = 0;
const PERM_WRITE: u32 = 1;
const PERM_RESIZE: u32 = 3;

fn perm_name(bit: u32) -> &'static str {
    match bit {
        0 => "consistent read",
        1 => "write",
        2 => "write unchanged",
        3 => "resize",
        _ => "unknown",
    }
}

fn flock(kind: libc::c_short, byte: i64) -> libc::flock {
    libc::flock {
        l_type: kind,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: byte as libc::off_t,
        l_len: 1,
        l_pid: 0,
    }
}

/// Whether another open file description holds a lock on `byte`.
fn locked_by_other(file: &File, byte: i64) -> Result<bool> {
    let mut fl = flock(libc::F_WRLCK as libc::c_short, byte);
    match fcntl(file, FcntlArg::F_OFD_GETLK(&mut fl)) {
        Ok(_) => Ok(fl.l_type != libc::F_UNLCK as libc::c_short),
        // File systems without OFD locks: no locking, as QEMU falls back to.
        Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOTSUP) => Ok(false),
        Err(e) => Err(Error::io(format!("testing image lock byte {byte}"), e.into())),
    }
}

fn take(file: &File, byte: i64) -> Result<()> {
    let fl = flock(libc::F_RDLCK as libc::c_short, byte);
    match fcntl(file, FcntlArg::F_OFD_SETLK(&fl)) {
        Ok(_) | Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOTSUP) => Ok(()),
        Err(e) => Err(Error::io(format!("taking image lock byte {byte}"), e.into())),
    }
}

/// Takes QEMU-compatible locks on an image file, or fails if another process (QEMU or
/// qcowrs) uses it in a conflicting way. The locks last as long as `file` is open.
pub fn lock_image(file: &File, writable: bool, what: &str) -> Result<()> {
    let held: &[u32] =
        if writable { &[PERM_CONSISTENT_READ, PERM_WRITE, PERM_RESIZE] } else { &[PERM_CONSISTENT_READ] };
    let unshared: &[u32] = &[PERM_WRITE, PERM_RESIZE];
    for &bit in held {
        if locked_by_other(file, SHARED_BASE + i64::from(bit))? {
            return Err(Error::ImageLocked(format!(
                "{what} is in use: another process (QEMU or qcowrs) does not share the \"{}\" permission",
                perm_name(bit)
            )));
        }
    }
    for &bit in unshared {
        if locked_by_other(file, PERM_BASE + i64::from(bit))? {
            return Err(Error::ImageLocked(format!(
                "{what} is in use: another process (QEMU or qcowrs) holds the \"{}\" permission",
                perm_name(bit)
            )));
        }
    }
    for &bit in held {
        take(file, PERM_BASE + i64::from(bit))?;
    }
    for &bit in unshared {
        take(file, SHARED_BASE + i64::from(bit))?;
    }
    Ok(())
}
