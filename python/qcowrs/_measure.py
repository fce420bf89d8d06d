"""``qcowrs.measure``: ``qemu-img measure`` from Python (the work runs in the Rust core,
``ops/measure.rs``, with the GIL released)."""

from __future__ import annotations

import os
from typing import Any

from qcowrs import _qcowrs

StrPath = str | os.PathLike[str]

# The -o options qemu-img measure accepts for each target format (the format's creation
# options and the file protocol's), with their types: "size" and "num" are ints, "bool" a bool,
# "str" a str. Those the measurement depends on are passed on; the others are accepted and
# ignored, as qemu-img ignores them.
_FILE = {"nocow": "bool", "extent_size_hint": "size", "preallocation": "str", "size": "size"}
OPTIONS: dict[str, dict[str, str]] = {
    "raw": dict(_FILE),
    "qcow2": {
        "backing_file": "str",
        "backing_fmt": "str",
        "cluster_size": "size",
        "compat": "str",
        "compression_type": "str",
        "data_file": "str",
        "data_file_raw": "bool",
        "encrypt.cipher-alg": "str",
        "encrypt.cipher-mode": "str",
        "encrypt.format": "str",
        "encrypt.hash-alg": "str",
        "encrypt.iter-time": "num",
        "encrypt.ivgen-alg": "str",
        "encrypt.ivgen-hash-alg": "str",
        "encrypt.key-secret": "str",
        "encryption": "bool",
        "extended_l2": "bool",
        "lazy_refcounts": "bool",
        "refcount_bits": "num",
        **_FILE,
    },
}
# Option name -> keyword of the native measure.
_NATIVE = {
    "size": "size_option",
    "cluster_size": "cluster_size",
    "compat": "compat",
    "refcount_bits": "refcount_bits",
    "extended_l2": "extended_l2",
    "preallocation": "preallocation",
    "backing_file": "backing_file",
    "encrypt.format": "encrypt_format",
    "encrypt.key-secret": "encrypt_key_secret",
}
_MAX_SIZE = (1 << 63) - 1


def _option_name(table: dict[str, str], key: str) -> str | None:
    if key in table:
        return key
    alt = key.replace("-", "_")
    return alt if alt in table else None


def _check_value(key: str, kind: str, value: Any) -> Any:
    if kind == "bool":
        if not isinstance(value, bool):
            raise TypeError(f"options[{key!r}]: expected a bool, got {type(value).__name__}")
        return value
    if kind in ("size", "num"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"options[{key!r}]: expected an int, got {type(value).__name__}")
        if not 0 <= value < 1 << 64:
            raise ValueError(f"Parameter '{key}' expects a non-negative number below 2^64")
        return value
    if not isinstance(value, str):
        raise TypeError(f"options[{key!r}]: expected a str, got {type(value).__name__}")
    return value


def measure(
    size: int | None = None,
    source: StrPath | None = None,
    *,
    cluster_size: int = 65536,
    compress: str | None = None,
    options: dict[str, Any] | None = None,
    source_format: str | None = None,
    output_format: str = "qcow2",
    force_share: bool = False,
    snapshot: str | None = None,
) -> dict[str, int]:
    """How large a new ``output_format`` image ("qcow2" or "raw") would be, as
    ``qemu-img measure --output=json`` reports it: for an empty disk of ``size`` bytes, or for
    the guest content of ``source`` (qcow2 with its backing chain, or raw; ``source_format``
    or probed) copied by ``qcowrs.convert`` / ``qemu-img convert``. Give exactly one.

    Returns ``{"required": N, "fully-allocated": N}``, with ``"bitmaps": N`` first where
    qemu-img reports it (a qcow2 target of compat 1.1 and a qcow2 v3 source: room for the
    source's persistent bitmaps). ``required`` counts every target cluster that holds data
    (zero and unallocated clusters count nothing) plus the metadata of a fully allocated
    image; ``fully-allocated`` is the image with every cluster allocated.

    ``options`` are qemu-img's ``-o`` creation options, with values of their type (int for
    sizes and numbers, bool, str): ``cluster_size`` (overrides the keyword), ``compat``
    ("0.10" or "1.1"), ``refcount_bits``, ``extended_l2``, ``preallocation`` (falloc and full
    count every cluster), ``backing_file`` (with a source every cluster counts: the new
    backing file may share nothing), ``size`` (with a source only checked, as qemu-img does);
    the other creation options are accepted and change nothing, as in qemu-img. ``compress``
    ("zlib" or "zstd": the image will be written compressed) is accepted for symmetry with
    ``convert`` and changes nothing: like qemu-img, a compressed cluster is counted whole.
    ``force_share`` reads a source another process holds (qemu-img ``-U``); ``snapshot``
    measures an internal snapshot of a qcow2 source instead of its current content (its id,
    else its name: qemu-img ``-l``).
    """
    if (size is None) == (source is None):
        raise ValueError("measure: give either size or source (exactly one)")
    if output_format not in OPTIONS:
        raise ValueError(f"output_format: qcowrs measures raw and qcow2, not {output_format!r}")
    if compress not in (None, "zlib", "zstd"):
        raise ValueError(f"compress: None, 'zlib' or 'zstd', not {compress!r}")
    if compress is not None and output_format != "qcow2":
        raise ValueError("compress: Compression not supported for this file format")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int)):
        raise TypeError(f"size: expected an int, got {type(size).__name__}")
    if size is not None and not 0 <= size <= _MAX_SIZE:
        raise ValueError(f"Invalid image size specified. Must be between 0 and {_MAX_SIZE}.")
    table = OPTIONS[output_format]
    kwargs: dict[str, Any] = {}
    for key, value in (options or {}).items():
        name = _option_name(table, key)
        if name is None:
            raise ValueError(f"options: {output_format} does not support option {key!r}")
        value = _check_value(name, table[name], value)
        if name in _NATIVE:
            kwargs[_NATIVE[name]] = value
    if output_format == "raw":
        if cluster_size != 65536:
            raise ValueError("cluster_size: a raw image has no clusters")
        kwargs = {k: v for k, v in kwargs.items() if k == "size_option"}
    else:
        if cluster_size != 65536 and kwargs.get("cluster_size", cluster_size) != cluster_size:
            raise ValueError("cluster_size: given twice (keyword and options) with two values")
        kwargs.setdefault("cluster_size", cluster_size)
    required, fully_allocated, bitmaps = _qcowrs.measure(
        size,
        None if source is None else os.fspath(source),
        output_format,
        source_format=source_format,
        force_share=force_share,
        snapshot=snapshot,
        **kwargs,
    )
    out: dict[str, int] = {}
    if bitmaps is not None:
        out["bitmaps"] = bitmaps
    out["required"] = required
    out["fully-allocated"] = fully_allocated
    return out
