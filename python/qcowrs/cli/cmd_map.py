"""``qcowrs map``: as ``qemu-img map`` (over the whole backing chain)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from qcowrs._file import QcowFile
from qcowrs._info import probe_format
from qcowrs._map import MapFormatError, format_map_human, raw_map
from qcowrs.cli._common import (
    CliError,
    add_force_share,
    add_format,
    add_output,
    check_format,
    parse_size,
)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "map",
        help="where every guest range reads from (qemu-img map)",
        description="Lists the guest ranges of the image and its backing chain like 'qemu-img "
        "map': JSON entries with start, length, depth (0: the image, 1: its backing file, ...), "
        "present, zero, data, compressed and the host offset; the human layout lists the data "
        "ranges with their host offset and file.",
    )
    add_format(p)
    add_force_share(p)
    add_output(p)
    p.add_argument("--start-offset", default="0", metavar="N", help="first guest byte to map")
    p.add_argument("--max-length", default=None, metavar="N", help="map at most N bytes")
    p.add_argument("image", help="the image file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_format(args.fmt)
    start = parse_size(args.start_offset, "offset")
    length = parse_size(args.max_length, "length") if args.max_length is not None else None
    fmt = args.fmt or probe_format(args.image)
    if fmt == "raw":
        entries = raw_map(args.image, start, length)
    else:
        with QcowFile.open(args.image, mode="rb", force_share=args.force_share) as f:
            entries = f.map(start, length, with_files=True)
    if args.output == "json":
        print(json.dumps([{k: v for k, v in e.items() if k != "filename"} for e in entries]))
        return 0
    try:
        sys.stdout.write(format_map_human(entries))
    except MapFormatError as e:
        sys.stdout.write(e.output)
        raise CliError(str(e)) from None
    return 0
