//! `qemu-img compare`: whether two images (qcow2 with their chains, or raw) show the guest
//! the same content, and where they first differ, with qemu-img's answers.
//!
//! QEMU's loop (`img_compare`, checked against qemu-img 10), reproduced step for step because
//! its answers depend on it:
//!
//! * Both images are asked their block status at the offset (`status.rs`: QEMU's exact flags
//!   and lengths over the whole chain); the step is the shorter answer. Where both read as
//!   zeros nothing is read. Where both are allocated, both are read (at most 2 MiB a step) and
//!   compared 512 bytes at a time; where only one is, it is read and must be zeros. A
//!   difference is reported at the start of the first differing 512-byte sector *counted from
//!   the step's start* (which is sector aligned except after the odd end of a raw file).
//! * Strict mode (`-s`): images of different sizes differ ("Image size mismatch"); and at every
//!   step the two block statuses must be equal, every flag included (allocated, offset-valid,
//!   EOF...), so a qcow2 and a raw image, or identical empty images with different cluster
//!   sizes, differ in strict mode.
//! * Otherwise the common part is compared, then the rest of the longer image must read as
//!   zeros (only what it allocates as data is read).
//!
//! Where QEMU's answers are many and say nothing (a stretch of empty L1 entries is answered
//! one L2 slice, at most `INT_MAX` bytes, at a time: 2^31 answers for an empty 2^61-byte
//! disk), they are not walked: without `-s` the stretch is answered whole (only what reads as
//! zeros matters there), with `-s` the one thing that can differ, the EOF flag, is computed
//! (`first_eof_mismatch`). An L1 table naming one L2 table twice is refused: its few
//! clusters would describe more guest data than the file holds.
//!
//! The steps are produced by one walker (block status is cheap); workers on every core take
//! them in order, read both images (`&self` reads, in parallel) and compare; the first step
//! (in guest order) that differs wins, and no step after it is started. Unallocated ranges
//! are never read, so two sparse 1 TiB images with a few MiB of data compare in milliseconds.

use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex, PoisonError};
use std::time::Duration;

use crate::backing::{open_image_any, BackingRead};
use crate::error::{Error, Result};
use crate::format::QCOW_MAGIC;

mod status;

use status::{Chain, Flags};

/// qemu-img compares at most this much in one step (`IO_BUF_SIZE`).
const STEP: u64 = 2 << 20;
/// Differences are found 512 bytes at a time, as QEMU's `compare_buffers`/`find_nonzero`.
const SECTOR: usize = 512;
/// Formats QEMU knows and qcowrs does not read (an unknown name is QEMU's "Unknown driver").
const OTHER_QEMU_FORMATS: &[&str] = &[
    "bochs",
    "cloop",
    "dmg",
    "file",
    "host_device",
    "luks",
    "parallels",
    "qed",
    "vdi",
    "vhdx",
    "vmdk",
    "vpc",
    "vvfat",
];

/// Options of [`compare`], with `qemu-img compare`'s defaults.
#[derive(Clone, Debug, Default)]
pub struct CompareOptions {
    /// `-s`: sizes and block status must match too.
    pub strict: bool,
    /// `-f`: the first image's format (`None`: probed; "qcow2" or "raw").
    pub format_a: Option<String>,
    /// `-F`: the second image's format.
    pub format_b: Option<String>,
    /// `-U`: open images another process holds.
    pub force_share: bool,
    /// Worker threads; 0 = one per core.
    pub threads: usize,
}

/// What [`compare`] found, each with the line qemu-img prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// "Images are identical." (after "Warning: Image size mismatch!" when sizes differ).
    Identical,
    /// "Content mismatch at offset N!": the start of the first differing 512-byte sector.
    ContentMismatch(u64),
    /// Strict: "Strict mode: Image size mismatch!".
    SizeMismatch,
    /// Strict: "Strict mode: Offset N block status mismatch!".
    StatusMismatch(u64),
}

/// The result of [`compare`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Comparison {
    /// What was found.
    pub outcome: Outcome,
    /// The images' sizes as QEMU sees them (qcow2: whole sectors of the virtual size; raw:
    /// the file rounded up to a sector).
    pub sizes: [u64; 2],
}

