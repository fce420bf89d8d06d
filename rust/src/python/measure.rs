//! `qcowrs._qcowrs.measure`: `ops::measure` for Python, the GIL released while the source is
//! opened and mapped.

use std::path::PathBuf;

use pyo3::prelude::*;

use crate::error::Error;
use crate::ops::convert::OutputFormat;
use crate::ops::measure::{MeasureInput, MeasureOptions};

/// Measures a new image of `output_format` ("raw" or "qcow2") for a disk of `size` bytes or
/// for the guest content of `source` (exactly one of them); see `qcowrs.measure`. The other
/// arguments are qemu-img's `-o` options (`size_option` is `-o size=`), `-f`, `-U` and `-l`
/// (`snapshot`: an internal snapshot's id, else name).
/// Returns `(required, fully_allocated, bitmaps)`, `bitmaps` None where qemu-img prints none.
#[pyfunction]
#[pyo3(signature = (
    size, source, output_format, *, size_option = None, cluster_size = 65536, compat = None,
    refcount_bits = 16, extended_l2 = false, preallocation = None, backing_file = None,
    encrypt_format = None, encrypt_key_secret = None, source_format = None, force_share = false,
    snapshot = None
))]
#[allow(clippy::too_many_arguments)]
pub fn measure(
    py: Python<'_>,
    size: Option<u64>,
    source: Option<PathBuf>,
    output_format: &str,
    size_option: Option<u64>,
    cluster_size: u64,
    compat: Option<String>,
    refcount_bits: u64,
    extended_l2: bool,
    preallocation: Option<String>,
    backing_file: Option<String>,
    encrypt_format: Option<String>,
    encrypt_key_secret: Option<String>,
    source_format: Option<String>,
    force_share: bool,
    snapshot: Option<String>,
) -> PyResult<(u64, u64, Option<u64>)> {
    let output_format = match output_format {
        "raw" => OutputFormat::Raw,
        "qcow2" => OutputFormat::Qcow2,
        other => {
            return Err(Error::InvalidArgument(format!("output format '{other}': qcowrs measures raw and qcow2")).into())
        }
    };
    let opts = MeasureOptions {
        output_format,
        size: size_option,
        cluster_size,
        compat,
        refcount_bits,
        extended_l2,
        preallocation,
        backing_file,
        encrypt_format,
        encrypt_key_secret,
        source_format,
        force_share,
        snapshot,
    };
    let m = py.detach(|| match (size, &source) {
        (Some(n), None) => crate::ops::measure::measure(MeasureInput::Size(n), &opts),
        (None, Some(p)) => crate::ops::measure::measure(MeasureInput::Source(p), &opts),
        _ => Err(Error::InvalidArgument("measure: give either a size or a source, not both".into())),
    })?;
    Ok((m.required, m.fully_allocated, m.bitmaps))
}
