//! `QcowHeader` and `QcowRawFile` for Python: plain getters over the Rust types.

use std::path::PathBuf;
use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::error::Error;
use crate::header::QcowHeader;
use crate::raw_file::QcowRawFile;
use crate::storage::FileStorage;

/// The parsed qcow2 header (a read-only snapshot). Attribute names are the spec's fields.
#[pyclass(name = "QcowHeader", module = "qcowrs._qcowrs", frozen)]
pub struct PyQcowHeader {
    #[pyo3(get)]
    magic: u32,
    #[pyo3(get)]
    version: u32,
    #[pyo3(get)]
    backing_file_offset: u64,
    #[pyo3(get)]
    backing_file_size: u32,
    #[pyo3(get)]
    cluster_bits: u32,
    #[pyo3(get)]
    size: u64,
    #[pyo3(get)]
    crypt_method: u32,
    #[pyo3(get)]
    l1_size: u32,
    #[pyo3(get)]
    l1_table_offset: u64,
    #[pyo3(get)]
    refcount_table_offset: u64,
    #[pyo3(get)]
    refcount_table_clusters: u32,
    #[pyo3(get)]
    nb_snapshots: u32,
    #[pyo3(get)]
    snapshots_offset: u64,
    #[pyo3(get)]
    incompatible_features: u64,
    #[pyo3(get)]
    compatible_features: u64,
    #[pyo3(get)]
    autoclear_features: u64,
    #[pyo3(get)]
    refcount_order: u32,
    #[pyo3(get)]
    header_length: u32,
    #[pyo3(get)]
    compression_type: u8,
    /// Backing file name, if any.
    #[pyo3(get)]
    backing_file: Option<String>,
    /// Backing file format from its header extension, if any.
    #[pyo3(get)]
    backing_format: Option<String>,
    /// External data file name, if any.
    #[pyo3(get)]
    data_file: Option<String>,
    /// Bytes per cluster.
    #[pyo3(get)]
    cluster_size: u64,
    /// Width of a refcount in bits.
    #[pyo3(get)]
    refcount_bits: u32,
    /// Incompatible bit 0.
    #[pyo3(get)]
    dirty: bool,
    /// Incompatible bit 1.
    #[pyo3(get)]
    corrupt: bool,
    /// Compatible bit 0.
    #[pyo3(get)]
    lazy_refcounts: bool,
    /// Incompatible bit 4.
    #[pyo3(get)]
    extended_l2: bool,
    inner: QcowHeader,
}

impl From<&QcowHeader> for PyQcowHeader {
    fn from(h: &QcowHeader) -> Self {
        PyQcowHeader {
            magic: h.magic,
            version: h.version,
            backing_file_offset: h.backing_file_offset,
            backing_file_size: h.backing_file_size,
            cluster_bits: h.cluster_bits,
            size: h.size,
            crypt_method: h.crypt_method,
            l1_size: h.l1_size,
            l1_table_offset: h.l1_table_offset,
            refcount_table_offset: h.refcount_table_offset,
            refcount_table_clusters: h.refcount_table_clusters,
            nb_snapshots: h.nb_snapshots,
            snapshots_offset: h.snapshots_offset,
            incompatible_features: h.incompatible_features,
            compatible_features: h.compatible_features,
            autoclear_features: h.autoclear_features,
            refcount_order: h.refcount_order,
            header_length: h.header_length,
            compression_type: h.compression_type,
            backing_file: h.backing_file.clone(),
            backing_format: h.backing_format(),
            data_file: h.data_file(),
            cluster_size: h.cluster_size(),
            refcount_bits: h.refcount_bits(),
            dirty: h.is_dirty(),
            corrupt: h.is_corrupt(),
            lazy_refcounts: h.lazy_refcounts(),
            extended_l2: h.extended_l2(),
            inner: h.clone(),
        }
    }
}

#[pymethods]
impl PyQcowHeader {
    /// Reads and validates the header of the image at `path` (read-only).
    #[staticmethod]
    fn read(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let h = py.detach(|| -> Result<QcowHeader, Error> {
            let f = crate::backing::open_image_file(&path, false, "image")?;
            QcowHeader::read_from(&FileStorage::new(f))
        })?;
        Ok(PyQcowHeader::from(&h))
    }

