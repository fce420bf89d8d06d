"""``qcowrs convert``: copy an image's guest content to a raw or qcow2 image."""

from __future__ import annotations

import argparse
import os
from typing import Any

from qcowrs.cli._common import CliError, Progress, add_format, add_progress, add_quiet, check_format


def register(sub: Any) -> None:
    p = sub.add_parser(
        "convert",
        help="copy an image's guest content into a new raw or qcow2 image (qemu-img convert)",
        description="Copies the guest content of SRC (qcow2, its backing chain included) into "
        "DST, skipping what reads as zeros so the target stays sparse.",
    )
    add_format(p, help="source format (qcow2)")
    p.add_argument(
        "-O",
        dest="out_fmt",
        default="raw",
        metavar="FMT",
        help="target format: raw (default) or qcow2",
    )
    add_progress(p)
    add_quiet(p)
    p.add_argument("src", help="the source image")
    p.add_argument("dst", help="the target file (created or overwritten)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qcowrs._convert import convert

    check_format(args.fmt, ("qcow2",))
    check_format(args.out_fmt)
    if os.path.isdir(args.dst):
        raise CliError(f"{args.dst}: Could not create '{args.dst}': Is a directory")
    parent = os.path.dirname(args.dst) or "."
    if not os.path.isdir(parent):
        raise CliError(f"{args.dst}: Could not create '{args.dst}': No such file or directory")
    with Progress(args.progress, "convert") as bar:
        convert(args.src, args.dst, args.out_fmt, progress=bar.callback)
    return 0
