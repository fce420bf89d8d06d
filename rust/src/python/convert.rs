//! `qcowrs._qcowrs.convert`: the convert engine (`ops::convert`) for Python, the GIL released
//! while it runs (taken back only to report progress and to see Ctrl-C).

use std::path::PathBuf;

use pyo3::prelude::*;

use crate::create::CreateOptions;
use crate::error::Error;
use crate::ops::convert::{ConvertOptions, OutputFormat};

/// Converts `sources` (concatenated) into `target`; see `qcowrs.convert`. `progress(done,
/// total)` is called as the work goes on; an exception it raises (and Ctrl-C) stops the
/// convert and is raised here.
#[pyfunction]
#[pyo3(signature = (
    sources, target, output_format, *, source_format = None, compress = false,
    compression_type = "zlib", backing_file = None, backing_format = None, sparse_size = 4096,
    existing_target = false, target_is_zero = false, cluster_size = 65536, refcount_bits = 16,
    compat = "1.1", lazy_refcounts = false, extended_l2 = false, preallocation = "off",
    data_file = None, data_file_raw = false, threads = 0, force_share = false, unsafe_cache = false,
    window = None,
    snapshot = None,
    progress = None
))]
#[allow(clippy::too_many_arguments, clippy::fn_params_excessive_bools)]
pub fn convert(
    py: Python<'_>,
    sources: Vec<PathBuf>,
    target: PathBuf,
    output_format: &str,
    source_format: Option<String>,
    compress: bool,
    compression_type: &str,
    backing_file: Option<String>,
    backing_format: Option<String>,
    sparse_size: u64,
    existing_target: bool,
    target_is_zero: bool,
    cluster_size: u64,
    refcount_bits: u32,
    compat: &str,
    lazy_refcounts: bool,
    extended_l2: bool,
    preallocation: &str,
    data_file: Option<String>,
    data_file_raw: bool,
    threads: usize,
    force_share: bool,
    unsafe_cache: bool,
    window: Option<(u64, u64)>,
    snapshot: Option<String>,
    progress: Option<Py<PyAny>>,
) -> PyResult<()> {
    let output_format = match output_format {
        "raw" => OutputFormat::Raw,
        "qcow2" => OutputFormat::Qcow2,
        other => {
            return Err(Error::InvalidArgument(format!("output format '{other}': qcowrs writes raw and qcow2")).into())
        }
    };
    let create = CreateOptions {
        virtual_size: 0,
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
        unsafe_backing: false,
        overwrite: true,
    };
    let opts = ConvertOptions {
        output_format,
        source_format,
        create,
        compress,
        sparse_size,
        existing_target,
        target_is_zero,
        threads,
        force_share,
        unsafe_cache,
        window,
        snapshot,
    };
    let run = |report: super::progress::Report<'_>| crate::ops::convert::convert(&sources, &target, &opts, report);
    Ok(super::progress::detach_with_progress(py, progress.as_ref(), "convert", run)??)
}
