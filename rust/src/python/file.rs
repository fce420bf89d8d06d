//! `QcowFile` for Python: the native object under `qcowrs.QcowFile`. Positioning lives in the
//! Python façade; every call here takes an explicit offset and runs with the GIL released.

use std::path::PathBuf;
use std::sync::Mutex;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use super::buffer::{with_readable_buffer, with_writable_buffer};
use super::report::PyCheckReport;
use super::types::PyQcowHeader;
use crate::error::Error;
use crate::qcow_file::{CreateOptions, OpenOptions, QcowFile};

/// A qcow2 image (native layer; use `qcowrs.QcowFile`).
#[pyclass(name = "QcowFile", module = "qcowrs._qcowrs", frozen)]
pub struct PyQcowFile {
    inner: Mutex<Option<QcowFile>>,
}

impl PyQcowFile {
    fn with<R: Send>(&self, py: Python<'_>, f: impl FnOnce(&mut QcowFile) -> Result<R, Error> + Send) -> PyResult<R> {
        py.detach(|| {
            let mut g = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            match g.as_mut() {
                Some(q) => f(q).map_err(PyErr::from),
                None => Err(PyValueError::new_err("I/O operation on closed file")),
            }
        })
    }
}

#[pymethods]
impl PyQcowFile {
    /// Opens the image at `path`.
    #[staticmethod]
    #[pyo3(signature = (path, writable = false, rebuild = false))]
    fn open(py: Python<'_>, path: PathBuf, writable: bool, rebuild: bool) -> PyResult<Self> {
        let q = py.detach(|| QcowFile::open(&path, OpenOptions { writable, rebuild }))?;
        Ok(PyQcowFile { inner: Mutex::new(Some(q)) })
    }

