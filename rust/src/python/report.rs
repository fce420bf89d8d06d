//! `CheckReport` and `Problem` for Python.

use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::report::CheckReport;
use crate::report::Problem;

/// One problem found by a check.
#[pyclass(name = "Problem", module = "qcowrs._qcowrs", frozen, get_all, skip_from_py_object)]
#[derive(Clone)]
pub struct PyProblem {
    /// Machine-readable kind ("leak", "refcount-too-low", "refcount-zero", "cross-link", ...).
    kind: String,
    /// Host offset concerned, if any.
    host_offset: Option<u64>,
    /// Guest offset concerned, if known.
    guest_offset: Option<u64>,
    /// Description.
    message: String,
    /// The line `qemu-img check` prints for the same finding, where it has one.
    qemu_message: Option<String>,
}

#[pymethods]
impl PyProblem {
    fn __repr__(&self) -> String {
        let host = self.host_offset.map_or_else(|| "None".into(), |o| format!("0x{o:x}"));
        format!("Problem(kind={:?}, host_offset={host}, message={:?})", self.kind, self.message)
    }
}

impl From<&Problem> for PyProblem {
    fn from(p: &Problem) -> Self {
        PyProblem {
            kind: p.kind.to_string(),
            host_offset: p.host_offset,
            guest_offset: p.guest_offset,
            message: p.message.clone(),
            qemu_message: p.qemu.clone(),
        }
    }
}

/// The result of a check, mirroring `qemu-img check --output=json`.
#[pyclass(name = "CheckReport", module = "qcowrs._qcowrs", frozen)]
pub struct PyCheckReport {
    /// Internal or I/O errors; the check did not complete.
    #[pyo3(get)]
    check_errors: u64,
    /// Errors (references without refcount, bad entries, ...).
    #[pyo3(get)]
    corruptions: u64,
    /// Clusters whose refcount is higher than their references.
    #[pyo3(get)]
    leaks: u64,
    /// Corruptions repaired.
    #[pyo3(get)]
    corruptions_fixed: u64,
    /// Leaks repaired.
    #[pyo3(get)]
    leaks_fixed: u64,
    /// (Highest cluster in use + 1) * cluster_size.
    #[pyo3(get)]
    image_end_offset: u64,
    /// Virtual size in clusters.
    #[pyo3(get)]
    total_clusters: u64,
    /// Data clusters of the active image.
    #[pyo3(get)]
    allocated_clusters: u64,
    /// Non-contiguous clusters (every compressed one included).
    #[pyo3(get)]
    fragmented_clusters: u64,
    /// Compressed clusters.
    #[pyo3(get)]
    compressed_clusters: u64,
    /// The refcount structure was rebuilt.
    #[pyo3(get)]
    rebuilt: bool,
    /// What was found (the first 10000; see `unlisted_problems`).
    #[pyo3(get)]
    problems: Vec<PyProblem>,
    /// Problems found but not listed.
    #[pyo3(get)]
    unlisted_problems: u64,
    /// What a repair dropped or changed beyond refcounts and OFLAG_COPIED (snapshots dropped,
    /// entries cleared, tables moved).
    #[pyo3(get)]
    dropped: Vec<PyProblem>,
    /// `qemu-img check`'s exit code: 0 clean, 1 check failed, 2 corruptions, 3 leaks.
    #[pyo3(get)]
    exit_code: i32,
    /// No check errors, corruptions or leaks.
    #[pyo3(get)]
    is_clean: bool,
    json: Vec<(&'static str, u64)>,
}

impl From<&CheckReport> for PyCheckReport {
    fn from(r: &CheckReport) -> Self {
        let c = &r.counts;
        PyCheckReport {
            check_errors: c.check_errors,
            corruptions: c.corruptions,
            leaks: c.leaks,
            corruptions_fixed: c.corruptions_fixed,
            leaks_fixed: c.leaks_fixed,
            image_end_offset: r.image_end_offset,
            total_clusters: c.total_clusters,
            allocated_clusters: c.allocated_clusters,
            fragmented_clusters: c.fragmented_clusters,
            compressed_clusters: c.compressed_clusters,
            rebuilt: r.rebuilt,
            problems: r.problems.list.iter().map(PyProblem::from).collect(),
            unlisted_problems: r.problems.unlisted,
            dropped: r.dropped.iter().map(PyProblem::from).collect(),
            exit_code: r.exit_code(),
            is_clean: r.is_clean(),
            json: r.json_fields(),
        }
    }
}

#[pymethods]
impl PyCheckReport {
    /// The report as `qemu-img check --output=json` gives it (without filename/format):
    /// zero-valued keys omitted except `check-errors`.
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (k, v) in &self.json {
            d.set_item(*k, *v)?;
        }
        Ok(d)
    }

    fn __repr__(&self) -> String {
        format!(
            "CheckReport(check_errors={}, corruptions={}, leaks={}, corruptions_fixed={}, leaks_fixed={}, rebuilt={}, problems={})",
            self.check_errors,
            self.corruptions,
            self.leaks,
            self.corruptions_fixed,
            self.leaks_fixed,
            if self.rebuilt { "True" } else { "False" },
            self.problems.len()
        )
    }
}
