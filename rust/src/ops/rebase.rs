//! `qemu-img rebase`: an overlay moved onto another backing file (or none).
//!
//! Safe mode keeps the guest content: wherever the overlay allocates nothing itself, what the
//! old chain shows is compared with what the new backing file shows, and the clusters that
//! differ are copied into the overlay (from the old chain) before the header names the new
//! backing file. The copies are durable before the header changes, so a crash leaves either
//! the old header (the copies are clusters the old chain already showed: same content) or the
//! new one (the copies in place): the guest content is the same at every point. Unsafe mode
//! (`-u`) changes only the header.

use std::path::Path;

use crate::backing::{open_image_any, resolve_relative, BackingChoice, BackingImage, BackingRead};
use crate::error::{Error, Result};
use crate::format::EXT_BACKING_FORMAT;
use crate::header::HeaderExtension;
use crate::ops::map::map_image;
use crate::qcow_file::{OpenOptions, QcowFile};

/// Bytes compared at a time.
const CHUNK: u64 = 1 << 20;

/// Options of [`rebase`].
#[derive(Clone, Debug, Default)]
pub struct RebaseOptions {
    /// The new backing file name as stored (relative names are relative to the overlay);
    /// empty: no backing file (the overlay becomes standalone).
    pub backing_file: String,
    /// Its format ("qcow2" or "raw"); required with a backing file, as in qemu-img 10.
    pub backing_format: Option<String>,
    /// `-u`: only the header changes.
    pub unsafe_mode: bool,
}

/// Rebases the overlay at `path` (see the module documentation). `progress(done, total)` is
/// called as the comparison goes.
pub fn rebase(path: &Path, opts: &RebaseOptions, progress: &dyn Fn(u64, u64) -> Result<()>) -> Result<()> {
    check_options(opts)?;
    let name = opts.backing_file.as_str();
    let choice = if opts.unsafe_mode { BackingChoice::Disabled } else { BackingChoice::FromHeader };
    let mut f = QcowFile::open(path, OpenOptions { writable: true, backing: choice, ..OpenOptions::default() })?;
    let new = if opts.unsafe_mode || name.is_empty() {
        None
    } else {
        let p = resolve_relative(path, name);
        Some(BackingImage(
            open_image_any(&p, opts.backing_format.as_deref(), false)
                .map_err(|e| Error::InvalidArgument(format!("Could not open new backing file '{name}': {e}")))?,
        ))
    };
    rebase_image(&mut f, new.as_ref(), opts, progress)?;
    f.close()
}

/// Rebases an open overlay (on any storage; [`rebase`] without the opening and closing): `f`
/// is opened writable over its old chain (safe mode) or without it (unsafe mode), `new` is the
/// new backing file already open (`None` with an empty `opts.backing_file`; not used in unsafe
/// mode). When it returns, the copies and the new header are durable.
pub fn rebase_image(
    f: &mut QcowFile,
    new: Option<&BackingImage>,
    opts: &RebaseOptions,
    progress: &dyn Fn(u64, u64) -> Result<()>,
) -> Result<()> {
    check_options(opts)?;
    let name = opts.backing_file.as_str();
    if !opts.unsafe_mode {
        if !name.is_empty() && new.is_none() {
            return Err(Error::InvalidArgument(format!("a safe rebase onto '{name}' needs it open")));
        }
        let new = if name.is_empty() { None } else { new.map(|b| &*b.0) };
        copy_differences(f, new, progress)?;
        f.flush()?;
    }
    f.set_backing(if name.is_empty() { None } else { Some(name) }, opts.backing_format.as_deref())
}

/// qemu-img's checks of the options, before anything is opened.
fn check_options(opts: &RebaseOptions) -> Result<()> {
    let name = opts.backing_file.as_str();
    if !name.is_empty() && opts.backing_format.is_none() {
        return Err(Error::InvalidArgument(format!(
            "Could not change the backing file to '{name}': backing format must be specified"
        )));
    }
    if let Some(f) = opts.backing_format.as_deref() {
        if f != "qcow2" && f != "raw" {
            return Err(Error::InvalidArgument(format!(
                "Unknown backing file format '{f}' (qcowrs reads qcow2 and raw)"
            )));
        }
    }
    Ok(())
}

