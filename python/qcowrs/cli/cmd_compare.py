"""``qcowrs compare``: as ``qemu-img compare`` (same messages; exit code 0 identical,
1 different, 2 an image cannot be opened, 3 a block status cannot be found, 4 a read fails)."""

from __future__ import annotations

import argparse
from typing import Any

from qcowrs._qcowrs import CompareResult
from qcowrs.cli._common import CliError, Progress, add_force_share, os_message

_CACHE_MODES = ("none", "off", "writeback", "unsafe", "directsync", "writethrough")
# qemu-img's exit code for a failure at each stage of the comparison.
_EXIT = {"open": 2, "status": 3, "read": 4}


def register(sub: Any) -> None:
    p = sub.add_parser(
        "compare",
        help="whether two images have the same content (qemu-img compare)",
        description="Compares the guest content of IMAGE1 and IMAGE2 (qcow2 with their backing "
        "chains, or raw) like 'qemu-img compare'. An image shorter than the other compares as if "
        "padded with zeros, unless -s. Only what the images allocate is read. Exit code: 0 "
        "identical, 1 different, 2 an image cannot be opened, 3 its block status cannot be "
        "found, 4 it cannot be read.",
    )
    p.add_argument(
        "-f",
        "--a-format",
        dest="fmt",
        metavar="FMT",
        help="format of IMAGE1: qcow2 or raw (probed when not given)",
    )
    p.add_argument(
        "-F",
        "--b-format",
        dest="fmt2",
        metavar="FMT",
        help="format of IMAGE2: qcow2 or raw (probed when not given)",
    )
    p.add_argument(
        "-s",
        "--strict",
        action="store_true",
        help="strict: images of different sizes differ, and so do ranges whose allocation "
        "(block status) differs",
    )
    p.add_argument(
        "-T",
        "--cache",
        default="writeback",
        metavar="CACHE",
        help="accepted for qemu-img compatibility (none, writeback, unsafe, directsync, "
        "writethrough): images are read through the page cache",
    )
    add_force_share(p)
    p.add_argument(
        "-p",
        "--progress",
        dest="progress",
        action="store_true",
        help="show a progress bar (only when stderr is a terminal)",
    )
    p.add_argument(
        "-q", "--quiet", dest="quiet", action="store_true", help="quiet: print no message"
    )
    p.add_argument("image1", nargs="?", metavar="IMAGE1", help="the first image")
    p.add_argument("image2", nargs="?", metavar="IMAGE2", help="the second image")
    p.set_defaults(func=run)


def messages(r: CompareResult, strict: bool) -> list[str]:
    """The lines ``qemu-img compare`` prints for ``r``."""
    if r.reason == "size":
        return ["Strict mode: Image size mismatch!"]
    if r.reason == "block-status":
        return [f"Strict mode: Offset {r.first_difference} block status mismatch!"]
    out = []
    common = min(r.size_a, r.size_b)
    if not strict and r.size_a != r.size_b:
        # qemu-img warns once it has compared the common part (and then checks the tail).
        if r.first_difference is None or r.first_difference >= common:
            out.append("Warning: Image size mismatch!")
    if r.identical:
        out.append("Images are identical.")
    else:
        out.append(f"Content mismatch at offset {r.first_difference}!")
    return out


def run(args: argparse.Namespace) -> int:
    from qcowrs._compare import compare

    if args.image1 is None or args.image2 is None:
        raise CliError("Expecting two image file names")
    if args.cache not in _CACHE_MODES:
        raise CliError(f"Invalid source cache option: {args.cache}", 2)
    try:
        with Progress(args.progress and not args.quiet, "compare") as bar:
            r = compare(
                args.image1,
                args.image2,
                strict=args.strict,
                format_a=args.fmt,
                format_b=args.fmt2,
                force_share=args.force_share,
                progress=bar.callback,
            )
    except (OSError, ValueError) as e:
        code = _EXIT.get(getattr(e, "compare_stage", "open"), 2)
        raise CliError(os_message(e) if isinstance(e, OSError) else str(e), code) from None
    if not args.quiet:
        for line in messages(r, args.strict):
            print(line)
    return 0 if r.identical else 1
