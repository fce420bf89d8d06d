//! `qcowrs._qcowrs.rebase`: `ops::rebase` for Python (the GIL released but for progress).

use std::path::PathBuf;

use pyo3::prelude::*;

use crate::error::Error;
use crate::ops::rebase::RebaseOptions;

/// Rebases the overlay at `path` onto `backing_file` ("" for none); see `qcowrs.rebase`.
#[pyfunction]
#[pyo3(signature = (path, backing_file, backing_format = None, *, r#unsafe = false, progress = None))]
pub fn rebase(
    py: Python<'_>,
    path: PathBuf,
    backing_file: String,
    backing_format: Option<String>,
    r#unsafe: bool,
    progress: Option<Py<PyAny>>,
) -> PyResult<()> {
    let opts = RebaseOptions { backing_file, backing_format, unsafe_mode: r#unsafe };
    let raised: std::sync::Mutex<Option<PyErr>> = std::sync::Mutex::new(None);
    let report = |done: u64, total: u64| -> crate::error::Result<()> {
        Python::attach(|py| {
            let r = py.check_signals().and_then(|()| match &progress {
                Some(cb) => cb.call1(py, (done, total)).map(|_| ()),
                None => Ok(()),
            });
            r.map_err(|e| {
                *raised.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(e);
                Error::InvalidArgument("rebase stopped".into())
            })
        })
    };
    let result = py.detach(|| crate::ops::rebase::rebase(&path, &opts, &report));
    if let Some(e) = raised.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take() {
        return Err(e);
    }
    result.map_err(PyErr::from)
}
