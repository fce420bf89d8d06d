"""``qcowrs create``: as ``qemu-img create`` (the default format is raw, as in qemu-img)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Any

from qcowrs._file import QcowFile
from qcowrs.cli._common import (
    CliError,
    add_quiet,
    bool_option,
    number_option,
    os_message,
    parse_options,
    parse_size,
    size_option,
)

# name -> (type, help) in the order qemu-img lists them.
_QCOW2 = {
    "backing_file": ("str", "File name of a base image"),
    "backing_fmt": ("str", "Image format of the base image"),
    "cluster_size": ("size", "qcow2 cluster size"),
    "compat": ("str", "Compatibility level (v2 [0.10] or v3 [1.1])"),
    "compression_type": ("str", "Compression method used for image cluster compression"),
    "data_file": ("str", "File name of an external data file"),
    "data_file_raw": ("bool", "The external data file must stay valid as a raw image"),
    "extended_l2": ("bool", "Extended L2 tables"),
    "lazy_refcounts": ("bool", "Postpone refcount updates"),
    "preallocation": ("str", "Preallocation mode (allowed values: off, metadata, falloc, full)"),
    "refcount_bits": ("num", "Width of a reference count entry in bits"),
    "size": ("size", "Virtual disk size"),
}
_RAW = {
    "preallocation": ("str", "Preallocation mode (allowed values: off, falloc, full)"),
    "size": ("size", "Virtual disk size"),
}
# The order of qemu-img's "Formatting ..." line, and the defaults it always shows.
_LINE_ORDER = [
    "cluster_size",
    "extended_l2",
    "preallocation",
    "compression_type",
    "size",
    "compat",
    "backing_file",
    "backing_fmt",
    "data_file",
    "data_file_raw",
    "lazy_refcounts",
    "refcount_bits",
]
_LINE_DEFAULTS = {
    "cluster_size": "65536",
    "extended_l2": "off",
    "compression_type": "zlib",
    "lazy_refcounts": "off",
    "refcount_bits": "16",
}
_V3_ONLY = {
    "lazy_refcounts": "Lazy refcounts only supported",
    "extended_l2": "Extended L2 entries are only supported",
    "data_file": "External data files are only supported",
}
_V3_HINT = "with compatibility level 1.1 and above (use version=v3 or greater)"


def register(sub: Any) -> None:
    p = sub.add_parser(
        "create",
        help="create an image (qemu-img create)",
        description="Creates IMAGE (replacing an existing file, as qemu-img does, unless "
        "another process uses it). The default format is raw, as in qemu-img; use -f qcow2. "
        "Without SIZE, the size of the backing file is used. '-o help' lists the options.",
    )
    p.add_argument("-f", dest="fmt", default="raw", metavar="FMT", help="qcow2 or raw (default)")
    p.add_argument(
        "-o",
        dest="options",
        action="append",
        metavar="OPTS",
        help="comma-separated options, e.g. cluster_size=64k,compat=1.1,preallocation=metadata,"
        "lazy_refcounts=on,extended_l2=on,refcount_bits=16,compression_type=zstd,"
        "data_file=NAME,data_file_raw=on ('-o help' lists them)",
    )
    p.add_argument("-b", dest="backing", metavar="BACKING", help="backing file (qcow2 only)")
    p.add_argument(
        "-F", dest="backing_fmt", metavar="FMT", help="backing file format (required with -b)"
    )
    p.add_argument(
        "-u",
        dest="unsafe",
        action="store_true",
        help="do not open the backing file (SIZE is then required)",
    )
    add_quiet(p)
    p.add_argument("image", nargs="?", help="the file to create")
    p.add_argument("size", nargs="?", help="virtual size: bytes, or with k, M, G, T, P, E")
    p.set_defaults(func=run)


def _help(fmt: str) -> int:
    table = _QCOW2 if fmt == "qcow2" else _RAW
    print(f"Supported {fmt} options:")
    kinds = {"str": "<str>", "size": "<size>", "num": "<num>", "bool": "<bool (on/off)>"}
    for name, (kind, text) in sorted(table.items()):
        print(f"  {f'{name}={kinds[kind]}':<22} - {text}")
    return 0


def _typed(table: dict[str, tuple[str, str]], pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Checks names and the syntax of typed values (qemu-img's first stage: no "Formatting"
    line when this fails)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key not in table:
            raise CliError(f"Invalid parameter '{key}'")
        kind = table[key][0]
        if kind == "size":
            out[key] = size_option(key, value)
        elif kind == "num":
            out[key] = number_option(key, value)
        elif kind == "bool":
            out[key] = bool_option(key, value)
        else:
            out[key] = value
        out[f"{key}:text"] = str(out[key]) if kind in ("size", "num") else value
    return out


def _line(image: str, fmt: str, o: dict[str, Any]) -> str:
    if fmt == "raw":
        parts = [f"size={o['size']}"]
        if "preallocation" in o:
            parts.append(f"preallocation={o['preallocation:text']}")
        return f"Formatting '{image}', fmt=raw " + " ".join(parts)
    parts = []
    for key in _LINE_ORDER:
        if key == "size":
            parts.append(f"size={o['size']}")
        elif f"{key}:text" in o:
            parts.append(f"{key}={o[f'{key}:text']}")
        elif key in _LINE_DEFAULTS:
            parts.append(f"{key}={_LINE_DEFAULTS[key]}")
    return f"Formatting '{image}', fmt=qcow2 " + " ".join(parts)


def _qcow2_semantics(o: dict[str, Any]) -> dict[str, Any]:
    """qemu-img's second stage (after the "Formatting" line): values and combinations."""
    compat = o.get("compat", "1.1")
    if compat not in ("0.10", "v2", "1.1", "v3"):
        raise CliError(f"Parameter 'compat' does not accept value '{compat}'")
    v2 = compat in ("0.10", "v2")
    prealloc = o.get("preallocation", "off")
    if prealloc not in ("off", "metadata", "falloc", "full"):
        raise CliError(f"Parameter 'preallocation' does not accept value '{prealloc}'")
    ctype = o.get("compression_type", "zlib")
    if ctype not in ("zlib", "zstd"):
        raise CliError(f"Parameter 'compression_type' does not accept value '{ctype}'")
    cs = o.get("cluster_size", 65536)
    if cs & (cs - 1) or not 512 <= cs <= 2 << 20:
        raise CliError("Cluster size must be a power of two between 512 and 2048k")
    bits = o.get("refcount_bits", 16)
    if bits <= 0 or bits & (bits - 1) or bits > 64:
        raise CliError("Refcount width must be a power of two and may not exceed 64 bits")
    if v2:
        for key, what in _V3_ONLY.items():
            if o.get(key):
                raise CliError(f"{what} {_V3_HINT}")
        if ctype != "zlib":
            raise CliError(f"Non-zlib compression type is only supported {_V3_HINT}")
        if bits != 16:
            raise CliError(
                "Different refcount widths than 16 bits require compatibility level 1.1 or "
                "above (use version=v3 or greater)"
            )
    if o.get("extended_l2") and cs < 16384:
        raise CliError(
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"
        )
    if o.get("data_file_raw") and not o.get("data_file"):
        raise CliError("data-file-raw requires data-file")
    return {
        "compat": "0.10" if v2 else "1.1",
        "preallocation": prealloc,
        "compression_type": ctype,
        "cluster_size": cs,
        "refcount_bits": bits,
        "lazy_refcounts": bool(o.get("lazy_refcounts", False)),
        "extended_l2": bool(o.get("extended_l2", False)),
        "data_file": o.get("data_file"),
        "data_file_raw": bool(o.get("data_file_raw", False)),
    }


