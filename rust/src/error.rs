//! The one error type of the crate.
//!
//! Every variant names the field or structure at fault and, where there is one, its offset in
//! the host file (hex). The variants map 1:1 onto the Python exception classes of
//! `python/qcowrs/_errors.py`.

use std::io;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while opening, reading, writing, checking or repairing an image.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The file does not start with `QFI\xfb`.
    #[error("{0}")]
    InvalidMagic(String),
    /// The header version is neither 2 nor 3 (1 is qcow version 1: read by `convert`, `info`
    /// and as a backing file, not by `QcowFile`).
    #[error("{}", unsupported_version(*.0))]
    UnsupportedVersion(u32),
    /// A feature qcowrs does not implement (encryption, unknown incompatible bits, ...).
    #[error("unsupported feature: {0}")]
    UnsupportedFeature(String),
    /// `cluster_bits` out of range.
    #[error("{0}")]
    InvalidClusterSize(String),
    /// A misaligned offset, or a table outside the file.
    #[error("{field} 0x{offset:x} {reason}")]
    InvalidOffset {
        /// The field or structure whose offset is wrong.
        field: String,
        /// The offending offset.
        offset: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// The refcount table is empty, too large, or cannot describe the file.
    #[error("{0}")]
    InvalidRefcountTableSize(String),
    /// A cluster index outside what the structure can describe.
    #[error("{0}")]
    InvalidClusterIndex(String),
    /// Inconsistent metadata, or an image marked corrupt.
    #[error("corrupt image: {what} (at 0x{offset:x})")]
    CorruptImage {
        /// What is inconsistent.
        what: String,
        /// Where (host offset, or header offset for header fields).
        offset: u64,
    },
    /// The refcounts cannot be trusted: a write needs a rebuild first.
    #[error("refcount rebuild required: {0}")]
    RefcountRebuildRequired(String),
    /// Another process (QEMU or qcowrs) uses the image in a conflicting way.
    #[error("image locked: {0}")]
    ImageLocked(String),
    /// The operation needs an image opened read-write.
    #[error("image is opened read-only: {0}")]
    ReadOnlyImage(String),
    /// An argument out of range or options that contradict each other (Python: `ValueError`):
    /// the caller's mistake, not the image's.
    #[error("{0}")]
    InvalidArgument(String),
    /// An I/O error from the operating system, with what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What qcowrs was doing.
        context: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

fn unsupported_version(v: u32) -> String {
    if v == 1 {
        "unsupported qcow2 version 1 (field 'version' at header offset 0x4): this is a qcow version 1 image, which QcowFile does not open; qcowrs reads it read-only through convert (qcowrs.convert / qcowrs convert -f qcow), info, and as a backing file".into()
    } else {
        format!("unsupported qcow2 version {v} (field 'version' at header offset 0x4); only 2 and 3 exist")
    }
}

impl Error {
    /// An I/O error with context ("reading L2 table at 0x40000").
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io { context: context.into(), source }
    }

    /// A corruption at a host offset.
    pub fn corrupt(what: impl Into<String>, offset: u64) -> Self {
        Error::CorruptImage { what: what.into(), offset }
    }

    /// The same error with `prefix` before its message ("Could not open 'x': ...").
    #[must_use]
    pub fn prefixed(self, prefix: &str) -> Self {
        let p = |s: String| format!("{prefix}{s}");
        match self {
            Error::InvalidMagic(s) => Error::InvalidMagic(p(s)),
            Error::UnsupportedFeature(s) => Error::UnsupportedFeature(p(s)),
            Error::InvalidClusterSize(s) => Error::InvalidClusterSize(p(s)),
            Error::InvalidRefcountTableSize(s) => Error::InvalidRefcountTableSize(p(s)),
            Error::InvalidClusterIndex(s) => Error::InvalidClusterIndex(p(s)),
            Error::RefcountRebuildRequired(s) => Error::RefcountRebuildRequired(p(s)),
            Error::ImageLocked(s) => Error::ImageLocked(p(s)),
            Error::ReadOnlyImage(s) => Error::ReadOnlyImage(p(s)),
            Error::InvalidArgument(s) => Error::InvalidArgument(p(s)),
            Error::CorruptImage { what, offset } => Error::CorruptImage { what: p(what), offset },
            Error::InvalidOffset { field, offset, reason } => Error::InvalidOffset { field: p(field), offset, reason },
            Error::Io { context, source } => Error::Io { context: p(context), source },
            other @ Error::UnsupportedVersion(_) => other,
        }
    }

    /// A bad offset in a named field.
    pub fn offset(field: impl Into<String>, offset: u64, reason: impl Into<String>) -> Self {
        Error::InvalidOffset { field: field.into(), offset, reason: reason.into() }
    }
}

/// Lets `Read`/`Write`/`Seek` carry the full error; recover it with `io::Error::get_ref` and a
/// downcast to [`Error`].
impl From<Error> for io::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Io { source, context } => io::Error::new(source.kind(), Error::Io { context, source }),
            Error::ReadOnlyImage(_) => io::Error::new(io::ErrorKind::PermissionDenied, e),
            Error::ImageLocked(_) => io::Error::new(io::ErrorKind::ResourceBusy, e),
            Error::InvalidArgument(_) => io::Error::new(io::ErrorKind::InvalidInput, e),
            Error::UnsupportedFeature(_) | Error::UnsupportedVersion(_) => {
                io::Error::new(io::ErrorKind::Unsupported, e)
            }
            other => io::Error::new(io::ErrorKind::InvalidData, other),
        }
    }
}

/// Extension to attach context to `io::Result`s.
pub(crate) trait IoContext<T> {
    /// Converts an `io::Error` into [`Error::Io`] with a lazily built context.
    fn ctx<F: FnOnce() -> String>(self, f: F) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx<F: FnOnce() -> String>(self, f: F) -> Result<T> {
        self.map_err(|e| {
            // An `io::Error` that already wraps our own error keeps it.
            if e.get_ref().is_some_and(|inner| inner.is::<Error>()) {
                match e.into_inner().map(|b| b.downcast::<Error>()) {
                    Some(Ok(inner)) => *inner,
                    Some(Err(other)) => Error::io(f(), io::Error::other(other)),
                    None => Error::io(f(), io::Error::other("unknown I/O error")),
                }
            } else {
                Error::io(f(), e)
            }
        })
    }
}
