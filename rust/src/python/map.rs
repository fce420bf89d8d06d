//! `QcowFile.map()` for Python: the entries of `qemu-img map --output=json` as dicts with
//! qemu-img's keys in its order.

use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString};

use crate::ops::map::ImageMap;

/// The entries of `m` as a list of dicts: `start`, `length`, `depth`, `present`, `zero`,
/// `data`, `compressed`, then `offset` when the entry has one, and with `with_files` also
/// `filename` (the file `offset` points into) when it has one.
pub(crate) fn map_to_list<'py>(py: Python<'py>, m: &ImageMap, with_files: bool) -> PyResult<Bound<'py, PyList>> {
    let files: Vec<Bound<'py, PyString>> = if with_files {
        // OS strings convert as `os.fsdecode` does; the conversion cannot fail.
        let name = |p: &std::path::PathBuf| match p.as_os_str().into_pyobject(py) {
            Ok(s) => s,
            Err(never) => match never {},
        };
        m.files.iter().map(name).collect()
    } else {
        Vec::new()
    };
    let list = PyList::empty(py);
    for e in &m.entries {
        let d = PyDict::new(py);
        d.set_item(intern!(py, "start"), e.start)?;
        d.set_item(intern!(py, "length"), e.length)?;
        d.set_item(intern!(py, "depth"), e.depth)?;
        d.set_item(intern!(py, "present"), e.present)?;
        d.set_item(intern!(py, "zero"), e.zero)?;
        d.set_item(intern!(py, "data"), e.data)?;
        d.set_item(intern!(py, "compressed"), e.compressed)?;
        if let Some(off) = e.offset {
            d.set_item(intern!(py, "offset"), off)?;
            if let Some(name) = files.get(e.depth as usize) {
                d.set_item(intern!(py, "filename"), name)?;
            }
        }
        list.append(d)?;
    }
    Ok(list)
}
