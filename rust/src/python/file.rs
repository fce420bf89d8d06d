//! `QcowFile` for Python: the native object under `qcowrs.QcowFile`. Positioning lives in the
//! Python façade; every call here takes an explicit offset and runs with the GIL released.
//! Reads share a read lock, so several Python threads reading one handle run in parallel;
//! writes and close take the write lock.

use std::path::PathBuf;
use std::sync::{PoisonError, RwLock};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use super::buffer::{with_readable_buffer, with_writable_buffer};
use super::report::PyCheckReport;
use super::types::PyQcowHeader;
use crate::backing::BackingChoice;
use crate::create::CreateOptions;
use crate::error::Error;
use crate::qcow_file::{OpenOptions, QcowFile};

/// A qcow2 image (native layer; use `qcowrs.QcowFile`).
#[pyclass(name = "QcowFile", module = "qcowrs._qcowrs", frozen)]
pub struct PyQcowFile {
    inner: RwLock<Option<QcowFile>>,
}

fn closed() -> PyErr {
    PyValueError::new_err("I/O operation on closed file")
}

impl PyQcowFile {
    fn new(q: QcowFile) -> Self {
        PyQcowFile { inner: RwLock::new(Some(q)) }
    }

    /// Runs `f` on the image under the read lock (shared with other readers).
    fn read<R>(&self, f: impl FnOnce(&QcowFile) -> Result<R, Error>) -> PyResult<R> {
        let g = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        g.as_ref().map_or_else(|| Err(closed()), |q| f(q).map_err(PyErr::from))
    }

    /// Runs `f` on the image under the write lock.
    fn write<R>(&self, f: impl FnOnce(&mut QcowFile) -> Result<R, Error>) -> PyResult<R> {
        let mut g = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        g.as_mut().map_or_else(|| Err(closed()), |q| f(q).map_err(PyErr::from))
    }
}

