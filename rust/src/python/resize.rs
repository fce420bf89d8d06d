//! `qcowrs._qcowrs.resize`: `ops::resize` for Python (the GIL released).

use std::path::PathBuf;

use pyo3::prelude::*;

use crate::ops::resize::NewSize;

/// Resizes the image at `path` to `size` bytes, or by `delta` bytes (exactly one is given);
/// returns the new size. See `qcowrs.resize`.
#[pyfunction]
#[pyo3(signature = (path, *, size = None, delta = None, shrink = false, format = None))]
pub fn resize(
    py: Python<'_>,
    path: PathBuf,
    size: Option<u64>,
    delta: Option<i128>,
    shrink: bool,
    format: Option<String>,
) -> PyResult<u64> {
    let new = match (size, delta) {
        (Some(s), None) => NewSize::Absolute(s),
        (None, Some(d)) => NewSize::Relative(d),
        _ => return Err(pyo3::exceptions::PyValueError::new_err("give exactly one of size and delta")),
    };
    Ok(py.detach(|| crate::ops::resize::resize(&path, format.as_deref(), new, shrink))?)
}
