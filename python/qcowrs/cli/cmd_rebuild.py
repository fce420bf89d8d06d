"""``qcowrs rebuild IMAGE``: rebuild the refcount structure (qcowrs only)."""

from __future__ import annotations

import argparse
from typing import Any

from qcowrs._qcowrs import rebuild_refcounts
from qcowrs.cli._common import add_output
from qcowrs.cli.cmd_check import print_report


def register(sub: Any) -> None:
    p = sub.add_parser(
        "rebuild",
        help="rebuild the refcount structure from the tables (qcowrs only)",
        description="Rebuilds the image's refcount structure by walking the header, L1 and L2 "
        "tables (repairing what 'check -r all' repairs), then checks the result; prints and "
        "exits like 'qemu-img check'.",
    )
    p.add_argument("image", help="the qcow2 image to repair in place")
    add_output(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    r = rebuild_refcounts(args.image)
    print_report(args.image, r, args.output, quiet=False)
    return int(r.exit_code)
