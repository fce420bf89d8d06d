//! qcowrs: qcow2 disk images — read, write, check and repair.
//!
//! The crate mirrors the pieces of crosvm's qcow crate that rebuild reference counts
//! (`QcowRawFile`, the pointer-table reader, `rebuild_refcounts`) and builds a full qcow2
//! backend around them. It is usable without Python:
//!
//! ```no_run
//! use std::io::Read;
//! let mut disk = qcowrs::QcowFile::open_read_only("disk.qcow2")?;
//! let mut boot_sector = [0u8; 512];
//! disk.read_exact(&mut boot_sector)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! With the `python` feature, `rust/src/python/` exposes it as the `qcowrs._qcowrs` module.

pub mod bitmap;
pub mod cache;
pub mod check;
pub mod compression;
pub mod error;
pub mod format;
pub mod header;
pub mod lock;
pub mod mapping;
pub mod qcow_file;
pub mod raw_file;
pub mod rebuild;
pub mod refcount;
pub mod snapshot;

#[cfg(feature = "python")]
mod python;

pub use check::{check_path, CheckReport, Repair};
pub use error::{Error, Result};
pub use header::QcowHeader;
pub use mapping::ClusterMapping;
pub use qcow_file::{OpenOptions, QcowFile};
pub use raw_file::QcowRawFile;
