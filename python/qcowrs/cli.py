"""The ``qcowrs`` command line (also ``python -m qcowrs``)."""

from __future__ import annotations

import argparse
import json
import sys

from qcowrs._errors import QcowError
from qcowrs._file import QcowFile


def _cmd_info(args: argparse.Namespace) -> int:
    with QcowFile.open(args.image, mode="rb") as f:
        h = f.header
        info = {
            "filename": args.image,
            "format": "qcow2",
            "virtual-size": f.virtual_size,
            "cluster-size": f.cluster_size,
            "format-specific": {
                "type": "qcow2",
                "data": {
                    "compat": "0.10" if h.version == 2 else "1.1",
                    "compression-type": "zstd" if h.compression_type == 1 else "zlib",
                    "lazy-refcounts": h.lazy_refcounts,
                    "refcount-bits": h.refcount_bits,
                    "corrupt": h.corrupt,
                    "extended-l2": h.extended_l2,
                },
            },
            "dirty-flag": h.dirty,
        }
        if h.backing_file:
            info["backing-filename"] = h.backing_file
        if h.backing_format:
            info["backing-filename-format"] = h.backing_format
        if h.data_file:
            info["format-specific"]["data"]["data-file"] = h.data_file  # type: ignore[index]
    if args.json:
        print(json.dumps(info, indent=4))
    else:
        print(f"image: {args.image}")
        print("file format: qcow2")
        print(f"virtual size: {info['virtual-size']} bytes")
        print(f"cluster_size: {info['cluster-size']}")
        if h.backing_file:
            print(f"backing file: {h.backing_file}")
        print("Format specific information:")
        for k, v in info["format-specific"]["data"].items():  # type: ignore[index]
            print(f"    {k}: {str(v).lower() if isinstance(v, bool) else v}")
    return 0


def _cmd_map(args: argparse.Namespace) -> int:
    with QcowFile.open(args.image, mode="rb") as f:
        ranges = f.allocated_ranges()
    if args.json:
        print(json.dumps([{"start": s, "length": n, "kind": k} for s, n, k in ranges], indent=4))
    else:
        print(f"{'Offset':<20}{'Length':<20}Kind")
        for s, n, k in ranges:
            print(f"{s:#<20x}{n:#<20x}{k}".replace("#", " "))
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qcowrs", description="qcow2 images: inspect, check, repair")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("info", help="describe an image, like qemu-img info")
    s.add_argument("image")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_info)
    s = sub.add_parser("map", help="what the image holds, like qemu-img map")
    s.add_argument("image")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_map)
    return p


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except QcowError as e:
        print(f"qcowrs: {e}", file=sys.stderr)
        return 1