/// Where a comparison failed: qemu-img's exit code differs (2, 3, 4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Opening an image (qemu-img: 2).
    Open,
    /// Asking an image's block status (qemu-img: 3, "Sector allocation test failed").
    Status,
    /// Reading an image (qemu-img: 4, "Error while reading offset N"), or a stop asked by
    /// the progress callback.
    Read,
}

/// A failed comparison: the error and where it happened.
#[derive(Debug)]
pub struct CompareError {
    /// Where.
    pub stage: Stage,
    /// What.
    pub error: Error,
}

impl From<CompareError> for Error {
    fn from(e: CompareError) -> Error {
        e.error
    }
}

impl std::fmt::Display for CompareError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for CompareError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

/// Progress callback: `(bytes done, bytes to do)`; an error stops the comparison and is
/// returned.
pub type Progress<'a> = &'a (dyn Fn(u64, u64) -> Result<()> + Sync);

/// Opens one image read-only as qemu-img does, with its messages.
fn open_image(path: &Path, format: Option<&str>, force_share: bool) -> Result<Box<dyn BackingRead>> {
    let name = path.display();
    match format {
        None | Some("qcow2" | "qcow" | "raw") => {}
        Some(f) if OTHER_QEMU_FORMATS.contains(&f) => {
            return Err(Error::UnsupportedFeature(format!(
                "Could not open '{name}': format '{f}': qcowrs reads qcow2, qcow and raw images"
            )))
        }
        Some(f) => return Err(Error::InvalidArgument(format!("Could not open '{name}': Unknown driver '{f}'"))),
    }
    let prefix = format!("Could not open '{name}': ");
    let os_error = |e| Error::io(format!("{prefix}Could not open '{name}'"), e);
    let meta = std::fs::metadata(path).map_err(os_error)?;
    if format == Some("qcow2") && (meta.is_file() || meta.file_type().is_block_device()) {
        let mut magic = [0u8; 4];
        let file = std::fs::File::open(path).map_err(os_error)?;
        if file.read_exact_at(&mut magic, 0).is_err() || u32::from_be_bytes(magic) != QCOW_MAGIC {
            return Err(Error::InvalidMagic(format!("{prefix}Image is not in qcow2 format")));
        }
    }
    open_image_any(path, format, force_share).map_err(|e| match e {
        // "image locked: 'x' is in use: ..." says it all.
        Error::ImageLocked(_) => e,
        e => e.prefixed(&prefix),
    })
}

/// Compares `a` and `b` like `qemu-img compare [-s] [-f FMT] [-F FMT] [-U] a b` (see the
/// module documentation). Neither image is written.
pub fn compare(a: &Path, b: &Path, opts: &CompareOptions, progress: Progress<'_>) -> Result<Comparison, CompareError> {
    let opened = |p: &Path, f: Option<&String>| {
        open_image(p, f.map(String::as_str), opts.force_share)
            .map_err(|error| CompareError { stage: Stage::Open, error })
    };
    let image_a = opened(a, opts.format_a.as_ref())?;
    let image_b = opened(b, opts.format_b.as_ref())?;
    let chains = [chain(&*image_a)?, chain(&*image_b)?];
    let sizes = [chains[0].len(), chains[1].len()];
    if opts.strict && sizes[0] != sizes[1] {
        return Ok(Comparison { outcome: Outcome::SizeMismatch, sizes });
    }
    let walk = Walk::new(chains, opts.strict);
    let images: [&dyn BackingRead; 2] = [&*image_a, &*image_b];
    let names = [a.display().to_string(), b.display().to_string()];
    let outcome = run(walk, images, &names, opts.threads, progress)?;
    Ok(Comparison { outcome, sizes })
}

fn chain(image: &dyn BackingRead) -> Result<Chain<'_>, CompareError> {
    Chain::new(image).map_err(|error| CompareError { stage: Stage::Open, error })
}

/// What a step needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Check {
    /// Both images are read and compared.
    Both,
    /// This image is read and must be zeros (the other reads as zeros there).
    Zeros(usize),
}

/// A step of QEMU's loop that reads.
#[derive(Clone, Copy, Debug)]
struct Step {
    start: u64,
    len: u64,
    check: Check,
}

