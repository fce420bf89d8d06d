"""``qcowrs map``: as ``qemu-img map``."""

from __future__ import annotations

import argparse
import json
from typing import Any

from qcowrs._file import QcowFile
from qcowrs.cli._common import add_force_share, add_format, add_output, check_format


def register(sub: Any) -> None:
    p = sub.add_parser(
        "map",
        help="what the image holds where (qemu-img map)",
        description="Lists the guest ranges of the image like 'qemu-img map'.",
    )
    add_format(p)
    add_force_share(p)
    add_output(p)
    p.add_argument("image", help="the image file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_format(args.fmt, ("qcow2",))
    with QcowFile.open(args.image, mode="rb", force_share=args.force_share) as f:
        ranges = f.allocated_ranges()
    if args.output == "json":
        print(json.dumps([{"start": s, "length": n, "kind": k} for s, n, k in ranges], indent=4))
    else:
        print(f"{'Offset':<20}{'Length':<20}Kind")
        for s, n, k in ranges:
            print(f"{s:#<20x}{n:#<20x}{k}".replace("#", " "))
    return 0
