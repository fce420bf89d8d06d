"""``qcowrs check``: as ``qemu-img check`` (exit 0 clean, 1 check failed, 2 corruptions,
3 leaks, 63 format without checks)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from qcowrs._info import probe_format
from qcowrs._qcowrs import CheckReport, check
from qcowrs.cli._common import (
    CliError,
    add_force_share,
    add_format,
    add_output,
    add_quiet,
    check_format,
)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "check",
        help="check (and repair) an image (qemu-img check)",
        description="Checks an image's metadata like 'qemu-img check': refcounts, L1/L2 "
        "entries, OFLAG_COPIED, snapshots, bitmaps. Exit code 0 clean, 1 check failed, 2 "
        "corruptions, 3 leaks only, 63 the format has no checks. With -r the image is repaired "
        "in place: whatever a repair drops is listed.",
    )
    add_format(p)
    add_force_share(p)
    p.add_argument(
        "-r",
        dest="repair",
        choices=["leaks", "all"],
        default=None,
        help="repair: 'leaks' frees leaked clusters only, 'all' repairs everything it can",
    )
    add_quiet(p)
    add_output(p)
    p.add_argument("image", help="the image file")
    p.set_defaults(func=run)


def print_report(image: str, r: CheckReport, output: str, quiet: bool) -> None:
    """qemu-img check's output: problem lines on stderr, the summary on stdout (JSON with
    ``--output=json``, plus a ``dropped`` list when a repair dropped anything)."""
    for p in r.problems:
        print(p.qemu_message or f"{p.kind}: {p.message}", file=sys.stderr)
    if r.unlisted_problems:
        print(f"... and {r.unlisted_problems} more problems", file=sys.stderr)
    if output == "json":
        d: dict[str, object] = {"filename": image, "format": "qcow2", **r.to_dict()}
        if r.dropped:
            # Not in qemu-img's output: what the repair gave up, one entry per item.
            d["dropped"] = [
                {"kind": p.kind, "offset": p.host_offset, "message": p.message} for p in r.dropped
            ]
        print(json.dumps(d, indent=4))
        return
    if quiet:
        return
    _print_human(r)


def _print_human(r: CheckReport) -> None:
    if r.leaks_fixed or r.corruptions_fixed:
        print("The following inconsistencies were found and repaired:\n")
        print(f"    {r.leaks_fixed} leaked clusters")
        print(f"    {r.corruptions_fixed} corruptions\n")
    if r.dropped:
        print("The repair dropped or changed:\n")
        for p in r.dropped:
            at = f" (at 0x{p.host_offset:x})" if p.host_offset is not None else ""
            print(f"    {p.kind}: {p.message}{at}")
        print()
    if r.leaks_fixed or r.corruptions_fixed:
        print("Double checking the fixed image now...")
    if not (r.corruptions or r.leaks or r.check_errors):
        print("No errors were found on the image.")
    if r.corruptions:
        print(f"\n{r.corruptions} errors were found on the image.")
        print("Data may be corrupted, or further writes to the image may corrupt it.")
    if r.leaks:
        print(f"\n{r.leaks} leaked clusters were found on the image.")
        print("This means waste of disk space, but no harm to data.")
    if r.check_errors:
        print(f"\n{r.check_errors} internal errors have occurred during the check.")
    if r.total_clusters and r.allocated_clusters:
        pct = 100.0 * r.allocated_clusters / r.total_clusters
        frag = 100.0 * r.fragmented_clusters / r.allocated_clusters
        comp = 100.0 * r.compressed_clusters / r.allocated_clusters
        print(
            f"{r.allocated_clusters}/{r.total_clusters} = {pct:.2f}% allocated, "
            f"{frag:.2f}% fragmented, {comp:.2f}% compressed clusters"
        )
    if r.image_end_offset:
        print(f"Image end offset: {r.image_end_offset}")


def run(args: argparse.Namespace) -> int:
    check_format(args.fmt)
    fmt = args.fmt or probe_format(args.image)
    if fmt != "qcow2":
        raise CliError("This image format does not support checks", 63)
    if args.repair and args.force_share:
        raise CliError("force-share=on can only be used with read-only images")
    r = check(args.image, repair=args.repair, force_share=args.force_share)
    print_report(args.image, r, args.output, args.quiet)
    if r.check_errors:
        print("qcowrs: Check failed", file=sys.stderr)
    return int(r.exit_code)
