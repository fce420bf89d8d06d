//! The one audited zero-copy helper: a writable, C-contiguous Python buffer as `&mut [u8]`
//! for the duration of a closure that runs with the GIL released.

use pyo3::buffer::PyUntypedBuffer;
use pyo3::exceptions::{PyBufferError, PyTypeError};
use pyo3::prelude::*;

/// Runs `f` on the bytes of `obj` (any writable C-contiguous buffer: `bytearray`, `memoryview`, `array`, ...) without copying,
/// detached from the interpreter.
#[allow(unsafe_code)]
pub(crate) fn with_writable_buffer<R: Send>(
    py: Python<'_>,
    obj: &Bound<'_, PyAny>,
    f: impl FnOnce(&mut [u8]) -> R + Send,
) -> PyResult<R> {
    let buf = PyUntypedBuffer::get(obj)?;
    if buf.readonly() {
        return Err(PyTypeError::new_err("readinto() needs a writable buffer (bytearray or writable memoryview)"));
    }
    if !buf.is_c_contiguous() {
        return Err(PyBufferError::new_err("readinto() needs a C-contiguous buffer"));
    }
    let ptr = buf.buf_ptr() as usize;
    let len = buf.len_bytes();
    let r = py.detach(move || {
        // SAFETY: `buf` holds the buffer export until after this closure returns, which pins
        // the memory: an exported bytearray cannot be resized or freed, and the exporter
        // guarantees `len` bytes at `ptr`. It is writable (checked above) and contiguous.
        // Another Python thread writing the same buffer concurrently is a data race on plain
        // bytes that Python code cannot observe as anything worse than mixed contents, the same
        // contract as `io.FileIO.readinto` (and cryptography's buf.rs).
        let slice: &mut [u8] =
            if len == 0 { &mut [] } else { unsafe { std::slice::from_raw_parts_mut(ptr as *mut u8, len) } };
        f(slice)
    });
    drop(buf);
    Ok(r)
}

/// Runs `f` on the bytes of any C-contiguous buffer (`bytes`, `bytearray`, `memoryview`, ...)
/// without copying, detached from the interpreter.
#[allow(unsafe_code)]
pub(crate) fn with_readable_buffer<R: Send>(
    py: Python<'_>,
    obj: &Bound<'_, PyAny>,
    f: impl FnOnce(&[u8]) -> R + Send,
) -> PyResult<R> {
    let buf = PyUntypedBuffer::get(obj)?;
    if !buf.is_c_contiguous() {
        return Err(PyBufferError::new_err("write() needs a C-contiguous buffer"));
    }
    let ptr = buf.buf_ptr() as usize;
    let len = buf.len_bytes();
    let r = py.detach(move || {
        // SAFETY: as in `with_writable_buffer`: the export held by `buf` pins `len` bytes at
        // `ptr` until after this closure returns; we only read them.
        let slice: &[u8] = if len == 0 { &[] } else { unsafe { std::slice::from_raw_parts(ptr as *const u8, len) } };
        f(slice)
    });
    drop(buf);
    Ok(r)
}
