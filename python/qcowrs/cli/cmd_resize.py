"""``qcowrs resize``: as ``qemu-img resize``."""

from __future__ import annotations

import argparse

from qcowrs.cli._common import CliError, add_format, add_quiet, check_format

# typing only for the checker (importing it costs a command-line call milliseconds).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser(
        "resize",
        help="change the virtual size of an image (qemu-img resize)",
        description="Sets the virtual size of IMAGE to SIZE, or changes it by +SIZE/-SIZE. "
        "Making it smaller needs --shrink: the guest data past the new end is dropped "
        "(internal snapshots keep theirs). Sizes are multiples of 512.",
    )
    add_format(p, help="image format: qcow2 or raw (probed when not given)")
    p.add_argument(
        "--shrink",
        action="store_true",
        help="allow a smaller size (the data past the new end is lost)",
    )
    add_quiet(p)
    p.add_argument("image", help="the image to resize")
    p.add_argument("size", metavar="[+|-]SIZE", help="new size, or a change: 10G, +1G, -512M")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qcowrs._resize import resize

    check_format(args.fmt)
    try:
        resize(args.image, args.size, shrink=args.shrink, format=args.fmt)
    except ValueError as e:
        raise CliError(str(e)) from None
    if not args.quiet:
        print("Image resized.")
    return 0