/// What ends a comparison at a step.
#[derive(Debug)]
enum Found {
    Mismatch(u64),
    StatusMismatch(u64),
    Failed(Stage, Error),
}

/// QEMU's loop, one step at a time (the block statuses, no reads).
struct Walk<'a> {
    chains: [Chain<'a>; 2],
    sizes: [u64; 2],
    strict: bool,
    offset: u64,
    /// Index of the next step or stop.
    index: usize,
    done: bool,
    /// Strict mode computes its way over stretches of empty L1 entries (tests compare it
    /// with the walk).
    skip_empty_stretches: bool,
}

impl<'a> Walk<'a> {
    fn new(chains: [Chain<'a>; 2], strict: bool) -> Self {
        let sizes = [chains[0].len(), chains[1].len()];
        Walk { chains, sizes, strict, offset: 0, index: 0, done: false, skip_empty_stretches: true }
    }

    /// Strict, both images without backing files and in stretches of empty L1 entries: QEMU
    /// answers a slice (or `INT_MAX` bytes) at a time, all with the same flags but EOF, so its
    /// loop is computed rather than walked (a 2^61-byte disk has 2^31 such answers): the
    /// first offset where only one answer has EOF, or the end of the stretches.
    fn skip_strict_stretch(&mut self) -> Option<Result<Option<Step>, Found>> {
        let off = self.offset;
        let a = self.chains[0].empty_stretch(off)?;
        let b = self.chains[1].empty_stretch(off)?;
        if let Some(q) = first_eof_mismatch(off, a, b, self.sizes[0]) {
            return Some(Err(Found::StatusMismatch(q)));
        }
        self.offset = a.0.min(b.0);
        Some(Ok(None))
    }

    /// The next step that reads, or what stops the comparison (`None` at the end). `walked`
    /// follows the offset.
    fn next(&mut self, walked: &AtomicU64, names: &[String; 2]) -> Option<(usize, Result<Step, Found>)> {
        while !self.done && self.offset < self.sizes[0].max(self.sizes[1]) {
            let r = self.advance(names);
            walked.store(self.offset, Ordering::Relaxed);
            match r {
                Ok(Some(step)) => {
                    self.index += 1;
                    return Some((self.index - 1, Ok(step)));
                }
                Ok(None) => {}
                Err(found) => {
                    self.done = true;
                    return Some((self.index, Err(found)));
                }
            }
        }
        self.done = true;
        None
    }

    fn status(&mut self, i: usize, names: &[String; 2]) -> Result<(Flags, u64), Found> {
        let off = self.offset;
        // Without -s only what reads as zeros matters: stretches of empty L1 entries are
        // answered whole (QEMU answers them a slice at a time, which changes nothing here).
        let r = self.chains[i].status(off, self.sizes[i] - off, !self.strict).and_then(|(f, n)| {
            if n == 0 {
                Err(Error::corrupt(format!("no block status at guest offset 0x{off:x}"), 0))
            } else {
                Ok((f, n))
            }
        });
        r.map_err(|e| {
            Found::Failed(Stage::Status, e.prefixed(&format!("Sector allocation test failed for {}: ", names[i])))
        })
    }

    /// One turn of QEMU's loop: a step to read, or `None` after a range both read as zeros
    /// (the offset moved on).
    fn advance(&mut self, names: &[String; 2]) -> Result<Option<Step>, Found> {
        let off = self.offset;
        let common = self.sizes[0].min(self.sizes[1]);
        let (check, len) = if off < common {
            let (s1, n1) = self.status(0, names)?;
            let (s2, n2) = self.status(1, names)?;
            if self.strict && s1 != s2 {
                return Err(Found::StatusMismatch(off));
            }
            if self.strict && s1 == Flags::ZERO && self.skip_empty_stretches {
                if let Some(skip) = self.skip_strict_stretch() {
                    return skip;
                }
            }
            let (a1, a2) = (s1.has(Flags::ALLOCATED), s2.has(Flags::ALLOCATED));
            let check = if s1.has(Flags::ZERO) && s2.has(Flags::ZERO) {
                None
            } else if a1 == a2 {
                a1.then_some(Check::Both)
            } else {
                Some(Check::Zeros(usize::from(a2)))
            };
            (check, n1.min(n2))
        } else {
            // The rest of the longer image must read as zeros.
            let over = usize::from(self.sizes[1] > self.sizes[0]);
            let (s, n) = self.status(over, names)?;
            let data = s.has(Flags::ALLOCATED) && !s.has(Flags::ZERO);
            (data.then_some(Check::Zeros(over)), n)
        };
        match check {
            Some(check) => {
                let len = len.min(STEP);
                self.offset = off + len;
                Ok(Some(Step { start: off, len, check }))
            }
            None => {
                self.offset = off + len;
                Ok(None)
            }
        }
    }
}

/// QEMU's loop over two images of `len` bytes without backing files, both in stretches of
/// empty L1 entries from `x` (`(end, slice bytes)` each): the first offset it asks at which
/// exactly one answer reaches the end (EOF), if that comes before the first stretch ends.
/// Answers there end at the next slice boundary of either image or after `INT_MAX` bytes; an
/// answer has EOF from the start of the image's last slice on, and no more than `INT_MAX`
/// bytes before the end.
fn first_eof_mismatch(x: u64, a: (u64, u64), b: (u64, u64), len: u64) -> Option<u64> {
    let end = a.0.min(b.0);
    let eof_from = |(e, p): (u64, u64)| {
        if e == len {
            ((len - 1) / p * p).max(len.saturating_sub(status::QCOW2_MAX_BYTES))
        } else {
            u64::MAX
        }
    };
    let (ta, tb) = (eof_from(a), eof_from(b));
    let t = ta.min(tb);
    if t >= end {
        return None;
    }
    let q = first_asked_from(x, t, a.1.min(b.1)).min(end);
    (q < end && (q >= ta) != (q >= tb)).then_some(q)
}

/// The first offset at or after `t` that QEMU's loop asks, from `x`, where every answer ends
/// at the next multiple of `p` (slices are powers of two: the smaller one's multiples hold
/// the larger one's) or `INT_MAX` bytes on.
fn first_asked_from(x: u64, t: u64, p: u64) -> u64 {
    let cap = status::QCOW2_MAX_BYTES;
    if t <= x {
        x
    } else if p <= cap {
        t.div_ceil(p).saturating_mul(p)
    } else {
        let anchor = x.max(t / p * p);
        let next_slice = (anchor / p + 1).saturating_mul(p);
        (anchor + (t - anchor).div_ceil(cap) * cap).min(next_slice)
    }
}

/// The earliest finding, by step index.
struct Best {
    index: AtomicUsize,
    found: Mutex<Option<(usize, Found)>>,
}

impl Best {
    fn record(&self, index: usize, found: Found) {
        let mut best = self.found.lock().unwrap_or_else(PoisonError::into_inner);
        if best.as_ref().is_none_or(|(i, _)| index < *i) {
            *best = Some((index, found));
            self.index.fetch_min(index, Ordering::Relaxed);
        }
    }
}

/// Everything the workers share.
struct Shared<'a, 'w> {
    walk: Mutex<Walk<'w>>,
    images: [&'a dyn BackingRead; 2],
    names: &'a [String; 2],
    best: Best,
    /// Bytes of completed steps.
    completed: AtomicU64,
    /// How far the walk has gone, steps in flight included.
    walked: AtomicU64,
    /// Bytes of the steps handed out.
    handed: AtomicU64,
    stop: AtomicBool,
}

impl Shared<'_, '_> {
    fn work(&self) {
        let mut bufs = [Vec::new(), Vec::new()];
        while !self.stop.load(Ordering::Relaxed) {
            let next = self.walk.lock().unwrap_or_else(PoisonError::into_inner).next(&self.walked, self.names);
            let Some((index, step)) = next else { break };
            if index > self.best.index.load(Ordering::Relaxed) {
                break;
            }
            let step = match step {
                Ok(step) => step,
                Err(found) => {
                    self.best.record(index, found);
                    break;
                }
            };
            self.handed.fetch_add(step.len, Ordering::Relaxed);
            match self.examine(step, &mut bufs) {
                None => {
                    self.completed.fetch_add(step.len, Ordering::Relaxed);
                }
                Some(found) => self.best.record(index, found),
            }
        }
    }