def _create_raw(image: str, size: int, prealloc: str) -> None:
    if prealloc not in ("off", "falloc", "full"):
        raise CliError(f"Unsupported preallocation mode: {prealloc}")
    existed = os.path.exists(image)
    try:
        with open(image, "wb") as fh:
            if prealloc == "full":
                chunk = bytes(1 << 20)
                left = size
                while left:
                    left -= fh.write(chunk[: min(left, len(chunk))])
            else:
                fh.truncate(size)
                if prealloc == "falloc" and size:
                    os.posix_fallocate(fh.fileno(), 0, size)
                elif size:
                    # As QEMU's file driver: the first block is allocated so that later
                    # probes of the file's alignment see data there (4 KiB, 512 bytes for
                    # files smaller than that).
                    os.posix_fallocate(fh.fileno(), 0, min(size, 4096 if size >= 4096 else 512))
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        if not existed:
            with contextlib.suppress(OSError):
                os.unlink(image)
        raise


def _backing_args(args: argparse.Namespace, o: dict[str, Any]) -> tuple[str | None, str | None]:
    backing = args.backing or o.get("backing_file")
    fmt = args.backing_fmt or o.get("backing_fmt")
    if backing:
        if not fmt:
            raise CliError("Backing file specified without backing format")
        if fmt not in ("qcow2", "raw"):
            raise CliError(f"Unknown backing file format '{fmt}' (qcowrs reads qcow2 and raw)")
        o["backing_file:text"], o["backing_fmt:text"] = backing, fmt
    return backing, fmt


def run(args: argparse.Namespace) -> int:
    if args.fmt not in ("qcow2", "raw"):
        raise CliError(f"Unknown file format '{args.fmt}' (qcowrs creates qcow2 and raw)")
    pairs = parse_options(args.options)
    if pairs is None:
        return _help(args.fmt)
    if args.image is None:
        raise CliError("Expecting image file name")
    table = _QCOW2 if args.fmt == "qcow2" else _RAW
    size = parse_size(args.size) if args.size is not None else None
    try:
        o = _typed(table, pairs)
        if size is not None and "size" in o:
            raise CliError("The image size must be specified only once")
        if size is not None:
            o["size"] = size
        if args.fmt == "raw":
            if args.backing:
                raise CliError("raw images have no backing file")
            if "size" not in o:
                raise CliError("Image creation needs a size parameter")
            if not args.quiet:
                print(_line(args.image, "raw", o))
            _create_raw(args.image, o["size"], o.get("preallocation", "off"))
            return 0
        backing, backing_fmt = _backing_args(args, o)
        if "size" not in o and (not backing or args.unsafe):
            raise CliError("Image creation needs a size parameter")
        if "size" not in o:
            # The line shows the size taken from the backing file (as qemu-img's).
            from qcowrs._info import info

            b = info(backing_path(args.image, backing or ""), format=backing_fmt)
            assert isinstance(b, dict)
            o["size"] = b["virtual-size"]
        if not args.quiet:
            print(_line(args.image, "qcow2", o))
            sys.stdout.flush()
        opts = _qcow2_semantics(o)
        opts["unsafe"] = args.unsafe
        f = QcowFile.create(
            args.image, o["size"], backing_file=backing, backing_format=backing_fmt, **opts
        )
        f.close()
    except CliError as e:
        raise CliError(f"{args.image}: {e}", e.code) from None
    except OSError as e:
        raise CliError(f"{args.image}: {os_message(e)}") from None
    return 0


def backing_path(image: str, backing: str) -> str:
    """A relative backing file name is relative to the image's directory."""
    if os.path.isabs(backing):
        return backing
    return os.path.join(os.path.dirname(image), backing)
