"""`qcowrs.QcowFile`: a qcow2 image as a Python raw binary file (`io.RawIOBase`)."""

from __future__ import annotations

import io
import os
from typing import TYPE_CHECKING

from qcowrs import _qcowrs
from qcowrs._map import MapEntry

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["QcowFile"]

_MODES = {"rb": "rb", "r+b": "r+b", "rb+": "r+b"}


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
        cls,
        path: str | os.PathLike[str],
        mode: str | None = None,
        rebuild: bool = False,
        backing: bool | str | os.PathLike[str] = True,
        force_share: bool = False,
        snapshot: str | None = None,
    ) -> QcowFile:
        """Opens the qcow2 image at ``path``.

        ``mode`` is ``"rb"`` (read-only: the file is never modified) or ``"r+b"`` (read-write;
        ``"rb+"`` is accepted too). The default is ``"rb"``, or ``"r+b"`` with ``rebuild=True``.
        ``rebuild=True`` needs ``"r+b"``: before returning, it repairs the image as
        ``check(repair="all")`` does if its refcounts are stale (dirty bit, cluster 0 with
        refcount 0), its header names tables that cannot be used (an L1 table past the end of
        the file), or a check finds any corruption, leak or check error; ``rebuild_report``
        then holds the repair's report (with what it dropped).
        ``backing``: True follows the header's backing file; False opens the image alone (what
        the backing file would supply reads as zeros); a path uses that file instead.
        ``force_share`` (``"rb"`` only): take no lock, so an image a running VM holds can be
        inspected (``qemu-img -U``); reads may then see a moving target.
        ``snapshot`` (``"rb"`` only): the id or name of an internal snapshot: a read-only view
        of the disk as it was then (its size, its content over the backing chain).
        """
        if mode is None:
            mode = "r+b" if rebuild else "rb"
        if mode not in _MODES:
            raise ValueError(f"mode must be 'rb' or 'r+b', not {mode!r}")
        mode = _MODES[mode]
        if rebuild and mode != "r+b":
            raise ValueError("rebuild=True needs mode='r+b' (a rebuild writes the image)")
        if snapshot is not None and mode != "rb":
            raise ValueError("snapshot= needs mode='rb' (a snapshot view is read-only)")
        if force_share and mode != "rb":
            raise ValueError("force_share=True needs mode='rb' (a shared open never writes)")
        if backing is True:
            other, alone = None, False
        elif backing is False:
            other, alone = None, True
        else:
            other, alone = os.fspath(backing), False
        native = _qcowrs.QcowFile.open(
            os.fspath(path),
            writable=mode == "r+b",
            rebuild=rebuild,
            backing=other,
            no_backing=alone,
            force_share=force_share,
            snapshot=snapshot,
        )
        return cls(native, os.fspath(path), mode)

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        virtual_size: int | None = None,
        *,
        cluster_size: int = 65536,
        refcount_bits: int = 16,
        backing_file: str | os.PathLike[str] | None = None,
        backing_format: str | None = None,
        lazy_refcounts: bool = False,
        extended_l2: bool = False,
        compat: str = "1.1",
        preallocation: str = "off",
        compression_type: str = "zlib",
        data_file: str | os.PathLike[str] | None = None,
        data_file_raw: bool = False,
        unsafe: bool = False,
        overwrite: bool = True,
    ) -> QcowFile:
        """Creates a qcow2 image at ``path`` as ``qemu-img create -f qcow2`` does and returns it
        opened read-write (``"r+b"``).

        The keywords are ``qemu-img create``'s ``-o`` options with its defaults and checks:
        ``compat`` ``"1.1"`` (or ``"v3"``) or ``"0.10"`` (``"v2"``); ``preallocation``
        ``"off"``, ``"metadata"``, ``"falloc"`` or ``"full"``; ``compression_type`` ``"zlib"``
        or ``"zstd"``; ``data_file`` an external data file (created or replaced too; a relative
        name is relative to the image's folder) and ``data_file_raw`` its raw flag.
        ``virtual_size`` is rounded up to a multiple of 512 bytes.

        ``backing_file`` needs ``backing_format`` (``"qcow2"`` or ``"raw"``), as ``qemu-img``
        10 needs ``-F``; a relative name is relative to the image's folder and stored as given.
        With a backing file, ``virtual_size`` None (or 0) takes the backing file's size.
        ``unsafe=True`` (``qemu-img create -u``) does not open the backing file and needs a size.

        An existing file at ``path`` is replaced (``overwrite=False`` refuses with ``EEXIST``),
        but only once the new image is complete and synced: it is written to a temporary file in
        the same folder and renamed over ``path``. On any error nothing is left behind and the
        existing file is untouched. A file another process holds (a VM, ``qemu-io``) is refused
        with :class:`ImageLocked`.

        Bad values raise ``ValueError`` (a value out of range, options that contradict each
        other) or, for the cluster size, the refcount width and a size too large for the
        format, :class:`InvalidClusterSize` and :class:`UnsupportedFeature`, with
        ``qemu-img``'s reasons.
        """
        for name, value in (
            ("virtual_size", virtual_size),
            ("cluster_size", cluster_size),
            ("refcount_bits", refcount_bits),
        ):
            if value is not None and not 0 <= value < 1 << 64:
                raise ValueError(
                    f"Parameter '{name}' expects a non-negative number below 2^64, not {value}"
                )
        if backing_file is not None and backing_format is None:
            raise ValueError(
                "Backing file specified without backing format "
                "(give backing_format='qcow2' or 'raw', as qemu-img create -F)"
            )
        if virtual_size is None and backing_file is None:
            raise ValueError("Image creation needs a size parameter (virtual_size)")
        if refcount_bits >= 1 << 32:
            raise ValueError(
                f"Parameter 'refcount_bits' {refcount_bits} is not a power of two up to 64"
            )
        native = _qcowrs.QcowFile.create(
            os.fspath(path),
            virtual_size,
            cluster_size=cluster_size,
            refcount_bits=refcount_bits,
            backing_file=None if backing_file is None else os.fspath(backing_file),
            backing_format=backing_format,
            lazy_refcounts=bool(lazy_refcounts),
            extended_l2=bool(extended_l2),
            compat=compat,
            preallocation=preallocation,
            compression_type=compression_type,
            data_file=None if data_file is None else os.fspath(data_file),
            data_file_raw=bool(data_file_raw),
            unsafe=bool(unsafe),
            overwrite=bool(overwrite),
        )
        return cls(native, os.fspath(path), "r+b")

    # -- io.RawIOBase -------------------------------------------------------------------------

    def readable(self) -> bool:
        self._checkClosed()
        return True

    def seekable(self) -> bool:
        self._checkClosed()
        return True

    def writable(self) -> bool:
        self._checkClosed()
        return self.mode == "r+b"

    def write(self, data: Buffer) -> int:
        """Writes ``data`` (any bytes-like object) at the current position, with the GIL
        released. Allocates clusters (copy-on-write where needed); the metadata reaches the
        disk on :meth:`flush`. Writing past ``virtual_size`` raises :class:`InvalidOffset`."""
        self._checkClosed()
        n: int = self._native.write_at(data, self._pos)
        self._pos += n
        return n

    def pread(self, length: int, offset: int) -> bytes:
        """Reads up to ``length`` bytes at guest ``offset`` (short only at the end of the disk).
        The position is left alone; safe to call from several threads at once, and those reads
        run in parallel with the GIL released."""
        self._checkClosed()
        if length < 0 or offset < 0:
            raise ValueError("length and offset must be non-negative")
        data: bytes = self._native.read_at(offset, length)
        return data

    def preadinto(self, buffer: Buffer, offset: int) -> int:
        """Reads into ``buffer`` (a writable bytes-like object, no copy) at guest ``offset``;
        returns the bytes read. The position is left alone; thread-safe and parallel."""
        self._checkClosed()
        if offset < 0:
            raise ValueError("offset must be non-negative")
        n: int = self._native.readinto_at(buffer, offset)
        return n

    def pwrite(self, data: Buffer, offset: int, *, compressed: bool = False) -> int:
        """Writes ``data`` at guest ``offset``; returns the bytes written. The position is left
        alone. Writes are serialised (one at a time per handle).

        ``compressed=True`` stores each cluster compressed (with the image's compression type,
        packed into shared host clusters as ``qemu-img convert -c`` does); ``offset`` must then
        be a multiple of the cluster size and ``data`` whole clusters (the last cluster of the
        disk may be short). A cluster that does not compress is stored as it is."""
        self._checkClosed()
        if offset < 0:
            raise ValueError("offset must be non-negative")
        if compressed:
            written: int = self._native.write_compressed_at(data, offset)
            return written
        n: int = self._native.write_at(data, offset)
        return n

    def write_zeroes(self, offset: int, length: int) -> None:
        """Makes ``[offset, offset+length)`` read as zeros (whole clusters get the zero flag
        and no data is written)."""
        self._checkClosed()
        self._native.write_zeroes(offset, length)

    def discard(self, offset: int, length: int) -> None:
        """Frees the whole clusters inside ``[offset, offset+length)`` (they then read as
        zeros on v3 images; partial clusters are left unchanged); the freed space is punched
        out of the host file on :meth:`flush`."""
        self._checkClosed()
        self._native.discard(offset, length)

    def truncate(self, size: int | None = None) -> int:
        """Grows the virtual size to ``size`` bytes (default: the current position). Shrinking
        raises :class:`UnsupportedFeature`."""
        self._checkClosed()
        new = self._pos if size is None else size
        self._native.truncate(new)
        return new

    def flush(self) -> None:
        """Makes everything written so far durable; the image is consistent on disk."""
        if not self.closed and self.mode == "r+b":
            self._native.flush()

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
            try:
                super().close()  # flushes
            finally:
                self._native.close()

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

    def snapshots(self) -> list[_qcowrs.Snapshot]:
        """The internal snapshots, in table order (``qemu-img snapshot -l``)."""
        self._checkClosed()
        return list(self._native.snapshots())

    def create_snapshot(self, name: str) -> _qcowrs.Snapshot:
        """Records the disk as it is now as internal snapshot ``name`` (``qemu-img snapshot
        -c``; ``"r+b"``) and returns its entry. Names need not be unique (ids are)."""
        self._checkClosed()
        return self._native.create_snapshot(name)

    def apply_snapshot(self, id_or_name: str) -> None:
        """Reverts the disk, and its virtual size, to a snapshot (by id, else by name;
        ``qemu-img snapshot -a``; ``"r+b"``)."""
        self._checkClosed()
        self._native.apply_snapshot(id_or_name)

    def delete_snapshot(self, id_or_name: str) -> None:
        """Deletes a snapshot (by id, else by name; ``qemu-img snapshot -d``; ``"r+b"``):
        what only it held is freed."""
        self._checkClosed()
        self._native.delete_snapshot(id_or_name)

    def bitmaps(self) -> list[_qcowrs.Bitmap]:
        """The persistent dirty bitmaps, in directory order (name, granularity, enabled,
        in_use, persistent), as QEMU loads them: none when a program without bitmap support
        marked them inconsistent."""
        self._checkClosed()
        return list(self._native.bitmaps())

    def dirty_ranges(self, bitmap: str) -> list[tuple[int, int]]:
        """The guest ranges ``(offset, length)`` the bitmap named ``bitmap`` marks dirty, in
        order: one per run of set bits, each bit covering the bitmap's granularity, the last
        one cut at the end of the disk (what ``qemu-nbd -B`` exports). On a handle that has
        written, the enabled bitmaps include its writes. ``ValueError`` for a bitmap that is
        not there or is in use (inconsistent)."""
        self._checkClosed()
        return list(self._native.dirty_ranges(bitmap))

    def map(
        self, start_offset: int = 0, max_length: int | None = None, *, with_files: bool = False
    ) -> list[MapEntry]:
        """What every guest range reads from, over the whole backing chain: exactly the entries
        of ``qemu-img map --output=json`` (same boundaries, values and merging), as dicts with
        its keys in its order: ``start``, ``length``, ``depth`` (0: this image, 1: its backing
        file, ...), ``present``, ``zero``, ``data``, ``compressed``, and ``offset`` (the host
        offset in the file holding the data) only where qemu-img prints one.

        ``start_offset`` and ``max_length`` are qemu-img map's ``--start-offset`` and
        ``--max-length``: the map covers ``[start_offset, start_offset + max_length)`` clipped
        to the disk; when that is empty it is one entry of length 0, as qemu-img prints.

        ``with_files=True`` adds ``filename`` to each entry that has an ``offset``: the file the
        offset points into (this image as opened, its external data file, or a backing file as
        resolved from the image that names it), the "File" column of qemu-img's human output
        (see :func:`qcowrs._map.format_map_human`).

        Raises :class:`CorruptImage` for an entry QEMU cannot read either, or for more entries
        than the files can describe (L2 tables shared by many L1 entries).
        """
        self._checkClosed()
        if start_offset < 0:
            raise ValueError(f"start_offset must be non-negative, not {start_offset}")
        if max_length is not None and max_length < 0:
            raise ValueError(f"max_length must be non-negative, not {max_length}")
        entries: list[MapEntry] = self._native.map(start_offset, max_length, with_files=with_files)
        return entries

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
