//! PyO3 glue: the `qcowrs._qcowrs` extension module. Nothing outside this folder knows Python.

mod buffer;
mod errors;
mod file;
mod types;

use pyo3::prelude::*;

/// Native layer of qcowrs (use the `qcowrs` package).
#[pymodule]
fn _qcowrs(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<file::PyQcowFile>()?;
    m.add_class::<types::PyQcowHeader>()?;
    m.add_class::<types::PyQcowRawFile>()?;
    Ok(())
}
