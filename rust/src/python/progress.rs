//! Long operations run with the GIL released and report progress to an optional Python
//! callable: the one place that takes the GIL back to call it and to see Ctrl-C.

use std::sync::{Mutex, PoisonError};

use pyo3::prelude::*;

use crate::error::{Error, Result};

/// What the core's operations call as they go: `(bytes done, bytes to do)`; an error stops
/// the operation.
pub(super) type Report<'a> = &'a (dyn Fn(u64, u64) -> Result<()> + Sync);

/// Runs `op` with the GIL released. Its report callback calls `progress(done, total)` (if
/// given) under the GIL and checks for signals; an exception raised there (or Ctrl-C) makes
/// the callback fail, which stops `op`, and is raised here once `op` has returned (the
/// operation has then closed what it wrote). Otherwise `op`'s own result is returned.
pub(super) fn detach_with_progress<R: Send>(
    py: Python<'_>,
    progress: Option<&Py<PyAny>>,
    what: &str,
    op: impl FnOnce(Report<'_>) -> R + Send,
) -> PyResult<R> {
    let raised: Mutex<Option<PyErr>> = Mutex::new(None);
    let report = |done: u64, total: u64| -> Result<()> {
        Python::attach(|py| {
            let r = py.check_signals().and_then(|()| match progress {
                Some(cb) => cb.call1(py, (done, total)).map(|_| ()),
                None => Ok(()),
            });
            r.map_err(|e| {
                *raised.lock().unwrap_or_else(PoisonError::into_inner) = Some(e);
                Error::InvalidArgument(format!("{what} stopped"))
            })
        })
    };
    let result = py.detach(|| op(&report));
    match raised.into_inner().unwrap_or_else(PoisonError::into_inner) {
        Some(e) => Err(e),
        None => Ok(result),
    }
}