    /// Reads a step and compares: the first differing sector, counted from the step's start.
    fn examine(&self, step: Step, bufs: &mut [Vec<u8>; 2]) -> Option<Found> {
        let len = usize::try_from(step.len).unwrap_or(0);
        let read = |i: usize, buf: &mut Vec<u8>| {
            buf.resize(len, 0);
            self.images[i].read_into(buf, step.start).map_err(|e| {
                let prefix = format!("Error while reading offset {} of {}: ", step.start, self.names[i]);
                Found::Failed(Stage::Read, e.prefixed(&prefix))
            })
        };
        let [b0, b1] = bufs;
        let sector = match step.check {
            Check::Both => {
                if let Err(f) = read(0, b0).and_then(|()| read(1, b1)) {
                    return Some(f);
                }
                b0.chunks(SECTOR).zip(b1.chunks(SECTOR)).position(|(x, y)| x != y)
            }
            Check::Zeros(i) => {
                let buf = if i == 0 { b0 } else { b1 };
                if let Err(f) = read(i, buf) {
                    return Some(f);
                }
                buf.chunks(SECTOR).position(|c| !is_zero(c))
            }
        };
        sector.map(|k| Found::Mismatch(step.start + (k * SECTOR) as u64))
    }
}

/// Whether `b` is all zeros (eight bytes at a time).
fn is_zero(b: &[u8]) -> bool {
    let mut words = b.chunks_exact(8);
    let mut acc = 0u64;
    for w in &mut words {
        acc |= u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
    }
    acc == 0 && words.remainder().iter().all(|&x| x == 0)
}

/// Runs the walk with workers and reports progress from this thread.
fn run(
    walk: Walk<'_>,
    images: [&dyn BackingRead; 2],
    names: &[String; 2],
    threads: usize,
    progress: Progress<'_>,
) -> Result<Outcome, CompareError> {
    let workers =
        if threads == 0 { std::thread::available_parallelism().map_or(2, std::num::NonZero::get) } else { threads };
    let total = walk.sizes[0].max(walk.sizes[1]);
    let shared = Shared {
        walk: Mutex::new(walk),
        images,
        names,
        best: Best { index: AtomicUsize::new(usize::MAX), found: Mutex::new(None) },
        completed: AtomicU64::new(0),
        walked: AtomicU64::new(0),
        handed: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    };
    let stopped = std::thread::scope(|scope| {
        let (tx, rx) = mpsc::channel::<()>();
        for _ in 0..workers {
            let (tx, shared) = (tx.clone(), &shared);
            scope.spawn(move || {
                shared.work();
                tx.send(()).ok();
            });
        }
        drop(tx);
        report_until_done(&shared, &rx, workers, total, progress)
    });
    if let Err(error) = stopped {
        return Err(CompareError { stage: Stage::Read, error });
    }
    let found = shared.best.found.into_inner().unwrap_or_else(PoisonError::into_inner);
    match found {
        None => Ok(Outcome::Identical),
        Some((_, Found::Mismatch(off))) => Ok(Outcome::ContentMismatch(off)),
        Some((_, Found::StatusMismatch(off))) => Ok(Outcome::StatusMismatch(off)),
        Some((_, Found::Failed(stage, error))) => Err(CompareError { stage, error }),
    }
}

/// Calls `progress` from time to time until every worker is done; a stop it asks for stops
/// the workers.
fn report_until_done(
    shared: &Shared<'_, '_>,
    rx: &mpsc::Receiver<()>,
    workers: usize,
    total: u64,
    progress: Progress<'_>,
) -> Result<()> {
    let mut running = workers;
    let mut result = Ok(());
    while running > 0 {
        if result.is_ok() {
            // Done: what the walk skipped plus the steps completed (steps in flight are not).
            let walked = shared.walked.load(Ordering::Relaxed);
            let in_flight = shared.handed.load(Ordering::Relaxed) - shared.completed.load(Ordering::Relaxed);
            result = progress(walked.saturating_sub(in_flight).min(total), total);
            if result.is_err() {
                shared.stop.store(true, Ordering::Relaxed);
            }
        }
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(()) => running -= 1,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    result?;
    progress(total, total)
}

#[cfg(test)]
mod tests;