#[pymethods]
impl PyQcowFile {
    /// Opens the image at `path`. `backing`: True follows the header's backing file, False
    /// opens the image alone, a path uses that file as the backing file.
    #[staticmethod]
    #[pyo3(signature = (
        path, writable = false, rebuild = false, backing = None, no_backing = false, force_share = false,
        snapshot = None
    ))]
    #[allow(clippy::too_many_arguments)] // one keyword per open option
    fn open(
        py: Python<'_>,
        path: PathBuf,
        writable: bool,
        rebuild: bool,
        backing: Option<PathBuf>,
        no_backing: bool,
        force_share: bool,
        snapshot: Option<String>,
    ) -> PyResult<Self> {
        let backing = match (backing, no_backing) {
            (_, true) => BackingChoice::Disabled,
            (Some(p), false) => BackingChoice::Path(p),
            (None, false) => BackingChoice::FromHeader,
        };
        let q =
            py.detach(|| QcowFile::open(&path, OpenOptions { writable, rebuild, backing, force_share, snapshot }))?;
        Ok(Self::new(q))
    }

    /// Creates an image as `qemu-img create -f qcow2` does (the options are its `-o` options;
    /// `virtual_size` None or 0 with a backing file takes the backing file's size; `unsafe` is
    /// its `-u`) and opens it read-write. An existing file is replaced once the new image is
    /// complete, unless `overwrite` is False.
    #[staticmethod]
    #[pyo3(signature = (path, virtual_size = None, *, cluster_size = 65536, refcount_bits = 16, backing_file = None,
                        backing_format = None, lazy_refcounts = false, extended_l2 = false, compat = "1.1",
                        preallocation = "off", compression_type = "zlib", data_file = None, data_file_raw = false,
                        r#unsafe = false, overwrite = true))]
    #[allow(clippy::too_many_arguments)]
    fn create(
        py: Python<'_>,
        path: PathBuf,
        virtual_size: Option<u64>,
        cluster_size: u64,
        refcount_bits: u32,
        backing_file: Option<String>,
        backing_format: Option<String>,
        lazy_refcounts: bool,
        extended_l2: bool,
        compat: &str,
        preallocation: &str,
        compression_type: &str,
        data_file: Option<String>,
        data_file_raw: bool,
        r#unsafe: bool,
        overwrite: bool,
    ) -> PyResult<Self> {
        let opts = CreateOptions {
            virtual_size: virtual_size.unwrap_or(0),
            cluster_size,
            refcount_bits,
            backing_file,
            backing_format,
            lazy_refcounts,
            extended_l2,
            compat: compat.parse()?,
            preallocation: preallocation.parse()?,
            compression_type: compression_type.parse()?,
            data_file,
            data_file_raw,
            unsafe_backing: r#unsafe,
            overwrite,
        };
        let q = py.detach(|| QcowFile::create(&path, &opts))?;
        Ok(Self::new(q))
    }

    /// Writes the bytes of `buf` (any C-contiguous buffer) at guest `offset`, with the GIL
    /// released; returns the number of bytes written.
    fn write_at(&self, py: Python<'_>, buf: &Bound<'_, PyAny>, offset: u64) -> PyResult<usize> {
        with_readable_buffer(py, buf, |data| self.write(|q| q.write_at(data, offset).map(|()| data.len())))?
    }

    /// Writes whole clusters compressed (see `QcowFile::write_compressed`), with the GIL
    /// released; returns the number of bytes written.
    fn write_compressed_at(&self, py: Python<'_>, buf: &Bound<'_, PyAny>, offset: u64) -> PyResult<usize> {
        with_readable_buffer(py, buf, |data| {
            self.write(|q| {
                let cs = usize::try_from(q.cluster_size()).unwrap_or(usize::MAX);
                let mut done = 0usize;
                while done < data.len() {
                    let n = cs.min(data.len() - done);
                    q.write_compressed(offset + done as u64, &data[done..done + n])?;
                    done += n;
                }
                Ok(done)
            })
        })?
    }

    /// Makes `[offset, offset+length)` read as zeros (zero flag for whole clusters).
    fn write_zeroes(&self, py: Python<'_>, offset: u64, length: u64) -> PyResult<()> {
        py.detach(|| self.write(|q| q.write_zeroes(offset, length)))
    }

    /// Frees the whole clusters of `[offset, offset+length)`.
    fn discard(&self, py: Python<'_>, offset: u64, length: u64) -> PyResult<()> {
        py.detach(|| self.write(|q| q.discard(offset, length)))
    }

    /// Grows the virtual size to `size` bytes.
    fn truncate(&self, py: Python<'_>, size: u64) -> PyResult<()> {
        py.detach(|| self.write(|q| q.truncate(size)))
    }

    /// Makes everything written so far durable; the image is then consistent on disk.
    fn flush(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.write(QcowFile::flush))
    }

    /// Whether the image was opened read-write.
    #[getter]
    fn writable(&self) -> PyResult<bool> {
        self.read(|q| Ok(q.writable()))
    }

    /// Guest-visible size in bytes.
    #[getter]
    fn virtual_size(&self) -> PyResult<u64> {
        self.read(|q| Ok(q.virtual_size()))
    }

    /// Bytes per cluster.
    #[getter]
    fn cluster_size(&self) -> PyResult<u64> {
        self.read(|q| Ok(q.cluster_size()))
    }

    /// A snapshot of the parsed header.
    #[getter]
    fn header(&self) -> PyResult<PyQcowHeader> {
        let h = self.read(|q| Ok(q.header().clone()))?;
        Ok(PyQcowHeader::from(&h))
    }

    /// The internal snapshots (`[Snapshot]`, in table order), as `qemu-img snapshot -l`.
    fn snapshots(&self, py: Python<'_>) -> PyResult<Vec<super::info::PySnapshot>> {
        let list = py.detach(|| self.read(QcowFile::snapshots))?;
        Ok(super::info::snapshot_list(&list))
    }

    /// Records the disk as it is now as internal snapshot `name` (`qemu-img snapshot -c`).
    fn create_snapshot(&self, py: Python<'_>, name: &str) -> PyResult<super::info::PySnapshot> {
        let s = py.detach(|| self.write(|q| q.create_snapshot(name)))?;
        Ok(super::info::PySnapshot::from(&s))
    }

    /// Reverts the disk (and its size) to a snapshot, by id or name (`qemu-img snapshot -a`).
    fn apply_snapshot(&self, py: Python<'_>, id_or_name: &str) -> PyResult<()> {
        py.detach(|| self.write(|q| q.apply_snapshot(id_or_name)))
    }

    /// Deletes a snapshot, by id or name (`qemu-img snapshot -d`).
    fn delete_snapshot(&self, py: Python<'_>, id_or_name: &str) -> PyResult<()> {
        py.detach(|| self.write(|q| q.delete_snapshot(id_or_name)))
    }

    /// The persistent dirty bitmaps (`[Bitmap]`, in directory order).
    fn bitmaps(&self, py: Python<'_>) -> PyResult<Vec<super::bitmap::PyBitmap>> {
        let list = py.detach(|| self.read(QcowFile::bitmaps))?;
        Ok(list.into_iter().map(super::bitmap::PyBitmap::from).collect())
    }

    /// The guest ranges `[(offset, length)]` the bitmap `name` marks dirty, in order.
    fn dirty_ranges(&self, py: Python<'_>, name: &str) -> PyResult<Vec<(u64, u64)>> {
        py.detach(|| self.read(|q| q.dirty_ranges(name)))
    }

    /// Reads guest data at `offset` straight into the writable buffer `buf`; returns the bytes
    /// read (short only at the end of the disk). Runs in parallel with other reads.
    fn readinto_at(&self, py: Python<'_>, buf: &Bound<'_, PyAny>, offset: u64) -> PyResult<usize> {
        with_writable_buffer(py, buf, |slice| self.read(|q| q.read_at(slice, offset)))?
    }

    /// Reads up to `length` bytes of guest data at `offset` (short only at the end of the
    /// disk). The bytes object is allocated once and filled in place with the GIL released; a
    /// read too large for memory raises MemoryError like any Python allocation.
    fn read_at<'py>(&self, py: Python<'py>, offset: u64, length: u64) -> PyResult<Bound<'py, PyBytes>> {
        let n = self.read(|q| Ok(q.virtual_size().saturating_sub(offset).min(length)))?;
        let n = usize::try_from(n)
            .map_err(|_| pyo3::exceptions::PyMemoryError::new_err(format!("cannot allocate {n} bytes")))?;
        PyBytes::new_with(py, n, |buf| {
            let got = py.detach(|| self.read(|q| q.read_at(buf, offset)))?;
            // The disk cannot shrink under a read lock, so `got` is `n`; zeros otherwise.
            buf[got..].fill(0);
            Ok(())
        })
    }

    /// `[(guest_offset, length, kind)]` of what this image itself holds; kind is "data",
    /// "zero" or "compressed".
    fn allocated_ranges(&self, py: Python<'_>) -> PyResult<Vec<(u64, u64, &'static str)>> {
        py.detach(|| self.read(QcowFile::allocated_ranges))
    }

    /// Checks the image (no repair), as `qemu-img check`.
    fn check(&self, py: Python<'_>) -> PyResult<PyCheckReport> {
        let r = py.detach(|| self.write(QcowFile::check))?;
        Ok(PyCheckReport::from(&r))
    }

    /// Rebuilds the refcount structure (repairing as `qemu-img check -r all`); returns a check
    /// of the result.
    fn rebuild_refcounts(&self, py: Python<'_>) -> PyResult<PyCheckReport> {
        let r = py.detach(|| self.write(QcowFile::rebuild_refcounts))?;
        Ok(PyCheckReport::from(&r))
    }

    /// Whether the refcounts cannot be trusted (a write needs a rebuild first).
    #[getter]
    fn refcounts_stale(&self) -> PyResult<bool> {
        self.read(|q| Ok(q.refcounts_stale()))
    }

    /// The report of the repair done by `open(..., rebuild=True)`, or None.
    #[getter]
    fn rebuild_report(&self) -> PyResult<Option<PyCheckReport>> {
        let r = self.read(|q| Ok(q.rebuild_report().cloned()))?;
        Ok(r.as_ref().map(PyCheckReport::from))
    }

    /// Flushes and closes the image (idempotent). The image is closed even if the final
    /// flush fails; the error is raised.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| {
            let mut g = self.inner.write().unwrap_or_else(PoisonError::into_inner);
            match g.take() {
                Some(mut q) => q.close().map_err(PyErr::from),
                None => Ok(()),
            }
        })
    }

    /// Whether `close()` was called.
    #[getter]
    fn closed(&self) -> bool {
        self.inner.read().unwrap_or_else(PoisonError::into_inner).is_none()
    }

    /// The entries of `qemu-img map --output=json [--start-offset] [--max-length]` over the
    /// whole backing chain, as dicts with qemu-img's keys (`offset` only where it has one);
    /// `with_files` adds `filename` (the file `offset` points into) to entries with an offset.
    /// The chain is mapped with the GIL released.
    #[pyo3(signature = (start_offset = 0, max_length = None, with_files = false))]
    fn map<'py>(
        &self,
        py: Python<'py>,
        start_offset: u64,
        max_length: Option<u64>,
        with_files: bool,
    ) -> PyResult<Bound<'py, pyo3::types::PyList>> {
        let m = py.detach(|| self.read(|q| crate::ops::map::map_image(q, start_offset, max_length)))?;
        super::map::map_to_list(py, &m, with_files)
    }
}
