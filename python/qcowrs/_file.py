"""`qcowrs.QcowFile`: a qcow2 image as a Python raw binary file (`io.RawIOBase`)."""

from __future__ import annotations

import io
import os
from typing import TYPE_CHECKING

from qcowrs import _qcowrs

if TYPE_CHECKING:
    from collections.abc import Buffer

__all__ = ["QcowFile"]

_MODES = ("rb", "r+b")


class QcowFile(io.RawIOBase):
    """A qcow2 image as a guest disk: ``read``/``readinto``/``seek``/``tell`` over the virtual
    disk, plus image-level operations. Create instances with :meth:`QcowFile.open`.

    Reads go straight into the caller's buffer with the GIL released; the position is kept here.
    """

    def __init__(self, native: _qcowrs.QcowFile, name: str, mode: str) -> None:
        super().__init__()
        self._native = native
        self._pos = 0
        self.name = name
        self.mode = mode

    @classmethod
    def open(
        cls, path: str | os.PathLike[str], mode: str = "r+b", rebuild: bool = False
    ) -> QcowFile:
        """Opens the qcow2 image at ``path``.

        ``mode`` is ``"rb"`` (read-only: the file is never modified) or ``"r+b"`` (read-write).
        ``rebuild=True`` rebuilds stale refcounts before returning and needs ``"r+b"``.
        """
        if mode not in _MODES:
            raise ValueError(f"mode must be 'rb' or 'r+b', not {mode!r}")
        if rebuild and mode != "r+b":
            raise ValueError("rebuild=True needs mode='r+b' (a rebuild writes the image)")
        native = _qcowrs.QcowFile.open(os.fspath(path), writable=mode == "r+b", rebuild=rebuild)
        return cls(native, os.fspath(path), mode)

    # -- io.RawIOBase -------------------------------------------------------------------------

    def readable(self) -> bool:
        self._checkClosed()
        return True

    def seekable(self) -> bool:
        self._checkClosed()
        return True

    def writable(self) -> bool:
        self._checkClosed()
        return False

    def write(self, data: Buffer) -> int:
        """Writing is not supported yet."""
        self._checkClosed()
        raise io.UnsupportedOperation("write: qcowrs cannot write images yet")

    def readinto(self, buffer: Buffer) -> int:
        """Reads into ``buffer`` (a writable bytes-like object) without copying."""
        self._checkClosed()
        n: int = self._native.readinto_at(buffer, self._pos)
        self._pos += n
        return n

    def readall(self) -> bytes:
        self._checkClosed()
        size = self._native.virtual_size
        data: bytes = self._native.read_at(self._pos, max(size - self._pos, 0))
        self._pos += len(data)
        return data

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._checkClosed()
        if whence == io.SEEK_SET:
            new = offset
        elif whence == io.SEEK_CUR:
            new = self._pos + offset
        elif whence == io.SEEK_END:
            new = self._native.virtual_size + offset
        else:
            raise ValueError(f"invalid whence ({whence}, should be 0, 1 or 2)")
        if new < 0:
            raise OSError(22, f"negative seek position {new}")
        self._pos = new
        return new

    def tell(self) -> int:
        self._checkClosed()
        return self._pos

    def close(self) -> None:
        if not self.closed:
            self._native.close()
        super().close()

    def __enter__(self) -> QcowFile:
        self._checkClosed()
        return self

    # -- the image ----------------------------------------------------------------------------

    @property
    def virtual_size(self) -> int:
        """Guest-visible size in bytes."""
        self._checkClosed()
        return int(self._native.virtual_size)

    @property
    def cluster_size(self) -> int:
        """Bytes per cluster."""
        self._checkClosed()
        return int(self._native.cluster_size)

    @property
    def header(self) -> _qcowrs.QcowHeader:
        """A read-only snapshot of the parsed header."""
        self._checkClosed()
        return self._native.header

    def allocated_ranges(self) -> list[tuple[int, int, str]]:
        """``[(guest_offset, length, kind)]``, kind in ``{"data", "zero", "compressed"}``: what
        this image itself holds (depth 0 of ``qemu-img map``), not its backing files."""
        self._checkClosed()
        return list(self._native.allocated_ranges())

    def check(self) -> _qcowrs.CheckReport:
        """Checks the image like ``qemu-img check`` (no repair)."""
        self._checkClosed()
        return self._native.check()

    def rebuild_refcounts(self) -> _qcowrs.CheckReport:
        """Rebuilds the refcount structure (repairing what ``qemu-img check -r all`` would) and
        returns a check of the result. Needs mode ``"r+b"``."""
        self._checkClosed()
        return self._native.rebuild_refcounts()

    @property
    def refcounts_stale(self) -> bool:
        """True if the refcounts cannot be trusted (a write would need a rebuild first)."""
        self._checkClosed()
        return bool(self._native.refcounts_stale)

    @property
    def rebuild_report(self) -> _qcowrs.CheckReport | None:
        """The report of the repair done by ``open(..., rebuild=True)``, or None."""
        self._checkClosed()
        return self._native.rebuild_report

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"virtual_size={self._native.virtual_size}"
        return f"<qcowrs.QcowFile name={self.name!r} mode={self.mode!r} {state}>"
