//! `qcowrs._qcowrs.serve`: the NBD server (`export::nbd`) for Python, with the GIL released
//! while it serves; signals are seen every few tens of milliseconds.

use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};

use pyo3::prelude::*;

use crate::export::nbd::{self, Listener};
use crate::qcow_file::{OpenOptions, QcowFile};

/// Serves the image at `path` over NBD on the Unix socket `socket`, or else on `host:port`
/// (TCP), read-write when `writable`, to at most `shared` clients at once, until a signal
/// handler raises (SIGINT's KeyboardInterrupt, or SIGTERM's if one is installed); then the
/// clients' current requests finish, the image is flushed and closed, and the exception is
/// raised. See `qcowrs.serve`.
#[pyfunction]
#[pyo3(signature = (path, *, socket = None, host = "127.0.0.1", port = 10809, writable = false, shared = 8))]
pub fn serve(
    py: Python<'_>,
    path: PathBuf,
    socket: Option<PathBuf>,
    host: &str,
    port: u16,
    writable: bool,
    shared: usize,
) -> PyResult<()> {
    if shared == 0 {
        return Err(pyo3::exceptions::PyValueError::new_err("shared must be at least 1"));
    }
    let image = py.detach(|| QcowFile::open(&path, OpenOptions { writable, ..OpenOptions::default() }))?;
    let listener = py.detach(|| match &socket {
        Some(p) => Listener::unix(p),
        None => Listener::tcp(host, port),
    })?;
    let raised: Mutex<Option<PyErr>> = Mutex::new(None);
    let stop = || {
        Python::attach(|py| match py.check_signals() {
            Ok(()) => false,
            Err(e) => {
                *raised.lock().unwrap_or_else(PoisonError::into_inner) = Some(e);
                true
            }
        })
    };
    let served = py.detach(|| {
        let r = nbd::serve(image, &listener, shared, &stop);
        drop(listener);
        r
    });
    served?;
    match raised.into_inner().unwrap_or_else(PoisonError::into_inner) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
