"""``qcowrs.compare``: ``qemu-img compare`` from Python (the work runs in the Rust core,
``ops/compare.rs``, on every core with the GIL released)."""

from __future__ import annotations

import os
from collections.abc import Callable

from qcowrs import _qcowrs
from qcowrs._qcowrs import CompareResult

StrPath = str | os.PathLike[str]


def compare(
    a: StrPath,
    b: StrPath,
    *,
    strict: bool = False,
    format_a: str | None = None,
    format_b: str | None = None,
    force_share: bool = False,
    progress: Callable[[int, int], object] | None = None,
) -> CompareResult:
    """Compares the guest content of images ``a`` and ``b`` (qcow2 with their backing chains,
    or raw) as ``qemu-img compare`` does, and returns a :class:`CompareResult`.

    Images of different sizes compare as if the shorter one were padded with zeros, unless
    ``strict``: then a size difference, or any difference in block status (allocation, zero
    clusters, ...: the flags ``qemu-img map`` shows) makes them differ too.
    ``result.first_difference`` is the offset qemu-img prints: the start of the first 512-byte
    sector that differs (or, strict, the first offset whose block status differs).

    ``format_a``/``format_b`` ("qcow2" or "raw") skip probing (``-f``/``-F``);
    ``force_share`` opens images another process holds (``-U``). Only what the images
    allocate is read, on every core. ``progress(done, total)`` is called as the comparison
    goes; an exception it raises (or Ctrl-C) stops it. Neither image is written.

    Errors raise :class:`QcowError` (or ``ValueError`` for an unknown format); the exception
    carries ``compare_stage``: "open", "status" (a block status could not be found: damaged
    metadata) or "read" (qemu-img's exit codes 2, 3 and 4).
    """
    return _qcowrs.compare(
        os.fspath(a),
        os.fspath(b),
        strict=strict,
        format_a=format_a,
        format_b=format_b,
        force_share=force_share,
        progress=progress,
    )
