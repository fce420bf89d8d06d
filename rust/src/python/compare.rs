//! `qcowrs._qcowrs.compare` and `CompareResult`: the compare engine (`ops::compare`) for
//! Python, the GIL released while it runs (taken back only to report progress and to see
//! Ctrl-C).

use std::path::PathBuf;

use pyo3::prelude::*;

use crate::ops::compare::{CompareOptions, Outcome, Stage};

/// The result of a comparison (`qemu-img compare`).
#[pyclass(name = "CompareResult", module = "qcowrs._qcowrs", frozen, get_all, skip_from_py_object)]
#[derive(Clone)]
pub struct PyCompareResult {
    /// The images show the same content (and, strict, the same size and block status).
    identical: bool,
    /// The offset qemu-img reports: the start of the first differing 512-byte sector, or
    /// (strict) the first offset whose block status differs; None when identical or (strict)
    /// when the sizes differ.
    first_difference: Option<u64>,
    /// Why the images differ: "content", "size" (strict) or "block-status" (strict); None
    /// when identical.
    reason: Option<&'static str>,
    /// The first image's size as QEMU sees it (qcow2: whole sectors of the virtual size;
    /// raw: the file rounded up to a sector).
    size_a: u64,
    /// The second image's size.
    size_b: u64,
}

#[pymethods]
impl PyCompareResult {
    fn __repr__(&self) -> String {
        let first = self.first_difference.map_or_else(|| "None".into(), |o| o.to_string());
        let reason = self.reason.map_or_else(|| "None".into(), |r| format!("{r:?}"));
        format!(
            "CompareResult(identical={}, first_difference={first}, reason={reason}, size_a={}, size_b={})",
            if self.identical { "True" } else { "False" },
            self.size_a,
            self.size_b
        )
    }
}

/// Compares images `a` and `b` like `qemu-img compare`; see `qcowrs.compare`. An exception
/// raised while comparing carries `compare_stage`: "open", "status" (a block status could not
/// be found) or "read" (qemu-img's exit codes 2, 3 and 4).
#[pyfunction]
#[pyo3(signature = (
    a, b, *, strict = false, format_a = None, format_b = None, force_share = false, threads = 0,
    progress = None
))]
#[allow(clippy::too_many_arguments)]
pub fn compare(
    py: Python<'_>,
    a: PathBuf,
    b: PathBuf,
    strict: bool,
    format_a: Option<String>,
    format_b: Option<String>,
    force_share: bool,
    threads: usize,
    progress: Option<Py<PyAny>>,
) -> PyResult<PyCompareResult> {
    let opts = CompareOptions { strict, format_a, format_b, force_share, threads };
    let run = |report: super::progress::Report<'_>| crate::ops::compare::compare(&a, &b, &opts, report);
    let result = super::progress::detach_with_progress(py, progress.as_ref(), "compare", run)?;
    let c = match result {
        Ok(c) => c,
        Err(e) => {
            let stage = match e.stage {
                Stage::Open => "open",
                Stage::Status => "status",
                Stage::Read => "read",
            };
            let err = PyErr::from(e.error);
            err.value(py).setattr("compare_stage", stage)?;
            return Err(err);
        }
    };
    let (identical, first_difference, reason) = match c.outcome {
        Outcome::Identical => (true, None, None),
        Outcome::ContentMismatch(o) => (false, Some(o), Some("content")),
        Outcome::SizeMismatch => (false, None, Some("size")),
        Outcome::StatusMismatch(o) => (false, Some(o), Some("block-status")),
    };
    Ok(PyCompareResult { identical, first_difference, reason, size_a: c.sizes[0], size_b: c.sizes[1] })
}
