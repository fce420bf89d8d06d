//! qcowrs: qcow2 disk images — read, write, check and repair.
//!
//! The crate mirrors the pieces of crosvm's qcow crate that rebuild reference counts
//! ([`QcowRawFile`], the pointer-table reader, [`rebuild_refcounts`]) and builds a full qcow2
//! backend around them. It is usable without Python:
//!
//! ```no_run
//! use std::io::Read;
//! let mut disk = qcowrs::QcowFile::open_read_only("disk.qcow2")?;
//! let mut boot_sector = [0u8; 512];
//! disk.read_exact(&mut boot_sector)?;
//! let report = qcowrs::check_path("disk.qcow2".as_ref(), qcowrs::Repair::None, false)?;
//! assert!(report.is_clean());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Images need not be files: [`MemStorage`] holds one in memory, and [`RecordingStorage`]
//! logs every write and sync (for crash-state tests). With the `python` feature,
//! `rust/src/python/` exposes the crate as the `qcowrs._qcowrs` module. `docs/architecture.md`
//! describes the modules.

mod backing;
mod bitmap;
mod cache;
mod check;
mod compression;
mod count;
mod create;
mod error;
pub mod export;
mod format;
mod header;
mod lock;
mod mapping;
pub mod ops;
mod qcow1;
mod qcow_file;
mod raw_file;
mod rebuild;
mod refcount;
mod repair;
mod report;
mod snapshot;
mod storage;
mod walk;

#[cfg(feature = "python")]
mod python;

pub use backing::{BackingChoice, BackingImage};
pub use bitmap::{Bitmap, BitmapEntry};
pub use check::{check_path, check_path_shared, check_raw, Repair};
pub use create::{create_on, CreateOptions};
pub use error::{Error, Result};
pub use header::{field_offset, QcowHeader};
pub use mapping::ReadPlan;
pub use ops::bitmap::{bitmap, bitmap_storage, BitmapAction};
pub use ops::compare::{compare, CompareError, CompareOptions, Comparison, Outcome, Stage};
pub use ops::convert::{convert, ConvertOptions, OutputFormat};
pub use ops::map::{map_image, ImageMap, MapEntry};
pub use ops::measure::{measure, MeasureInput, MeasureOptions, Measurement};
pub use qcow1::{Qcow1File, Qcow1Header};
pub use qcow_file::{OpenOptions, QcowFile};
pub use raw_file::{fail_after_ops, io_ops, QcowRawFile};
pub use rebuild::{rebuild_refcounts, NewStructure};
pub use report::{CheckReport, Counts, Problem, ProblemLog};
pub use snapshot::Snapshot;
pub use storage::{replay, FileStorage, MemStorage, RecordingStorage, Storage, StorageOp};
