//! The only mapping from [`Error`] to Python exceptions. The classes are defined in
//! `python/qcowrs/_errors.py` and imported here.

use pyo3::exceptions::PyPermissionError;
use pyo3::PyErr;

use crate::error::Error;

pyo3::import_exception!(qcowrs._errors, QcowError);
pyo3::import_exception!(qcowrs._errors, InvalidMagic);
pyo3::import_exception!(qcowrs._errors, UnsupportedVersion);
pyo3::import_exception!(qcowrs._errors, UnsupportedFeature);
pyo3::import_exception!(qcowrs._errors, InvalidClusterSize);
pyo3::import_exception!(qcowrs._errors, InvalidOffset);
pyo3::import_exception!(qcowrs._errors, InvalidRefcountTableSize);
pyo3::import_exception!(qcowrs._errors, InvalidClusterIndex);
pyo3::import_exception!(qcowrs._errors, CorruptImage);
pyo3::import_exception!(qcowrs._errors, RefcountRebuildRequired);

impl From<Error> for PyErr {
    fn from(e: Error) -> PyErr {
        let msg = e.to_string();
        match e {
            Error::InvalidMagic(_) => InvalidMagic::new_err(msg),
            Error::UnsupportedVersion(_) => UnsupportedVersion::new_err(msg),
            Error::UnsupportedFeature(_) => UnsupportedFeature::new_err(msg),
            Error::InvalidClusterSize(_) => InvalidClusterSize::new_err(msg),
            Error::InvalidOffset { .. } => InvalidOffset::new_err(msg),
            Error::InvalidRefcountTableSize(_) => InvalidRefcountTableSize::new_err(msg),
            Error::InvalidClusterIndex(_) => InvalidClusterIndex::new_err(msg),
            Error::CorruptImage { .. } => CorruptImage::new_err(msg),
            Error::RefcountRebuildRequired(_) => RefcountRebuildRequired::new_err(msg),
            Error::ReadOnly(_) => PyPermissionError::new_err(msg),
            // OSError(EAGAIN, ...) like a lock conflict anywhere else.
            Error::Locked(_) => QcowError::new_err((libc::EAGAIN, msg)),
            Error::Io { source, .. } => match source.raw_os_error() {
                // OSError(errno, strerror): `e.errno` works as for any OS error.
                Some(errno) => QcowError::new_err((errno, msg)),
                None => QcowError::new_err(msg),
            },
        }
    }
}

/// Recovers our [`Error`] from an `io::Error` made by the `Read`/`Write`/`Seek` impls.
#[allow(dead_code)]
pub(crate) fn from_io(e: std::io::Error) -> PyErr {
    if e.get_ref().is_some_and(|r| r.is::<Error>()) {
        if let Some(Ok(inner)) = e.into_inner().map(|b| b.downcast::<Error>()) {
            return (*inner).into();
        }
        return QcowError::new_err("I/O error");
    }
    Error::io("I/O", e).into()
}
