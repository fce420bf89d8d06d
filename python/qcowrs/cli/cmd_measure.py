"""``qcowrs measure``: as ``qemu-img measure`` (the default target format is raw, as in
qemu-img); the work is ``qcowrs.measure``'s (the Rust core)."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from qcowrs._measure import OPTIONS, measure
from qcowrs.cli._common import (
    READ_FORMATS,
    CliError,
    add_force_share,
    add_format,
    add_output,
    bool_option,
    check_format,
    check_option_list,
    number_option,
    parse_size,
    size_option,
    snapshot_param,
    split_option_list,
)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "measure",
        help="how large a new image would be (qemu-img measure)",
        description="Prints the size a new image of format -O needs: 'required size' for an "
        "empty disk of --size bytes, or for the guest content of SRC (qcow2 with its backing "
        "chain, or raw) as convert would copy it (every target cluster that holds data, plus "
        "the metadata of a fully allocated image); 'fully allocated size' with every cluster "
        "allocated; and, for a qcow2 target and a qcow2 source, 'bitmaps size' for the "
        "source's persistent bitmaps. The numbers are qemu-img measure's.",
    )
    add_output(p)
    p.add_argument(
        "-O",
        dest="out_fmt",
        default="raw",
        metavar="FMT",
        help="format of the new image: raw (default, as in qemu-img) or qcow2",
    )
    p.add_argument(
        "-o",
        dest="options",
        action="append",
        metavar="OPTS",
        help="its creation options, as for create: cluster_size, compat (0.10 or 1.1), "
        "refcount_bits, extended_l2, preallocation (falloc and full count every cluster), "
        "backing_file (with SRC every cluster counts); the others change nothing",
    )
    add_format(p, help="format of SRC: qcow2 or raw (probed when not given)")
    p.add_argument(
        "-l",
        dest="snapshot",
        metavar="SNAPSHOT",
        help="measure an internal snapshot of SRC (snapshot.name=NAME, snapshot.id=ID, or an "
        "id or name)",
    )
    add_force_share(p)
    p.add_argument(
        "--size",
        metavar="SIZE",
        help="measure an empty disk of SIZE bytes (k, M, G, T, P, E suffixes) instead of SRC",
    )
    p.add_argument(
        "files",
        nargs="*",
        metavar="SRC",
        help="the image whose guest content would be converted (qcow2 with its backing "
        "chain, or raw)",
    )
    p.set_defaults(func=run)


def _options(out_fmt: str, values: list[str] | None) -> dict[str, Any]:
    """``-o`` lists as typed values for ``out_fmt``, with qemu-img's messages."""
    check_format(out_fmt)
    table = OPTIONS[out_fmt]
    out: dict[str, Any] = {}
    for text in values or []:
        for item in split_option_list(text):
            if not item:
                continue
            key, eq, value = item.partition("=")
            value = value if eq else "on"
            try:
                kind = table.get(key)
                if kind is None:
                    raise CliError(f"Invalid parameter '{key}'")
                if kind == "size":
                    out[key] = size_option(key, value)
                elif kind == "num":
                    out[key] = number_option(key, value)
                elif kind == "bool":
                    out[key] = bool_option(key, value)
                else:
                    out[key] = value
            except CliError as e:
                raise CliError(f"Invalid options for file format '{out_fmt}': {e}") from None
    return out


def _open_source(src: str, args: argparse.Namespace, snapshot: str | None) -> None:
    """Opens SRC (and loads the -l snapshot) the way the measure does (its chain too), for its
    errors only."""
    measure(
        source=src,
        output_format="raw",
        source_format=args.fmt,
        force_share=args.force_share,
        snapshot=snapshot,
    )


def run(args: argparse.Namespace) -> int:
    # What qemu-img checks while it reads its arguments.
    for text in args.options or []:
        check_option_list(text)
    size = parse_size(args.size) if args.size is not None else None
    snapshot = snapshot_param(args.snapshot) if args.snapshot is not None else None
    if len(args.files) > 1:
        raise CliError("At most one filename argument is allowed.")
    src: str | None = args.files[0] if args.files else None
    if src is None and (args.fmt is not None or args.snapshot is not None):
        raise CliError("--image-opts, -f, and -l require a filename argument.")
    if src is not None and size is not None:
        raise CliError("--size N cannot be used together with a filename.")
    if src is None and size is None:
        raise CliError("Either --size N or one filename must be specified.")
    # Then, as qemu-img: the source is opened, then the target format and its options are
    # looked at.
    if src is not None:
        check_format(args.fmt, READ_FORMATS)
        if not os.path.lexists(src):
            raise CliError(f"Could not open '{src}': No such file or directory")
        if os.path.isdir(src):
            raise CliError(f"Could not open '{src}': Is a directory")
    try:
        options, problem = _options(args.out_fmt, args.options), None
    except CliError as e:
        options, problem = {}, e
    if src is not None and problem is not None:
        _open_source(src, args, snapshot)
    if problem is not None:
        raise problem
    result = measure(
        size,
        src,
        options=options,
        source_format=args.fmt,
        output_format=args.out_fmt,
        force_share=args.force_share,
        snapshot=snapshot,
    )
    if args.output == "json":
        print(json.dumps(result, indent=4))
        return 0
    print(f"required size: {result['required']}")
    print(f"fully allocated size: {result['fully-allocated']}")
    if "bitmaps" in result:
        print(f"bitmaps size: {result['bitmaps']}")
    return 0
