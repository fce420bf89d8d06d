"""``qcowrs commit``: as ``qemu-img commit``."""

from __future__ import annotations

import argparse

from qcowrs.cli._common import Progress, add_format, add_progress, add_quiet, check_format

# typing only for the checker (importing it costs a command-line call milliseconds).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser(
        "commit",
        help="write an overlay's data into its backing file (qemu-img commit)",
        description="Writes what IMAGE allocates into its backing file (or BASE, further down "
        "its chain), then empties IMAGE unless -d (-b implies -d).",
    )
    add_format(p, help="image format (qcow2)")
    p.add_argument("-b", dest="base", metavar="BASE", help="the image of the chain to commit into")
    p.add_argument("-d", dest="drop", action="store_true", help="do not empty IMAGE afterwards")
    add_progress(p)
    add_quiet(p)
    p.add_argument("image", help="the overlay")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qcowrs._commit import commit

    check_format(args.fmt, ("qcow2",))
    with Progress(args.progress and not args.quiet, "commit") as bar:
        commit(args.image, base=args.base, drop=args.drop, progress=bar.callback)
    if not args.quiet:
        print("Image committed.")
    return 0
