//! `qcowrs._qcowrs.commit`: `ops::commit` for Python (the GIL released but for progress).

use std::path::PathBuf;

use pyo3::prelude::*;

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
    let run = |report: super::progress::Report<'_>| crate::ops::commit::commit(&path, &opts, report);
    Ok(super::progress::detach_with_progress(py, progress.as_ref(), "commit", run)??)
}