/// Copies into the overlay every cluster it does not allocate whose content (through the old
/// chain) differs from what `new` shows there.
fn copy_differences(
    f: &mut QcowFile,
    new: Option<&dyn BackingRead>,
    progress: &dyn Fn(u64, u64) -> Result<()>,
) -> Result<()> {
    let cs = f.cluster_size();
    let map = map_image(f, 0, None)?;
    // What the overlay leaves to its backing chain: answered below it (depth > 0), or not
    // allocated by it at all (an image without a backing file answers zeros itself there).
    let below = |e: &&crate::ops::map::MapEntry| e.depth > 0 || !e.present;
    // Ranges left to the chain where the old chain or the new backing file holds data:
    // elsewhere both read zeros and nothing can differ.
    let mut data: Vec<(u64, u64)> =
        map.entries.iter().filter(|e| below(e) && e.data).map(|e| (e.start, e.start + e.length)).collect();
    if let Some(b) = new {
        data.extend(crate::ops::convert::status(b)?.iter().filter(|r| r.data).map(|r| (r.start, r.end)));
    }
    let data = merge(data);
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for e in map.entries.iter().filter(below) {
        let (s, t) = (e.start, e.start + e.length);
        let i = data.partition_point(|&(_, end)| end <= s);
        for &(a, b) in data[i..].iter().take_while(|&&(a, _)| a < t) {
            // Whole clusters: the copy writes clusters.
            let a = ((a.max(s) / cs) * cs).max(s);
            let b = b.min(t).div_ceil(cs).saturating_mul(cs).min(t);
            match ranges.last_mut() {
                Some(last) if last.1 >= a => last.1 = last.1.max(b),
                _ => ranges.push((a, b)),
            }
        }
    }
    let total: u64 = ranges.iter().map(|(s, e)| e - s).sum();
    // The copies are a bulk write flushed at the end: their write-back starts as they go.
    f.set_write_behind();
    let mut done = 0;
    progress(0, total)?;
    let mut old_buf = vec![0u8; usize::try_from(CHUNK).unwrap_or(0)];
    let mut new_buf = vec![0u8; old_buf.len()];
    for (start, end) in ranges {
        let mut off = start;
        while off < end {
            let n = (end - off).min(CHUNK - off % CHUNK);
            let len = usize::try_from(n).unwrap_or(0);
            let got = f.read_at(&mut old_buf[..len], off)?;
            old_buf[got..len].fill(0);
            match new {
                Some(b) => b.read_into(&mut new_buf[..len], off)?,
                None => new_buf[..len].fill(0),
            }
            // Whole clusters that differ are written whole (the range is cluster-aligned but
            // for the disk's last, short cluster).
            let mut i = 0usize;
            while i < len {
                let c_end = ((off + i as u64) / cs + 1) * cs;
                let j = usize::try_from(c_end - off).unwrap_or(len).min(len);
                if old_buf[i..j] != new_buf[i..j] {
                    f.write_at(&old_buf[i..j], off + i as u64)?;
                }
                i = j;
            }
            off += n;
            done += n;
            progress(done, total)?;
        }
    }
    Ok(())
}

/// Sorted, overlapping and touching ranges merged.
fn merge(mut v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (a, b) in v {
        match out.last_mut() {
            Some(last) if last.1 >= a => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

impl QcowFile {
    /// Names `backing` (with `format`) as the backing file in the header, or none, after
    /// everything else is durable. The header area is rewritten so that a crash (torn sectors
    /// included) leaves the old or the new header
    /// ([`QcowHeader::commit_header_area`](crate::header::QcowHeader::commit_header_area)).
    pub(crate) fn set_backing(&mut self, backing: Option<&str>, format: Option<&str>) -> Result<()> {
        if let Some(name) = backing {
            crate::backing::check_plain_file_name(name, "backing file")?;
        }
        self.flush()?;
        let mut h = self.header().clone();
        h.backing_file = backing.map(str::to_string);
        h.extensions.retain(|e| e.kind != EXT_BACKING_FORMAT);
        if let (Some(_), Some(fmt)) = (backing, format) {
            // QEMU keeps the backing format first among the extensions it writes.
            h.extensions.insert(0, HeaderExtension { kind: EXT_BACKING_FORMAT, data: fmt.as_bytes().to_vec() });
        }
        let mut on_disk = self.header().clone();
        on_disk.commit_header_area(self.raw_file(), &h)?;
        self.replace_header(on_disk);
        Ok(())
    }
}
