//! `qcowrs._qcowrs.amend`: `ops::amend` for Python (the GIL released but for progress).

use std::path::PathBuf;

use pyo3::prelude::*;

use crate::ops::amend::AmendOptions;

/// Amends the options of the qcow2 image at `path`; see `qcowrs.amend`.
#[pyfunction]
#[pyo3(signature = (
    path, *, compat = None, refcount_bits = None, lazy_refcounts = None, data_file = None,
    data_file_raw = None, size = None, backing_file = None, backing_format = None, progress = None
))]
#[allow(clippy::too_many_arguments)] // one keyword per qemu-img amend option
pub fn amend(
    py: Python<'_>,
    path: PathBuf,
    compat: Option<String>,
    refcount_bits: Option<u64>,
    lazy_refcounts: Option<bool>,
    data_file: Option<String>,
    data_file_raw: Option<bool>,
    size: Option<u64>,
    backing_file: Option<String>,
    backing_format: Option<String>,
    progress: Option<Py<PyAny>>,
) -> PyResult<()> {
    let opts = AmendOptions {
        compat,
        refcount_bits,
        lazy_refcounts,
        data_file,
        data_file_raw,
        size,
        backing_file,
        backing_format,
    };
    let run = |report: super::progress::Report<'_>| crate::ops::amend::amend(&path, &opts, report);
    Ok(super::progress::detach_with_progress(py, progress.as_ref(), "amend", run)??)
}
