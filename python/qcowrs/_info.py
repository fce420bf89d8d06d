"""``qcowrs.info()``: what ``qemu-img info --output=json`` says about an image, with the same
keys in the same order, and its human layout (:func:`format_info_human`)."""

from __future__ import annotations

import math
import os
import stat
import time
from typing import Any

from qcowrs import _qcowrs
from qcowrs._errors import QcowError

__all__ = ["format_info_human", "info", "probe_format", "size_to_str"]

_QCOW2_MAGIC = b"QFI\xfb"
# Backing chains longer than this are refused (the image layer has the same limit).
_MAX_CHAIN = 256


def size_to_str(value: int) -> str:
    """A byte count as QEMU prints it: three significant digits and a binary unit
    (``216 KiB``, ``1.25 MiB``, ``0 B``)."""
    suffixes = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"]
    _, exp = math.frexp(value / (1000.0 / 1024.0))
    i = int((exp - 1) / 10)  # C division: towards zero
    i = max(0, min(i, len(suffixes) - 1))
    return "%0.3g %sB" % (value / (1 << (i * 10)), suffixes[i])  # noqa: UP031 (C's %g)


def probe_format(path: str | os.PathLike[str]) -> str:
    """``"qcow"`` if the file starts with the qcow magic and version 1, ``"qcow2"`` with
    another version, else ``"raw"`` (QEMU's probe for the formats qcowrs reads)."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head[:4] != _QCOW2_MAGIC:
        return "raw"
    return "qcow" if head[4:8] == b"\0\0\0\1" else "qcow2"


def _file_sizes(path: str) -> tuple[int, int]:
    """(length, bytes allocated on disk) of a file or block device."""
    st = os.stat(path)
    if stat.S_ISBLK(st.st_mode):
        with open(path, "rb") as fh:
            return fh.seek(0, os.SEEK_END), 0
    # QEMU's file layer counts whole 512-byte sectors.
    return (st.st_size + 511) // 512 * 512, st.st_blocks * 512


def _file_child(path: str, length: int, allocated: int) -> dict[str, Any]:
    return {
        "name": "file",
        "info": {
            "children": [],
            "virtual-size": length,
            "filename": path,
            "format": "file",
            "actual-size": allocated,
            "format-specific": {"type": "file", "data": {}},
            "dirty-flag": False,
        },
    }


def _snapshot_dict(s: _qcowrs.Snapshot) -> dict[str, Any]:
    d: dict[str, Any] = {}
    if s.icount is not None:
        d["icount"] = s.icount
    d.update(
        {
            "vm-clock-nsec": s.vm_clock_ns % 1_000_000_000,
            "name": s.name,
            "date-sec": s.date_sec,
            "date-nsec": s.date_nsec,
            "vm-clock-sec": s.vm_clock_ns // 1_000_000_000,
            "id": s.id,
            "vm-state-size": s.vm_state_size,
        }
    )
    return d


def _combine(image: str, backing: str) -> str:
    """QEMU's ``path_combine``: a relative backing name is relative to the image's directory
    (no normalisation: ``sub/../base.qcow2``)."""
    if os.path.isabs(backing) or "/" not in image:
        return backing
    return image[: image.rfind("/") + 1] + backing


def _qcow2_info(path: str, force_share: bool) -> tuple[dict[str, Any], list[str]]:
    facts = _qcowrs.image_info(path, force_share=force_share)
    h: _qcowrs.QcowHeader = facts["header"]
    length, allocated = _file_sizes(path)
    warnings: list[str] = []
    d: dict[str, Any] = {"children": [_file_child(path, length, allocated)]}
    if h.backing_file and h.backing_format:
        d["backing-filename-format"] = h.backing_format
    if facts["snapshots"]:
        d["snapshots"] = [_snapshot_dict(s) for s in facts["snapshots"]]
    if facts["snapshot_error"]:
        warnings.append(f"the snapshot table cannot be read in full: {facts['snapshot_error']}")
    if facts["bitmap_warning"]:
        warnings.append(facts["bitmap_warning"])
    d["virtual-size"] = h.size
    d["filename"] = path
    d["cluster-size"] = h.cluster_size
    d["format"] = "qcow2"
    d["actual-size"] = allocated
    data: dict[str, Any] = {
        "compat": "0.10" if h.version == 2 else "1.1",
        "compression-type": "zstd" if h.compression_type == 1 else "zlib",
    }
    if h.version >= 3:
        data["lazy-refcounts"] = h.lazy_refcounts
        if facts["bitmaps"]:
            data["bitmaps"] = facts["bitmaps"]
    data["refcount-bits"] = h.refcount_bits
    if h.version >= 3:
        if h.incompatible_features & 4 and h.data_file is not None:
            data["data-file"] = h.data_file
            data["data-file-raw"] = bool(h.autoclear_features & 2)
        data["corrupt"] = h.corrupt
        data["extended-l2"] = h.extended_l2
    d["format-specific"] = {"type": "qcow2", "data": data}
    if h.backing_file:
        d["full-backing-filename"] = _combine(path, h.backing_file)
        d["backing-filename"] = h.backing_file
    d["dirty-flag"] = h.dirty
    return d, warnings


def _qcow1_info(path: str, force_share: bool) -> dict[str, Any]:
    """A qcow version 1 image, as qemu-img describes it (no format-specific data)."""
    facts = _qcowrs.qcow1_info(path, force_share=force_share)
    length, allocated = _file_sizes(path)
    d: dict[str, Any] = {
        "children": [_file_child(path, length, allocated)],
        "virtual-size": facts["virtual_size"],
        "filename": path,
        "cluster-size": facts["cluster_size"],
        "format": "qcow",
        "actual-size": allocated,
    }
    if facts["encrypted"]:
        d["encrypted"] = True
    if facts["backing_file"]:
        d["full-backing-filename"] = _combine(path, facts["backing_file"])
        d["backing-filename"] = facts["backing_file"]
    d["dirty-flag"] = False
    return d


def _raw_info(path: str) -> dict[str, Any]:
    length, allocated = _file_sizes(path)
    return {
        "children": [_file_child(path, length, allocated)],
        "virtual-size": length,
        "filename": path,
        "format": "raw",
        "actual-size": allocated,
        "dirty-flag": False,
    }


def _one(path: str, fmt: str | None, force_share: bool) -> tuple[dict[str, Any], list[str]]:
    if fmt is None:
        fmt = probe_format(path)
    if fmt == "qcow2":
        return _qcow2_info(path, force_share)
    if fmt == "qcow":
        return _qcow1_info(path, force_share), []
    if fmt == "raw":
        return _raw_info(path), []
    raise ValueError(f"format must be 'qcow2', 'qcow' or 'raw', not {fmt!r}")


def info_with_warnings(
    path: str | os.PathLike[str],
    backing_chain: bool = False,
    force_share: bool = False,
    format: str | None = None,
) -> tuple[dict[str, Any] | list[dict[str, Any]], list[str]]:
    """:func:`info`, and the warnings QEMU would print on stderr (bitmaps made inconsistent by
    a program without bitmap support, a snapshot table that cannot be read in full)."""
    first, warnings = _one(os.fspath(path), format, force_share)
    if not backing_chain:
        return first, warnings
    chain = [first]
    seen = {os.path.realpath(os.fspath(path))}
    while "full-backing-filename" in chain[-1]:
        nxt = chain[-1]["full-backing-filename"]
        real = os.path.realpath(nxt)
        if real in seen or len(chain) >= _MAX_CHAIN:
            raise QcowError(f"backing chain loop or deeper than {_MAX_CHAIN} images at '{nxt}'")
        seen.add(real)
        d, w = _one(nxt, chain[-1].get("backing-filename-format"), force_share)
        chain.append(d)
        warnings += w
    return chain, warnings


def info(
    path: str | os.PathLike[str],
    backing_chain: bool = False,
    force_share: bool = False,
    format: str | None = None,
) -> dict[str, Any] | list[dict[str, Any]]:
    """What ``qemu-img info --output=json`` prints about the image at ``path``: a dict with the
    same keys and values (``virtual-size``, ``actual-size``, ``snapshots``, ``format-specific``,
    ``backing-filename``, ``full-backing-filename``, ``children``, ...), or with
    ``backing_chain=True`` a list of such dicts, the image first. ``format`` is "qcow2",
    "qcow" (version 1) or "raw" (probed when None); ``force_share`` inspects an image a
    running VM holds (``qemu-img -U``). Only the headers and tables named by them are read,
    so an image whose L1 table is damaged is still described."""
    return info_with_warnings(path, backing_chain, force_share, format)[0]


# --------------------------------------------------------------------------------------------
# The human layout of `qemu-img info`.


def _dump(value: Any, indent: int, out: list[str]) -> None:
    """QEMU's generic dump of a format-specific dict (keys with '-' shown as ' ')."""
    pad = " " * indent
    items: list[tuple[str, Any]]
    if isinstance(value, dict):
        items = [(k.replace("-", " "), v) for k, v in value.items()]
    else:
        items = [(f"[{i}]", v) for i, v in enumerate(value)]
    for key, v in items:
        if isinstance(v, dict | list):
            out.append(f"{pad}{key}:")
            _dump(v, indent + 4, out)
        elif isinstance(v, bool):
            out.append(f"{pad}{key}: {'true' if v else 'false'}")
        else:
            out.append(f"{pad}{key}: {v}")


