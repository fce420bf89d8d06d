"""``qcowrs info``: as ``qemu-img info``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from qcowrs._errors import QcowError
from qcowrs._info import format_info_human, info_with_warnings
from qcowrs.cli._common import (
    READ_FORMATS,
    CliError,
    add_force_share,
    add_format,
    add_output,
    check_format,
    os_message,
)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "info",
        help="describe an image (qemu-img info)",
        description="Describes an image as 'qemu-img info' does: virtual and disk size, cluster "
        "size, backing file, snapshots, format-specific information. Only the header and the "
        "tables it names are read, so a damaged image is still described.",
    )
    add_format(p)
    add_force_share(p)
    p.add_argument(
        "--backing-chain",
        action="store_true",
        help="describe the whole backing chain, the image first",
    )
    add_output(p)
    p.add_argument("image", help="the image file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_format(args.fmt, READ_FORMATS)
    try:
        result, warnings = info_with_warnings(
            args.image,
            backing_chain=args.backing_chain,
            force_share=args.force_share,
            format=args.fmt,
        )
    except OSError as e:
        if isinstance(e, QcowError):
            raise
        raise CliError(f"Could not open '{e.filename or args.image}': {os_message(e)}") from None
    for w in warnings:
        print(f"qcowrs: warning: {w}", file=sys.stderr)
    if args.output == "json":
        print(json.dumps(result, indent=4))
    else:
        sys.stdout.write(format_info_human(result))
    return 0
