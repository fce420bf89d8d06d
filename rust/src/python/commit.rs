//! `qcowrs._qcowrs.commit`: `ops::commit` for Python (the GIL released but for progress).

use std::path::PathBuf;

use pyo3::prelude::*;

use crate::error::Error;
use crate::ops::commit::CommitOptions;

/// Commits the overlay at `path` into its backing file (or `base`); see `qcowrs.commit`.
#[pyfunction]
#[pyo3(signature = (path, *, base = None, drop = false, progress = None))]
pub fn commit(
    py: Python<'_>,
    path: PathBuf,
    base: Option<PathBuf>,
    drop: bool,
    progress: Option<Py<PyAny>>,
) -> PyResult<()> {
    let opts = CommitOptions { base, drop };
    let raised: std::sync::Mutex<Option<PyErr>> = std::sync::Mutex::new(None);
    let report = |done: u64, total: u64| -> crate::error::Result<()> {
        Python::attach(|py| {
            let r = py.check_signals().and_then(|()| match &progress {
                Some(cb) => cb.call1(py, (done, total)).map(|_| ()),
                None => Ok(()),
            });
            r.map_err(|e| {
                *raised.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(e);
                Error::InvalidArgument("commit stopped".into())
            })
        })
    };
    let result = py.detach(|| crate::ops::commit::commit(&path, &opts, &report));
    if let Some(e) = raised.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take() {
        return Err(e);
    }
    result.map_err(PyErr::from)
}
