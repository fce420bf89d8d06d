//! PyO3 glue: the `qcowrs._qcowrs` extension module. Nothing outside this folder knows Python.

mod amend;
mod bitmap;
mod buffer;
mod commit;
mod compare;
mod convert;
mod errors;
mod file;
mod info;
mod map;
mod measure;
mod mount;
mod progress;
mod rebase;
mod report;
mod resize;
mod serve;
mod types;

use pyo3::prelude::*;

/// Native layer of qcowrs (use the `qcowrs` package).
#[pymodule]
fn _qcowrs(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<file::PyQcowFile>()?;
    m.add_class::<types::PyQcowHeader>()?;
    m.add_class::<types::PyQcowRawFile>()?;
    m.add_class::<report::PyCheckReport>()?;
    m.add_class::<report::PyProblem>()?;
    m.add_class::<info::PySnapshot>()?;
    m.add_class::<compare::PyCompareResult>()?;
    m.add_class::<bitmap::PyBitmap>()?;
    m.add_function(wrap_pyfunction!(info::image_info, m)?)?;
    m.add_function(wrap_pyfunction!(info::qcow1_info, m)?)?;
    m.add_function(wrap_pyfunction!(convert::convert, m)?)?;
    m.add_function(wrap_pyfunction!(resize::resize, m)?)?;
    m.add_function(wrap_pyfunction!(serve::serve, m)?)?;
    m.add_function(wrap_pyfunction!(rebase::rebase, m)?)?;
    m.add_function(wrap_pyfunction!(commit::commit, m)?)?;
    m.add_function(wrap_pyfunction!(amend::amend, m)?)?;
    m.add_function(wrap_pyfunction!(bitmap::bitmap, m)?)?;
    m.add_function(wrap_pyfunction!(measure::measure, m)?)?;
    m.add_function(wrap_pyfunction!(compare::compare, m)?)?;
    m.add_function(wrap_pyfunction!(mount::mount, m)?)?;
    m.add_function(wrap_pyfunction!(check, m)?)?;
    m.add_function(wrap_pyfunction!(rebuild_refcounts, m)?)?;
    m.add_function(wrap_pyfunction!(_fail_after_ops, m)?)?;
    m.add_function(wrap_pyfunction!(_io_ops, m)?)?;
    m.add_function(wrap_pyfunction!(_error_for_test, m)?)?;
    Ok(())
}

/// Checks the image at `path` like `qemu-img check`; `repair` is None, "leaks" or "all".
/// Without repair the file is opened read-only and never modified.
#[pyfunction]
#[pyo3(signature = (path, repair = None, force_share = false))]
fn check(
    py: Python<'_>,
    path: std::path::PathBuf,
    repair: Option<&str>,
    force_share: bool,
) -> PyResult<report::PyCheckReport> {
    let repair = match repair {
        None => crate::check::Repair::None,
        Some("leaks") => crate::check::Repair::Leaks,
        Some("all") => crate::check::Repair::All,
        Some(other) => {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "repair must be None, 'leaks' or 'all', not {other:?}"
            )))
        }
    };
    let r = py.detach(|| crate::check::check_path_shared(&path, repair, false, force_share))?;
    Ok(report::PyCheckReport::from(&r))
}

/// Test hook: after `n` more write/flush/resize operations every further one fails (EIO), as
/// if the process crashed there; `None` turns it off.
#[pyfunction]
#[pyo3(signature = (n))]
fn _fail_after_ops(n: Option<u64>) {
    crate::raw_file::fail_after_ops(n);
}

/// Test hook: write/flush/resize operations done so far by this process.
#[pyfunction]
fn _io_ops() -> u64 {
    crate::raw_file::io_ops()
}

/// Test hook: raises the Python exception that the Rust error variant `name` maps to.
#[pyfunction]
fn _error_for_test(name: &str) -> PyResult<()> {
    match errors::sample(name) {
        Some(e) => Err(e.into()),
        None => Err(pyo3::exceptions::PyValueError::new_err(format!("no error variant {name:?}"))),
    }
}

/// Rebuilds the refcount structure of the image at `path` (repairing as
/// `qemu-img check -r all`), even where the header names no usable refcount table; returns a
/// check of the result.
#[pyfunction]
fn rebuild_refcounts(py: Python<'_>, path: std::path::PathBuf) -> PyResult<report::PyCheckReport> {
    let r = py.detach(|| crate::check::check_path(&path, crate::check::Repair::All, true))?;
    Ok(report::PyCheckReport::from(&r))
}
