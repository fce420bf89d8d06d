//! `qcowrs._qcowrs.rebase`: `ops::rebase` for Python (the GIL released but for progress).

use std::path::PathBuf;

use pyo3::prelude::*;

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
    let run = |report: super::progress::Report<'_>| crate::ops::rebase::rebase(&path, &opts, report);
    Ok(super::progress::detach_with_progress(py, progress.as_ref(), "rebase", run)??)
}
