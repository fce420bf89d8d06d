//! The files of a create: the targets (an existing file is locked as QEMU's `raw_co_create`
//! locks it, so one a VM or `qemu-io` holds is refused), temporary files next to them that
//! receive the new image and data file, and the renames that put them in place once they are
//! complete and synced. Until then nothing at the targets changes; on any error the temporary
//! files are removed.

use std::fs::{self, File};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::layout::{self, Extend, Grow, Sink};
use super::{CreateOptions, Plan};
use crate::error::{Error, IoContext, Result};

/// Mode of a new file (QEMU's `qemu_create(..., 0644)`, less the umask).
const NEW_FILE_MODE: u32 = 0o644;
/// Symbolic links followed to find the file a create writes (as `open` does).
const MAX_SYMLINKS: usize = 40;

/// A file the create will write: where it really is (symbolic links followed), and the
/// existing file there, held open with QEMU's write lock until it is replaced.
struct Target {
    path: PathBuf,
    existing: Option<(File, fs::Metadata)>,
}

/// `path` with symbolic links followed (also a dangling one: the create makes its target).
fn follow_links(path: &Path) -> Result<PathBuf> {
    let mut p = path.to_path_buf();
    for _ in 0..MAX_SYMLINKS {
        match fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                let to = fs::read_link(&p).ctx(|| format!("reading the symbolic link '{}'", p.display()))?;
                p = match p.parent() {
                    Some(dir) if to.is_relative() => dir.join(to),
                    _ => to,
                };
            }
            _ => return Ok(p),
        }
    }
    Err(Error::io(format!("creating '{}'", path.display()), std::io::Error::from_raw_os_error(libc::ELOOP)))
}

impl Target {
    /// Finds the file for `path` (symbolic links followed) and whether it exists.
    fn locate(path: &Path, what: &str, overwrite: bool) -> Result<(PathBuf, Option<fs::Metadata>)> {
        let real = follow_links(path)?;
        let meta = match fs::metadata(&real) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((real, None)),
            Err(e) => return Err(Error::io(format!("creating {what} '{}'", path.display()), e)),
        };
        if !overwrite {
            return Err(Error::io(
                format!("creating {what} '{}' (overwrite=False)", path.display()),
                std::io::Error::from_raw_os_error(libc::EEXIST),
            ));
        }
        if !meta.is_file() {
            return Err(Error::UnsupportedFeature(format!(
                "cannot create {what} '{}': it exists and is not a regular file",
                path.display()
            )));
        }
        Ok((real, Some(meta)))
    }

    /// Opens an existing file read-write and takes QEMU's write lock on it (refused with
    /// [`Error::ImageLocked`] if another process uses it).
    fn lock(path: &Path, real: PathBuf, meta: Option<fs::Metadata>, what: &str) -> Result<Target> {
        let Some(meta) = meta else { return Ok(Target { path: real, existing: None }) };
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&real)
            .ctx(|| format!("Could not create {what} '{}'", path.display()))?;
        crate::lock::lock_image(&file, true, &format!("{what} '{}'", path.display()))
            .map_err(|e| e.prefixed("Is another process using the image? "))?;
        Ok(Target { path: real, existing: Some((file, meta)) })
    }
}

