"""``qcowrs.convert``: ``qemu-img convert`` from Python (the work runs in the Rust core,
``ops/convert.rs``, on every core with the GIL released)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from qcowrs import _qcowrs

_CACHE_MODES = ("none", "writeback", "unsafe", "directsync", "writethrough")
_BLOCK = 1 << 20
_ZERO = bytes(_BLOCK)


@contextlib.contextmanager
def _spool_stdin(directory: str) -> Iterator[str]:
    """Standard input (a raw stream of unknown length) copied into a sparse temporary file
    beside the target (all-zero blocks become holes), removed afterwards."""
    import tempfile  # only here: it costs the command line's start-up several milliseconds

    fd, path = tempfile.mkstemp(prefix=".qcowrs-stdin-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as out:
            src = sys.stdin.buffer
            size = 0
            while True:
                block = src.read(_BLOCK)
                if not block:
                    break
                if block == _ZERO[: len(block)]:
                    out.seek(len(block), os.SEEK_CUR)
                else:
                    out.write(block)
                size += len(block)
            out.truncate(size)
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


StrPath = str | os.PathLike[str]

# qemu-img's -o names for a qcow2 target, and the keyword of the core they set.
_QCOW2_OPTIONS = {
    "compat": "compat",
    "cluster_size": "cluster_size",
    "refcount_bits": "refcount_bits",
    "lazy_refcounts": "lazy_refcounts",
    "extended_l2": "extended_l2",
    "preallocation": "preallocation",
    "compression_type": "compression_type",
    "data_file": "data_file",
    "data_file_raw": "data_file_raw",
    "backing_file": "backing_file",
    "backing_fmt": "backing_format",
}


def convert(
    src: StrPath | Sequence[StrPath],
    dst: StrPath,
    output_format: str = "qcow2",
    *,
    source_format: str | None = None,
    compress: str | None = None,
    backing_file: str | None = None,
    backing_format: str | None = None,
    sparse_size: int = 4096,
    target_is_zero: bool = False,
    existing_target: bool = False,
    cluster_size: int | None = None,
    options: dict[str, Any] | None = None,
    snapshot: str | None = None,
    threads: int | None = None,
    force_share: bool = False,
    target_cache: str = "writeback",
    progress: Callable[[int, int], object] | None = None,
) -> None:
    """Copies the guest content of ``src`` (one image or several, concatenated; qcow2 or qcow
    version 1 with its backing chain, or raw; ``source_format`` "qcow2", "qcow" or "raw",
    probed when None) into ``dst`` as ``output_format`` ("raw" or "qcow2"), as
    ``qemu-img convert`` does.

    Only what the sources allocate is read (block status over the whole chain); zero runs of at
    least ``sparse_size`` bytes stay unallocated (0: a fully allocated target). ``compress``
    ("zlib" or "zstd") writes compressed clusters; ``backing_file`` keeps that backing file and
    writes only what differs from it (``-B``); ``existing_target`` writes into an existing
    ``dst`` (``-n``), ``target_is_zero`` (with it) skips writing zeros. ``options`` are
    qemu-img's ``-o`` creation options. ``progress(done, total)`` is called as the copy goes;
    an exception it raises (or Ctrl-C) stops the convert, leaving the source untouched and the
    target a valid image. A target that is a file the convert reads (the source, its backing
    chain, the new backing file) or that another process holds is refused before anything is
    written. ``dst`` "-" writes the image to standard output, front to back (a pipe will do;
    qcow2 is laid out metadata first, after a first pass over the data); a source "-" is a raw
    image read from standard input. ``target_cache="unsafe"`` never syncs the target
    (``qemu-img convert``'s default: faster, but a power cut soon after can leave anything);
    the default ("writeback") orders the target's metadata writes and returns once all is
    durable.
    """
    if target_cache not in _CACHE_MODES:
        raise ValueError(f"Invalid cache option: {target_cache}")
    unsafe_cache = target_cache == "unsafe"
    if output_format not in ("raw", "qcow2"):
        raise ValueError(f"output_format: qcowrs writes raw and qcow2, not {output_format!r}")
    if compress not in (None, "zlib", "zstd"):
        raise ValueError(f"compress: None, 'zlib' or 'zstd', not {compress!r}")
    sources = (
        [os.fspath(src)] if isinstance(src, (str, os.PathLike)) else [os.fspath(s) for s in src]
    )
    kwargs: dict[str, Any] = {}
    for key, value in (options or {}).items():
        name = _QCOW2_OPTIONS.get(key.replace("-", "_"))
        if name is None or output_format != "qcow2":
            raise ValueError(f"options: {output_format} does not support option {key!r}")
        kwargs[name] = value
    if cluster_size is not None:
        kwargs["cluster_size"] = cluster_size
    if backing_file is not None:
        kwargs["backing_file"] = backing_file
    if backing_format is not None:
        kwargs["backing_format"] = backing_format
    if compress is not None:
        kwargs["compression_type"] = compress
    kwargs["unsafe_cache"] = unsafe_cache
    if "compat" in kwargs:
        kwargs["compat"] = {"v2": "0.10", "v3": "1.1"}.get(
            str(kwargs["compat"]), str(kwargs["compat"])
        )
    if snapshot is not None:
        kwargs["snapshot"] = snapshot
    with contextlib.ExitStack() as stack:
        if "-" in sources:
            if source_format not in (None, "raw"):
                raise ValueError("a source read from standard input ('-') is raw")
            spool = stack.enter_context(_spool_stdin(os.path.dirname(os.fspath(dst)) or "."))
            sources = [spool if s == "-" else s for s in sources]
            source_format = "raw"
        _run(
            sources,
            dst,
            output_format,
            source_format,
            compress,
            sparse_size,
            existing_target,
            target_is_zero,
            threads,
            force_share,
            progress,
            kwargs,
            None,
        )


def _run(
    sources: list[str],
    dst: StrPath,
    output_format: str,
    source_format: str | None,
    compress: str | None,
    sparse_size: int,
    existing_target: bool,
    target_is_zero: bool,
    threads: int | None,
    force_share: bool,
    progress: Callable[[int, int], object] | None,
    kwargs: dict[str, Any],
    window: tuple[int, int] | None,
) -> None:
    _qcowrs.convert(
        sources,
        os.fspath(dst),
        output_format,
        source_format=source_format,
        compress=compress is not None,
        sparse_size=sparse_size,
        existing_target=existing_target,
        target_is_zero=target_is_zero,
        threads=threads or 0,
        force_share=force_share,
        progress=progress,
        window=window,
        **kwargs,
    )


_NO_LIMIT = (1 << 64) - 1


def dd(
    src: StrPath,
    dst: StrPath,
    *,
    bs: int = 512,
    count: int | None = None,
    skip: int = 0,
    source_format: str | None = None,
    output_format: str = "raw",
    force_share: bool = False,
    progress: Callable[[int, int], object] | None = None,
) -> None:
    """``qemu-img dd``: the source's guest bytes from ``skip * bs`` up to ``count * bs`` (or
    its end) into a new ``dst`` (raw or qcow2, created or replaced), on convert's engine. As
    in qemu-img, ``count`` counts from the start of the source, so the skipped blocks are
    part of it."""
    if not 1 <= bs <= 2**31 - 1:
        raise ValueError("Invalid bs specified. Must be between 1 and 2147483647.")
    if skip < 0:
        raise ValueError("Invalid skip specified. Must be between 0 and 9223372036854775807.")
    if count is not None and count < 0:
        raise ValueError("Invalid count specified. Must be between 0 and 9223372036854775807.")
    offset = skip * bs
    length = _NO_LIMIT if count is None else count * bs - offset
    if length < 0:
        raise ValueError(f"{os.fspath(src)}: cannot skip to specified offset")
    if output_format not in ("raw", "qcow2"):
        raise ValueError(f"output_format: qcowrs writes raw and qcow2, not {output_format!r}")
    _run(
        [os.fspath(src)],
        dst,
        output_format,
        source_format,
        None,
        4096,
        False,
        False,
        None,
        force_share,
        progress,
        {},
        (offset, length),
    )
