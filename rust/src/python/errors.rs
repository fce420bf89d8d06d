//! The only mapping from [`Error`] to Python exceptions. The classes are defined in
//! `python/qcowrs/_errors.py` and imported here.

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
pyo3::import_exception!(qcowrs._errors, ImageLocked);
pyo3::import_exception!(qcowrs._errors, ReadOnlyImage);

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
            // OSError(errno, strerror) like a lock conflict or a write to a read-only file
            // anywhere else.
            Error::ReadOnlyImage(_) => ReadOnlyImage::new_err((libc::EBADF, msg)),
            Error::ImageLocked(_) => ImageLocked::new_err((libc::EAGAIN, msg)),
            // Argument misuse is a ValueError, as Python does it.
            Error::InvalidArgument(_) => pyo3::exceptions::PyValueError::new_err(msg),
            Error::Io { source, .. } => match source.raw_os_error() {
                // OSError(errno, strerror): `e.errno` works as for any OS error.
                Some(errno) => QcowError::new_err((errno, msg)),
                None => QcowError::new_err(msg),
            },
        }
    }
}

/// One value of every `Error` variant, named as the Python class it must become (for the
/// mapping test, `_qcowrs._error_for_test`).
pub(crate) fn sample(name: &str) -> Option<Error> {
    Some(match name {
        "InvalidMagic" => Error::InvalidMagic("field 'magic' at 0x0".into()),
        "UnsupportedVersion" => Error::UnsupportedVersion(9),
        "UnsupportedFeature" => Error::UnsupportedFeature("feature".into()),
        "InvalidClusterSize" => Error::InvalidClusterSize("cluster_bits".into()),
        "InvalidOffset" => Error::offset("l1_table_offset", 0x200, "is not aligned"),
        "InvalidRefcountTableSize" => Error::InvalidRefcountTableSize("refcount_table_clusters".into()),
        "InvalidClusterIndex" => Error::InvalidClusterIndex("cluster".into()),
        "CorruptImage" => Error::corrupt("L2 entry", 0x40000),
        "RefcountRebuildRequired" => Error::RefcountRebuildRequired("stale".into()),
        "ImageLocked" => Error::ImageLocked("in use".into()),
        "ReadOnlyImage" => Error::ReadOnlyImage("read-only".into()),
        "ValueError" => Error::InvalidArgument("cluster_size".into()),
        "QcowError" => Error::io("reading", std::io::Error::from_raw_os_error(libc::EIO)),
        _ => return None,
    })
}
