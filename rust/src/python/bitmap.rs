//! `qcowrs._qcowrs.bitmap` (`ops::bitmap` for Python, the GIL released) and the `Bitmap` class.

use std::path::PathBuf;

use pyo3::prelude::*;

use crate::bitmap::Bitmap;
use crate::ops::bitmap::BitmapAction;

/// One persistent dirty bitmap of an image (a read-only record).
#[pyclass(name = "Bitmap", module = "qcowrs._qcowrs", frozen, eq)]
#[derive(PartialEq, Eq)]
pub struct PyBitmap {
    /// Name.
    #[pyo3(get)]
    name: String,
    /// Bytes of guest disk one bit covers.
    #[pyo3(get)]
    granularity: u64,
    /// Tracks writes (QEMU's "auto" flag).
    #[pyo3(get)]
    enabled: bool,
    /// Flagged in use by a writer that did not close: inconsistent (QEMU's "in-use").
    #[pyo3(get)]
    in_use: bool,
    /// Stored in the image.
    #[pyo3(get)]
    persistent: bool,
}

impl From<Bitmap> for PyBitmap {
    fn from(b: Bitmap) -> Self {
        PyBitmap {
            name: b.name,
            granularity: b.granularity,
            enabled: b.enabled,
            in_use: b.in_use,
            persistent: b.persistent,
        }
    }
}

#[pymethods]
impl PyBitmap {
    fn __repr__(&self) -> String {
        let t = |b: bool| if b { "True" } else { "False" };
        format!(
            "Bitmap(name={:?}, granularity={}, enabled={}, in_use={}, persistent={})",
            self.name,
            self.granularity,
            t(self.enabled),
            t(self.in_use),
            t(self.persistent)
        )
    }
}

/// Runs one `qemu-img bitmap` action on the bitmap `name` of the qcow2 image at `path`:
/// `action` is "add" (with `granularity`, None for QEMU's default), "remove", "clear",
/// "enable", "disable" or "merge" (the bits of the bitmap `source` set in `name` too).
#[pyfunction]
#[pyo3(signature = (path, action, name, *, granularity = None, source = None))]
pub fn bitmap(
    py: Python<'_>,
    path: PathBuf,
    action: &str,
    name: String,
    granularity: Option<u64>,
    source: Option<String>,
) -> PyResult<()> {
    let value_error = |m: &str| Err(pyo3::exceptions::PyValueError::new_err(m.to_string()));
    if granularity.is_some() && action != "add" {
        return value_error("granularity only supported with --add");
    }
    if source.is_some() != (action == "merge") {
        return value_error("source is the bitmap to merge in: only and always with action='merge'");
    }
    let act = match (action, source) {
        ("add", _) => BitmapAction::Add { granularity },
        ("remove", _) => BitmapAction::Remove,
        ("clear", _) => BitmapAction::Clear,
        ("enable", _) => BitmapAction::Enable,
        ("disable", _) => BitmapAction::Disable,
        ("merge", Some(source)) => BitmapAction::Merge { source },
        (other, _) => {
            return value_error(&format!(
                "action must be one of 'add', 'remove', 'clear', 'enable', 'disable', 'merge', not {other:?}"
            ))
        }
    };
    Ok(py.detach(|| crate::ops::bitmap::bitmap(&path, &name, &act))?)
}
