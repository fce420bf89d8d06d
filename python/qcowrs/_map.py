"""``qemu-img map``'s output formats over the entries of :meth:`qcowrs.QcowFile.map`.

:func:`format_map_human` lays entries out as ``qemu-img map`` (``--output=human``, its default)
prints them; ``json.dumps(f.map())`` already has ``--output=json``'s keys and values.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NotRequired, TypedDict

__all__ = ["MapEntry", "MapFormatError", "format_map_human"]


class MapEntry(TypedDict):
    """One entry of ``qemu-img map --output=json`` (keys in qemu-img's order)."""

    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    compressed: bool
    offset: NotRequired[int]
    filename: NotRequired[str]


class MapFormatError(ValueError):
    """The entries cannot be shown in qemu-img's human format: data without a host offset
    (compressed clusters). qemu-img prints the lines before it, then fails; ``output`` holds
    those lines (header included), and the message is qemu-img's."""

    def __init__(self, message: str, output: str) -> None:
        super().__init__(message)
        self.output = output


def _hex(value: int) -> str:
    # C's "%#x": no 0x prefix for zero.
    return f"{value:#x}" if value else "0"


def format_map_human(entries: Iterable[MapEntry]) -> str:
    """The text ``qemu-img map IMAGE`` prints for ``entries`` (from ``f.map(with_files=True)``):
    a header, then one line per entry that holds data and does not read as zeros, with the
    guest offset, the length, the host offset (in hex with ``0x``, ``0`` for zero, each padded to
    16 columns) and the file that holds it (empty without ``filename``). Zero, unallocated and
    backing-less ranges are not printed.

    Raises :class:`MapFormatError` (a ``ValueError``) if an entry holds data without a host
    offset (compressed clusters), as qemu-img fails with "File contains external, encrypted or
    compressed clusters."; ``.output`` holds what qemu-img printed before failing.
    """
    lines = [f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File"]
    first = True
    for e in entries:
        # qemu-img checks each entry before printing it; every entry after a printed one has
        # its flags folded to "zero" when it is not plain data, so only the first entry can
        # fail while reading as zeros.
        if e["data"] and "offset" not in e and (first or not e["zero"]):
            text = "".join(line + "\n" for line in lines)
            raise MapFormatError("File contains external, encrypted or compressed clusters.", text)
        first = False
        if e["data"] and not e["zero"]:
            start, length, host = _hex(e["start"]), _hex(e["length"]), _hex(e.get("offset", 0))
            lines.append(f"{start:<16}{length:<16}{host:<16}{e.get('filename', '')}")
    return "".join(line + "\n" for line in lines)


def raw_map(path: str, start_offset: int = 0, max_length: int | None = None) -> list[MapEntry]:
    """``qemu-img map`` of a raw image: its data and holes (``SEEK_DATA``/``SEEK_HOLE``), the
    length rounded up to 512 bytes as QEMU's file layer does (the tail past the end of the file
    reads as zeros); every entry has its ``offset`` (= its guest offset)."""
    import os

    with open(path, "rb") as fh:
        real = fh.seek(0, os.SEEK_END)
        size = (real + 511) // 512 * 512
        end = size if max_length is None else min(size, start_offset + max_length)
        out: list[MapEntry] = []

        def add(start: int, length: int, data: bool) -> None:
            if length <= 0:
                return
            last = out[-1] if out else None
            if (
                last is not None
                and last["data"] == data
                and last["start"] + last["length"] == start
            ):
                last["length"] += length
                return
            out.append(
                {
                    "start": start,
                    "length": length,
                    "depth": 0,
                    "present": True,
                    "zero": not data,
                    "data": data,
                    "compressed": False,
                    "offset": start,
                }
            )

        pos = min(start_offset, end)
        while pos < min(end, real):
            try:
                data_at = os.lseek(fh.fileno(), pos, os.SEEK_DATA)
            except OSError:
                data_at = real
            data_at = min(data_at, real, end)
            add(pos, data_at - pos, False)
            if data_at >= min(end, real):
                pos = data_at
                break
            hole_at = min(os.lseek(fh.fileno(), data_at, os.SEEK_HOLE), real, end)
            add(data_at, hole_at - data_at, True)
            pos = hole_at
        add(pos, end - pos, False)
        if not out:
            # An empty window: one empty entry at the offset asked for, as qemu-img prints.
            out.append(
                {
                    "start": start_offset,
                    "length": 0,
                    "depth": 0,
                    "present": False,
                    "zero": False,
                    "data": False,
                    "compressed": False,
                }
            )
        for e in out:
            if "offset" in e:
                e["filename"] = path
        return out
