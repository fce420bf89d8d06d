"""``qcowrs rebase``: as ``qemu-img rebase``."""

from __future__ import annotations

import argparse

from qcowrs.cli._common import (
    CliError,
    Progress,
    add_format,
    add_progress,
    add_quiet,
    check_format,
)

# typing only for the checker (importing it costs a command-line call milliseconds).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser(
        "rebase",
        help="change the backing file of an overlay (qemu-img rebase)",
        description="Makes BACKING the backing file of IMAGE. Safe mode copies into IMAGE what "
        "differs between the old and the new backing file, so the guest content stays the "
        "same; -u changes only the header. -b '' makes IMAGE standalone.",
    )
    add_format(p, help="image format (qcow2)")
    p.add_argument(
        "-b", dest="backing", metavar="BACKING", help="the new backing file ('' for none)"
    )
    p.add_argument("-F", dest="backing_fmt", metavar="FMT", help="its format (required with -b)")
    p.add_argument("-u", dest="unsafe", action="store_true", help="unsafe: only the header changes")
    add_progress(p)
    add_quiet(p)
    p.add_argument("image", help="the overlay")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qcowrs._rebase import rebase

    check_format(args.fmt, ("qcow2",))
    if args.backing is None:
        raise CliError("Must specify backing file (-b) or use unsafe mode (-u)")
    if args.backing_fmt is not None:
        check_format(args.backing_fmt)
    with Progress(args.progress and not args.quiet, "rebase") as bar:
        rebase(
            args.image, args.backing, args.backing_fmt, unsafe=args.unsafe, progress=bar.callback
        )
    return 0