    /// Header extensions as `[(type, data)]`, in on-disk order.
    fn extensions<'py>(&self, py: Python<'py>) -> Vec<(u32, Bound<'py, PyBytes>)> {
        self.inner.extensions.iter().map(|e| (e.kind, PyBytes::new(py, &e.data))).collect()
    }

    /// Feature name table as `[(kind, bit, name)]` (kind 0 incompatible, 1 compatible, 2 autoclear).
    fn feature_names(&self) -> Vec<(u8, u8, String)> {
        self.inner.feature_names().into_iter().map(|f| (f.kind, f.bit, f.name)).collect()
    }

    /// The bytes of the serialized header (header, extensions, backing name).
    fn to_bytes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        Ok(PyBytes::new(py, &self.inner.to_bytes()?))
    }

    /// The fields as a dict.
    fn to_dict<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyDict>> {
        let py = slf.py();
        let d = PyDict::new(py);
        let h = slf.get();
        macro_rules! put {
            ($($f:ident),*) => { $( d.set_item(stringify!($f), &h.$f)?; )* };
        }
        put!(
            magic,
            version,
            backing_file_offset,
            backing_file_size,
            cluster_bits,
            size,
            crypt_method,
            l1_size,
            l1_table_offset,
            refcount_table_offset,
            refcount_table_clusters,
            nb_snapshots,
            snapshots_offset,
            incompatible_features,
            compatible_features,
            autoclear_features,
            refcount_order,
            header_length,
            compression_type,
            backing_file,
            backing_format,
            data_file,
            cluster_size,
            refcount_bits,
            dirty,
            corrupt,
            lazy_refcounts,
            extended_l2
        );
        Ok(d)
    }

    fn __repr__(&self) -> String {
        format!(
            "QcowHeader(version={}, size={}, cluster_size={}, refcount_bits={}, backing_file={})",
            self.version,
            self.size,
            self.cluster_size,
            self.refcount_bits,
            self.backing_file.as_deref().map_or_else(|| "None".to_string(), |b| format!("{b:?}"))
        )
    }
}

/// Table-level access to a qcow2 host file, as the seed's `QcowRawFile`: whole pointer tables
/// and refcount blocks read and written in single calls.
#[pyclass(name = "QcowRawFile", module = "qcowrs._qcowrs", frozen)]
pub struct PyQcowRawFile {
    inner: QcowRawFile,
}

impl PyQcowRawFile {
    fn with<R: Send>(&self, py: Python<'_>, f: impl FnOnce(&QcowRawFile) -> Result<R, Error> + Send) -> PyResult<R> {
        Ok(py.detach(|| f(&self.inner))?)
    }
}

#[pymethods]
impl PyQcowRawFile {
    /// Opens `path`; the cluster size and refcount width come from its header.
    #[staticmethod]
    #[pyo3(signature = (path, writable = false))]
    fn open(py: Python<'_>, path: PathBuf, writable: bool) -> PyResult<Self> {
        let raw = py.detach(|| -> Result<QcowRawFile, Error> {
            let f = crate::backing::open_image_file(&path, writable, "image")?;
            if writable {
                crate::lock::lock_image(&f, true, &format!("'{}'", path.display()))?;
            }
            let storage = Arc::new(FileStorage::new(f));
            let h = QcowHeader::read_from(&*storage)?;
            QcowRawFile::new(storage, h.cluster_size(), h.refcount_order, writable)
        })?;
        Ok(PyQcowRawFile { inner: raw })
    }

    /// Bytes per cluster.
    #[getter]
    fn cluster_size(&self, py: Python<'_>) -> PyResult<u64> {
        self.with(py, |r| Ok(r.cluster_size()))
    }

    /// Width of a refcount in bits.
    #[getter]
    fn refcount_bits(&self, py: Python<'_>) -> PyResult<u32> {
        self.with(py, |r| Ok(r.refcount_geometry().refcount_bits()))
    }

    /// Reads `count` big-endian u64 entries at `offset`, each ANDed with `mask` if given.
    #[pyo3(signature = (offset, count, mask = None))]
    fn read_pointer_table(&self, py: Python<'_>, offset: u64, count: u64, mask: Option<u64>) -> PyResult<Vec<u64>> {
        self.with(py, |r| r.read_pointer_table(offset, count, mask))
    }

    /// Writes `table` at `offset`, OR-ing `non_zero_flags` into every non-zero entry.
    #[pyo3(signature = (offset, table, non_zero_flags = 0))]
    fn write_pointer_table(&self, py: Python<'_>, offset: u64, table: Vec<u64>, non_zero_flags: u64) -> PyResult<()> {
        self.with(py, |r| r.write_pointer_table(offset, &table, non_zero_flags))
    }

    /// Reads the refcount block (one cluster) at `offset`.
    fn read_refcount_block(&self, py: Python<'_>, offset: u64) -> PyResult<Vec<u64>> {
        self.with(py, |r| r.read_refcount_block(offset))
    }

    /// Writes a refcount block (one cluster) at `offset`.
    fn write_refcount_block(&self, py: Python<'_>, offset: u64, refcounts: Vec<u64>) -> PyResult<()> {
        self.with(py, |r| r.write_refcount_block(offset, &refcounts))
    }
}
