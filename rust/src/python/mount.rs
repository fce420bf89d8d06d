//! `qcowrs._qcowrs.mount`: `export::fuse` for Python. Blocks with the GIL released, looking at
//! Python's signals between waits: an exception from a signal handler (Ctrl-C's
//! `KeyboardInterrupt`, or what a SIGTERM handler raises) unmounts, closes the image and is
//! then raised.

use std::path::PathBuf;
use std::time::Duration;

use pyo3::prelude::*;

use crate::export::fuse::FuseExport;
use crate::{OpenOptions, QcowFile};

/// How often the signals are looked at while the export serves.
const SIGNAL_POLL: Duration = Duration::from_millis(100);

/// Exports the guest disk of the image at `path` over the regular file `mountpoint` (FUSE)
/// until it is unmounted or a signal handler raises; the image is then flushed and closed.
/// See `qcowrs.mount`.
#[pyfunction]
#[pyo3(signature = (path, mountpoint, *, writable = false))]
pub fn mount(py: Python<'_>, path: PathBuf, mountpoint: PathBuf, writable: bool) -> PyResult<()> {
    let export = py.detach(|| {
        let image = QcowFile::open(&path, OpenOptions { writable, ..OpenOptions::default() })?;
        FuseExport::mount(image, &mountpoint)
    })?;
    loop {
        if py.detach(|| export.wait(SIGNAL_POLL)) {
            return Ok(py.detach(|| export.finish())?);
        }
        if let Err(raised) = py.check_signals() {
            py.detach(|| export.unmount().and_then(|()| export.finish()))?;
            return Err(raised);
        }
    }
}
