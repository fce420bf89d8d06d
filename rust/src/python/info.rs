//! `qemu-img info`'s facts for Python (`_qcowrs.image_info`) and the `Snapshot` class.

use std::path::PathBuf;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::snapshot::Snapshot;

use super::types::PyQcowHeader;

/// One internal snapshot (a read-only record of its snapshot table entry).
#[pyclass(name = "Snapshot", module = "qcowrs._qcowrs", frozen)]
pub struct PySnapshot {
    /// Unique id string (QEMU numbers them "1", "2", ...).
    #[pyo3(get)]
    id: String,
    /// Name (QEMU's TAG).
    #[pyo3(get)]
    name: String,
    /// Creation time, seconds since the epoch.
    #[pyo3(get)]
    date_sec: u32,
    /// Creation time, nanoseconds part.
    #[pyo3(get)]
    date_nsec: u32,
    /// Guest clock at the snapshot, nanoseconds.
    #[pyo3(get)]
    vm_clock_ns: u64,
    /// Bytes of saved VM state (the 64-bit field where present).
    #[pyo3(get)]
    vm_state_size: u64,
    /// The disk's virtual size when the snapshot was taken (None in old entries).
    #[pyo3(get)]
    virtual_size: Option<u64>,
    /// Instruction count (None where absent, as QEMU's -1).
    #[pyo3(get)]
    icount: Option<u64>,
    /// Entries in the snapshot's L1 table.
    #[pyo3(get)]
    l1_size: u32,
    /// Host offset of the snapshot's L1 table.
    #[pyo3(get)]
    l1_table_offset: u64,
}

fn extra_u64(s: &Snapshot, at: usize) -> Option<u64> {
    let b = s.extra.get(at..at + 8)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    Some(u64::from_be_bytes(a))
}

impl From<&Snapshot> for PySnapshot {
    fn from(s: &Snapshot) -> Self {
        PySnapshot {
            id: s.id.clone(),
            name: s.name.clone(),
            date_sec: s.date_sec,
            date_nsec: s.date_nsec,
            vm_clock_ns: s.vm_clock_nsec,
            vm_state_size: extra_u64(s, 0).filter(|&v| v != 0).unwrap_or(u64::from(s.vm_state_size)),
            virtual_size: extra_u64(s, 8),
            icount: extra_u64(s, 16).filter(|&v| v != u64::MAX),
            l1_size: s.l1_size,
            l1_table_offset: s.l1_table_offset,
        }
    }
}

#[pymethods]
impl PySnapshot {
    /// Creation time as an aware `datetime` in UTC.
    #[getter]
    fn date<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let dt = py.import("datetime")?;
        let utc = dt.getattr("timezone")?.getattr("utc")?;
        let t = f64::from(self.date_sec) + f64::from(self.date_nsec) / 1e9;
        dt.getattr("datetime")?.call_method1("fromtimestamp", (t, utc))
    }

    fn __repr__(&self) -> String {
        format!(
            "Snapshot(id={:?}, name={:?}, date_sec={}, vm_state_size={})",
            self.id, self.name, self.date_sec, self.vm_state_size
        )
    }
}

/// Snapshot objects for a table.
pub fn snapshot_list(snapshots: &[Snapshot]) -> Vec<PySnapshot> {
    snapshots.iter().map(PySnapshot::from).collect()
}

/// What `qemu-img info` needs about the qcow version 1 image at `path`, as a dict:
/// `virtual_size`, `size` (the header's), `cluster_size`, `l2_bits`, `l1_table_offset`,
/// `encrypted`, `mtime`, `backing_file` (str|None).
#[pyfunction]
#[pyo3(signature = (path, force_share = false))]
pub fn qcow1_info(py: Python<'_>, path: PathBuf, force_share: bool) -> PyResult<Bound<'_, PyDict>> {
    let h = py.detach(|| crate::ops::info::qcow1_info(&path, force_share))?;
    let d = PyDict::new(py);
    d.set_item("virtual_size", h.virtual_size())?;
    d.set_item("size", h.size)?;
    d.set_item("cluster_size", h.cluster_size())?;
    d.set_item("l2_bits", h.l2_bits)?;
    d.set_item("l1_table_offset", h.l1_table_offset)?;
    d.set_item("encrypted", h.crypt_method != 0)?;
    d.set_item("mtime", h.mtime)?;
    d.set_item("backing_file", h.backing_file)?;
    Ok(d)
}

/// What `qemu-img info` needs about the qcow2 image at `path`, as a dict: `header`
/// (QcowHeader), `file_length`, `snapshots` ([Snapshot]), `snapshot_error` (str|None),
/// `bitmaps` ([{name, granularity, flags}]), `bitmap_warning` (str|None).
#[pyfunction]
#[pyo3(signature = (path, force_share = false))]
pub fn image_info(py: Python<'_>, path: PathBuf, force_share: bool) -> PyResult<Bound<'_, PyDict>> {
    let info = py.detach(|| crate::ops::info::image_info(&path, force_share))?;
    let d = PyDict::new(py);
    d.set_item("header", PyQcowHeader::from(&info.header))?;
    d.set_item("file_length", info.file_length)?;
    d.set_item("snapshots", snapshot_list(&info.snapshots))?;
    d.set_item("snapshot_error", info.snapshot_error)?;
    let bitmaps = PyList::empty(py);
    for b in &info.bitmaps {
        let e = PyDict::new(py);
        let mut flags = Vec::new();
        if b.flags & 1 != 0 {
            flags.push("in-use");
        }
        if b.flags & 2 != 0 {
            flags.push("auto");
        }
        e.set_item("flags", flags)?;
        e.set_item("name", &b.name)?;
        e.set_item("granularity", 1u64.checked_shl(u32::from(b.granularity_bits)).unwrap_or(0))?;
        bitmaps.append(e)?;
    }
    d.set_item("bitmaps", bitmaps)?;
    d.set_item("bitmap_warning", info.bitmap_warning)?;
    Ok(d)
}
