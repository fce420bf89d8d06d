//! `qemu-img resize`: the virtual size of a qcow2 image (grown, or shrunk with `shrink`) or
//! the length of a raw image, with qemu-img's refusals.

use std::path::Path;

use crate::backing::open_image_file;
use crate::error::{Error, IoContext, Result};
use crate::format::QCOW_MAGIC;
use crate::qcow_file::{OpenOptions, QcowFile};

/// The size asked for: absolute, or relative to the current size (`+1G`, `-512M`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NewSize {
    /// This many bytes.
    Absolute(u64),
    /// The current size plus (or minus) this many bytes.
    Relative(i128),
}

/// Resizes the image at `path` (`format` "qcow2" or "raw", or probed) and returns the new
/// size. A smaller size needs `shrink` (guest data past the new end is dropped); the size must
/// be a positive multiple of 512.
pub fn resize(path: &Path, format: Option<&str>, size: NewSize, shrink: bool) -> Result<u64> {
    let file = open_image_file(path, true, "image")?;
    let is_qcow2 = match format {
        Some("qcow2") => true,
        Some("raw") => false,
        Some(other) => {
            return Err(Error::InvalidArgument(format!("Unknown file format '{other}' (qcowrs resizes qcow2 and raw)")))
        }
        None => {
            use std::os::unix::fs::FileExt;
            let mut magic = [0u8; 4];
            let n = file.read_at(&mut magic, 0).ctx(|| format!("reading '{}'", path.display()))?;
            n == 4 && u32::from_be_bytes(magic) == QCOW_MAGIC
        }
    };
    if is_qcow2 {
        drop(file);
        let mut f = QcowFile::open(path, OpenOptions { writable: true, ..OpenOptions::default() })?;
        let new = resize_image(&mut f, size, shrink)?;
        f.close()?;
        Ok(new)
    } else {
        crate::lock::lock_image(&file, true, &format!("'{}'", path.display()))?;
        let len = file.metadata().ctx(|| format!("reading the length of '{}'", path.display()))?.len();
        let new = target(len, size, shrink)?;
        file.set_len(new).ctx(|| format!("resizing '{}'", path.display()))?;
        file.sync_all().ctx(|| format!("syncing '{}'", path.display()))?;
        Ok(new)
    }
}

/// Resizes an open qcow2 image (on any storage; [`resize`] without the opening and closing)
/// and returns the new size: grown with [`QcowFile::truncate`], shrunk (with `shrink`) with
/// [`QcowFile::shrink`]. The size change is durable when it returns.
pub fn resize_image(f: &mut QcowFile, size: NewSize, shrink: bool) -> Result<u64> {
    let new = target(f.virtual_size(), size, shrink)?;
    if new < f.virtual_size() {
        f.shrink(new)?;
    } else {
        f.truncate(new)?;
    }
    Ok(new)
}

/// The new size from the current one, with qemu-img's checks in its order.
fn target(current: u64, size: NewSize, shrink: bool) -> Result<u64> {
    let new = match size {
        NewSize::Absolute(n) => i128::from(n),
        NewSize::Relative(d) => i128::from(current) + d,
    };
    if new <= 0 {
        return Err(Error::InvalidArgument("New image size must be positive".into()));
    }
    let new = u64::try_from(new).map_err(|_| Error::InvalidArgument("New image size too large".into()))?;
    if new < current && !shrink {
        return Err(Error::InvalidArgument("Use the --shrink option to perform a shrink operation.".into()));
    }
    if new % 512 != 0 {
        return Err(Error::InvalidArgument("The new size must be a multiple of 512".into()));
    }
    Ok(new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_img_checks_in_its_order() {
        let m = 1 << 20;
        assert_eq!(target(64 * m, NewSize::Relative(m as i128), false).unwrap(), 65 * m);
        assert_eq!(target(64 * m, NewSize::Absolute(32 * m), true).unwrap(), 32 * m);
        let msg = |r: Result<u64>| r.unwrap_err().to_string();
        assert!(msg(target(64 * m, NewSize::Absolute(32 * m), false)).contains("--shrink"));
        assert!(msg(target(64 * m, NewSize::Relative(1000), false)).contains("multiple of 512"));
        assert!(msg(target(64 * m, NewSize::Relative(-(65 * m as i128)), true)).contains("positive"));
    }
}
