"""``qcowrs convert``: copy the guest content of a qcow2 image to a raw file or a new qcow2
image, skipping what reads as zeros (the target stays sparse)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from qcowrs._file import QcowFile

_CHUNK = 4 << 20


def _data_extents(src: QcowFile) -> list[tuple[int, int]]:
    """Ranges that may hold non-zero data. With a backing file, everything may."""
    if src.header.backing_file:
        return [(0, src.virtual_size)]
    return [(s, n) for s, n, kind in src.allocated_ranges() if kind != "zero"]


def convert(
    src_path: str,
    dst_path: str,
    fmt: str = "raw",
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Copies ``src_path``'s guest content to ``dst_path`` as ``fmt`` ("raw" or "qcow2");
    ``progress(done, total)`` is called after each chunk."""
    with QcowFile.open(src_path, mode="rb") as src:
        size = src.virtual_size
        extents = _data_extents(src)
        total = sum(n for _, n in extents)
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        zero = bytes(_CHUNK)
        done = [0]

        def tick(n: int) -> None:
            done[0] += n
            if progress is not None:
                progress(done[0], total)

        if fmt == "raw":
            with open(dst_path, "wb") as raw:
                raw.truncate(size)
                fd = raw.fileno()
                _copy(src, extents, view, zero, lambda off, b: os.pwrite(fd, b, off), tick)
        else:
            with QcowFile.create(dst_path, size, cluster_size=src.cluster_size) as dst:

                def put(off: int, b: memoryview) -> None:
                    dst.seek(off)
                    dst.write(b)

                _copy(src, extents, view, zero, put, tick)


def _copy(
    src: QcowFile,
    extents: list[tuple[int, int]],
    view: memoryview,
    zero: bytes,
    put: Callable[[int, memoryview], Any],
    tick: Callable[[int], None],
) -> None:
    for start, length in extents:
        off = start
        end = start + length
        while off < end:
            n = min(_CHUNK, end - off)
            src.seek(off)
            got = src.readinto(view[:n])
            chunk = view[:got]
            if chunk != zero[:got]:
                put(off, chunk)
            off += got
            tick(got)
            if got == 0:
                break