def _snapshot_line(s: dict[str, Any] | None) -> str:
    if s is None:
        return "%-7s %-16s %8s %19s %15s %10s" % (  # noqa: UP031 (QEMU's printf layout)
            "ID",
            "TAG",
            "VM_SIZE",
            "DATE",
            "VM_CLOCK",
            "ICOUNT",
        )
    date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["date-sec"]))
    ns = s["vm-clock-sec"] * 1_000_000_000 + s["vm-clock-nsec"]
    secs = ns // 1_000_000_000
    clock = "%04d:%02d:%02d.%03d" % (  # noqa: UP031
        secs // 3600,
        (secs // 60) % 60,
        secs % 60,
        (ns // 1_000_000) % 1000,
    )
    icount = str(s["icount"]) if "icount" in s else "--"
    return "%-7s %-16s %8s %19s %15s %10s" % (  # noqa: UP031
        s["id"],
        s["name"],
        size_to_str(s["vm-state-size"]),
        date,
        clock,
        icount,
    )


def _human_one(d: dict[str, Any]) -> list[str]:
    out = [
        f"image: {d['filename']}",
        f"file format: {d['format']}",
        f"virtual size: {size_to_str(d['virtual-size'])} ({d['virtual-size']} bytes)",
        f"disk size: {size_to_str(d['actual-size'])}",
    ]
    if d.get("encrypted"):
        out.append("encrypted: yes")
    if "cluster-size" in d:
        out.append(f"cluster_size: {d['cluster-size']}")
    if d.get("dirty-flag"):
        out.append("cleanly shut down: no")
    if "backing-filename" in d:
        line = f"backing file: {d['backing-filename']}"
        full = d.get("full-backing-filename")
        if full is None:
            line += " (cannot determine actual path)"
        elif full != d["backing-filename"]:
            line += f" (actual path: {full})"
        out.append(line)
    if "backing-filename-format" in d:
        out.append(f"backing file format: {d['backing-filename-format']}")
    if d.get("snapshots"):
        out.append("Snapshot list:")
        out.append(_snapshot_line(None))
        out += [_snapshot_line(s) for s in d["snapshots"]]
    if "format-specific" in d:
        out.append("Format specific information:")
        _dump(d["format-specific"]["data"], 4, out)
    for child in d.get("children", []):
        c = child["info"]
        out.append(f"Child node '/{child['name']}':")
        out.append(f"    filename: {c['filename']}")
        out.append(f"    protocol type: {c['format']}")
        out.append(f"    file length: {size_to_str(c['virtual-size'])} ({c['virtual-size']} bytes)")
        out.append(f"    disk size: {size_to_str(c['actual-size'])}")
    return out


def format_info_human(result: dict[str, Any] | list[dict[str, Any]]) -> str:
    """``qemu-img info``'s human output for :func:`info`'s result (a chain: one block per
    image, separated by an empty line)."""
    blocks = result if isinstance(result, list) else [result]
    return "\n\n".join("\n".join(_human_one(d)) for d in blocks) + "\n"