/// Same file (by identity if both exist, else by path)?
fn same_file(a: &(PathBuf, Option<fs::Metadata>), b: &(PathBuf, Option<fs::Metadata>)) -> bool {
    match (&a.1, &b.1) {
        (Some(x), Some(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => a.0 == b.0,
    }
}

/// A temporary file beside a target; removed when dropped unless installed.
struct Temp {
    path: PathBuf,
    file: Option<File>,
    installed: bool,
}

impl Drop for Temp {
    fn drop(&mut self) {
        if !self.installed {
            drop(self.file.take());
            let _ = fs::remove_file(&self.path);
        }
    }
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Temp {
    /// A new empty file in the target's folder (with the existing file's permissions).
    fn beside(target: &Target, what: &str) -> Result<Temp> {
        let dir = match target.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = target.path.file_name().map_or_else(|| "image".into(), |n| n.to_string_lossy().into_owned());
        loop {
            let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
            let path = dir.join(format!(".{name}.qcowrs-{}-{n}.tmp", std::process::id()));
            match fs::OpenOptions::new().read(true).write(true).create_new(true).mode(NEW_FILE_MODE).open(&path) {
                Ok(file) => {
                    let t = Temp { path, file: Some(file), installed: false };
                    if let Some((_, meta)) = &target.existing {
                        let mode = fs::Permissions::from_mode(meta.permissions().mode() & 0o7777);
                        fs::set_permissions(&t.path, mode)
                            .ctx(|| format!("copying the permissions of {what} '{}'", target.path.display()))?;
                    }
                    return Ok(t);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(Error::io(format!("Could not create {what} in '{}'", dir.display()), e)),
            }
        }
    }

    fn file(&self) -> Result<&File> {
        self.file.as_ref().ok_or_else(|| Error::InvalidArgument("temporary file closed".into()))
    }

    /// Puts the file in place of `target` (replacing it, or refusing if it appeared meanwhile
    /// when `overwrite` is false).
    fn install(&mut self, target: &Target, overwrite: bool, what: &str) -> Result<()> {
        let ctx = || format!("putting the new {what} in place at '{}'", target.path.display());
        if overwrite {
            fs::rename(&self.path, &target.path).ctx(ctx)?;
        } else {
            fs::hard_link(&self.path, &target.path).ctx(ctx)?;
            let _ = fs::remove_file(&self.path);
        }
        self.installed = true;
        Ok(())
    }
}

/// A file as a place to write a layout, as QEMU's file driver grows it.
struct FileSink<'a>(&'a File);

impl Sink for FileSink<'_> {
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(self.0, buf, offset)
    }
    fn grow(&self, e: Extend) -> std::io::Result<()> {
        match e.mode {
            Grow::Truncate => self.0.set_len(e.to),
            Grow::Fallocate => {
                let len = i64::try_from(e.to - e.from).map_err(|_| std::io::Error::from_raw_os_error(libc::EFBIG))?;
                let from = i64::try_from(e.from).map_err(|_| std::io::Error::from_raw_os_error(libc::EFBIG))?;
                nix::fcntl::posix_fallocate(self.0, from, len).map_err(std::io::Error::from)
            }
            Grow::WriteZeros => {
                // As file-posix: the final size first, zeros over the new range, fsync.
                self.0.set_len(e.to)?;
                layout::write_zeros(self, e.from, e.to - e.from)?;
                self.0.sync_all()
            }
        }
    }
    fn sync(&self) -> std::io::Result<()> {
        self.0.sync_data()
    }
}

/// fsync of the folder holding `path`, so that a rename in it is durable.
fn sync_dir(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir).and_then(|d| d.sync_all()).ctx(|| format!("syncing the folder '{}'", dir.display()))
}

/// Writes the planned image (and data file) to temporary files, syncs them, renames them
/// over `path` (and the data file) and returns the image file, opened read-write and locked.
pub(super) fn install(path: &Path, opts: &CreateOptions, plan: &Plan) -> Result<File> {
    // The new image is returned open with its backing chain, which an open locks (read-only)
    // as QEMU does: a chain that cannot be opened so (a VM writing the backing file) is
    // refused now, before anything changes, rather than after the image replaced `path`.
    if let (Some(name), false) = (&opts.backing_file, opts.unsafe_backing) {
        drop(crate::backing::open_backing(path, name, opts.backing_format.as_deref(), &[], false)?);
    }
    let image = Target::locate(path, "image", opts.overwrite)?;
    let data = match &plan.data_path {
        Some(p) => Some((p.as_path(), Target::locate(p, "data file", opts.overwrite)?)),
        None => None,
    };
    if data.as_ref().is_some_and(|d| same_file(&d.1, &image)) {
        return Err(Error::InvalidArgument(format!(
            "data_file: the external data file is the image itself ('{}')",
            path.display()
        )));
    }
    let image = Target::lock(path, image.0, image.1, "image")?;
    let data = match data {
        Some((p, (real, meta))) => Some(Target::lock(p, real, meta, "data file")?),
        None => None,
    };
    let mut image_tmp = Temp::beside(&image, "image")?;
    let mut data_tmp = match &data {
        Some(t) => Some((Temp::beside(t, "data file")?, t)),
        None => None,
    };
    let file = image_tmp.file()?;
    crate::lock::lock_image(file, true, &format!("'{}'", path.display()))?;
    let data_file = match &data_tmp {
        Some((tmp, _)) => Some(tmp.file()?),
        None => None,
    };
    let data_sink = data_file.map(FileSink);
    plan.layout
        .write(&FileSink(file), &plan.header, data_sink.as_ref().map(|s| s as &dyn Sink))
        .ctx(|| format!("writing the new image '{}'", path.display()))?;
    file.sync_all().ctx(|| format!("syncing the new image '{}'", path.display()))?;
    if let Some(f) = data_file {
        f.sync_all().ctx(|| "syncing the new data file".to_string())?;
    }
    if let Some((tmp, target)) = data_tmp.as_mut() {
        tmp.install(target, opts.overwrite, "data file")?;
        sync_dir(&target.path)?;
    }
    image_tmp.install(&image, opts.overwrite, "image")?;
    sync_dir(&image.path)?;
    // The data file's temporary handle goes (the image's open locks the data file again).
    drop(data_tmp);
    image_tmp.file.take().ok_or_else(|| Error::InvalidArgument("temporary file closed".into()))
}