    /// Creates a new v3 image and opens it read-write.
    #[staticmethod]
    #[pyo3(signature = (path, virtual_size, cluster_size = 65536, refcount_bits = 16, backing_file = None,
                        backing_format = None, lazy_refcounts = false, extended_l2 = false))]
    #[allow(clippy::too_many_arguments)]
    fn create(
        py: Python<'_>,
        path: PathBuf,
        virtual_size: u64,
        cluster_size: u64,
        refcount_bits: u32,
        backing_file: Option<String>,
        backing_format: Option<String>,
        lazy_refcounts: bool,
        extended_l2: bool,
    ) -> PyResult<Self> {
        let opts = CreateOptions {
            virtual_size,
            cluster_size,
            refcount_bits,
            backing_file,
            backing_format,
            lazy_refcounts,
            extended_l2,
        };
        let q = py.detach(|| QcowFile::create(&path, &opts))?;
        Ok(PyQcowFile { inner: Mutex::new(Some(q)) })
    }

    /// Writes the bytes of `buf` (any C-contiguous buffer) at guest `offset`, with the GIL
    /// released; returns the number of bytes written.
    fn write_at(&self, py: Python<'_>, buf: &Bound<'_, PyAny>, offset: u64) -> PyResult<usize> {
        with_readable_buffer(py, buf, |data| {
            let mut g = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            match g.as_mut() {
                Some(q) => q.write_at(data, offset).map(|()| data.len()).map_err(PyErr::from),
                None => Err(PyValueError::new_err("I/O operation on closed file")),
            }
        })?
    }

    /// Makes `[offset, offset+length)` read as zeros (zero flag for whole clusters).
    fn write_zeroes(&self, py: Python<'_>, offset: u64, length: u64) -> PyResult<()> {
        self.with(py, |q| q.write_zeroes(offset, length))
    }

    /// Frees the whole clusters of `[offset, offset+length)`.
    fn discard(&self, py: Python<'_>, offset: u64, length: u64) -> PyResult<()> {
        self.with(py, |q| q.discard(offset, length))
    }

    /// Grows the virtual size to `size` bytes.
    fn truncate(&self, py: Python<'_>, size: u64) -> PyResult<()> {
        self.with(py, |q| q.truncate(size))
    }

    /// Makes everything written so far durable; the image is then consistent on disk.
    fn flush(&self, py: Python<'_>) -> PyResult<()> {
        self.with(py, QcowFile::flush)
    }

    /// Whether the image was opened read-write.
    #[getter]
    fn writable(&self, py: Python<'_>) -> PyResult<bool> {
        self.with(py, |q| Ok(q.raw_file().writable()))
    }

    /// Guest-visible size in bytes.
    #[getter]
    fn virtual_size(&self, py: Python<'_>) -> PyResult<u64> {
        self.with(py, |q| Ok(q.virtual_size()))
    }

    /// Bytes per cluster.
    #[getter]
    fn cluster_size(&self, py: Python<'_>) -> PyResult<u64> {
        self.with(py, |q| Ok(q.cluster_size()))
    }

    /// A snapshot of the parsed header.
    #[getter]
    fn header(&self, py: Python<'_>) -> PyResult<PyQcowHeader> {
        let h = self.with(py, |q| Ok(q.header().clone()))?;
        Ok(PyQcowHeader::from(&h))
    }

    /// Reads guest data at `offset` straight into the writable buffer `buf`; returns the bytes
    /// read (short only at the end of the disk).
    fn readinto_at(&self, py: Python<'_>, buf: &Bound<'_, PyAny>, offset: u64) -> PyResult<usize> {
        with_writable_buffer(py, buf, |slice| {
            let mut g = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            match g.as_mut() {
                Some(q) => q.read_at(slice, offset).map_err(PyErr::from),
                None => Err(PyValueError::new_err("I/O operation on closed file")),
            }
        })?
    }

    /// Reads up to `length` bytes of guest data at `offset`.
    fn read_at<'py>(&self, py: Python<'py>, offset: u64, length: usize) -> PyResult<Bound<'py, PyBytes>> {
        let n = self.with(py, |q| {
            Ok(usize::try_from(q.virtual_size().saturating_sub(offset)).unwrap_or(usize::MAX).min(length))
        })?;
        // A read of a huge disk in one call fails like any too-large allocation in Python.
        let mut v: Vec<u8> = Vec::new();
        v.try_reserve_exact(n)
            .map_err(|_| pyo3::exceptions::PyMemoryError::new_err(format!("cannot allocate {n} bytes")))?;
        v.resize(n, 0);
        let v = self.with(py, move |q| {
            let got = q.read_at(&mut v, offset)?;
            v.truncate(got);
            Ok(v)
        })?;
        Ok(PyBytes::new(py, &v))
    }

    /// `[(guest_offset, length, kind)]` of what this image itself holds; kind is "data",
    /// "zero" or "compressed".
    fn allocated_ranges(&self, py: Python<'_>) -> PyResult<Vec<(u64, u64, &'static str)>> {
        self.with(py, QcowFile::allocated_ranges)
    }

    /// Checks the image (no repair), as `qemu-img check`.
    fn check(&self, py: Python<'_>) -> PyResult<PyCheckReport> {
        let r = self.with(py, QcowFile::check)?;
        Ok(PyCheckReport::from(&r))
    }

    /// Rebuilds the refcount structure (repairing as `qemu-img check -r all`); returns a check
    /// of the result.
    fn rebuild_refcounts(&self, py: Python<'_>) -> PyResult<PyCheckReport> {
        let r = self.with(py, QcowFile::rebuild_refcounts)?;
        Ok(PyCheckReport::from(&r))
    }

    /// Whether the refcounts cannot be trusted (a write needs a rebuild first).
    #[getter]
    fn refcounts_stale(&self, py: Python<'_>) -> PyResult<bool> {
        self.with(py, |q| Ok(q.refcounts_stale()))
    }

    /// The report of the repair done by `open(..., rebuild=True)`, or None.
    #[getter]
    fn rebuild_report(&self, py: Python<'_>) -> PyResult<Option<PyCheckReport>> {
        let r = self.with(py, |q| Ok(q.rebuild_report().cloned()))?;
        Ok(r.as_ref().map(PyCheckReport::from))
    }

    /// Flushes and closes the image (idempotent). The image is closed even if the final
    /// flush fails; the error is raised.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| {
            let mut g = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            match g.take() {
                Some(mut q) => q.close().map_err(PyErr::from),
                None => Ok(()),
            }
        })
    }

    /// Whether `close()` was called.
    #[getter]
    fn closed(&self) -> bool {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner).is_none()
    }
}
