"""``qcowrs dd``: ``qemu-img dd``'s subset (bs, count, skip, if, of) on convert's engine."""

from __future__ import annotations

import argparse
from typing import Any

from qcowrs.cli._common import (
    READ_FORMATS,
    CliError,
    Progress,
    add_force_share,
    add_format,
    add_progress,
    check_format,
    parse_size,
)

_LIMITS = {
    "bs": (1, 2**31 - 1),
    "count": (0, 2**63 - 1),
    "skip": (0, 2**63 - 1),
}


def register(sub: Any) -> None:
    p = sub.add_parser(
        "dd",
        help="copy part of an image into a new one (qemu-img dd)",
        description="Copies the guest bytes of if=IN from skip*bs up to count*bs (count counts "
        "from the start of IN, as in qemu-img) into a new of=OUT (replaced if it exists). "
        "Sizes take the suffixes k, M, G, ...",
    )
    add_format(p, help="input format: qcow2 or raw (probed when not given)")
    p.add_argument(
        "-O", dest="out_fmt", default="raw", metavar="FMT", help="raw (default) or qcow2"
    )
    add_force_share(p)
    add_progress(p)
    p.add_argument("operands", nargs="*", metavar="bs=N|count=N|skip=N|if=IN|of=OUT")
    p.set_defaults(func=run)


def _number(key: str, text: str) -> int:
    lo, hi = _LIMITS[key]
    try:
        value = parse_size(text)
    except CliError:
        raise CliError(f"Invalid {key} specified: '{text}'.") from None
    if not lo <= value <= hi:
        raise CliError(f"Invalid {key} specified. Must be between {lo} and {hi}.")
    return value


def run(args: argparse.Namespace) -> int:
    from qcowrs._convert import dd

    check_format(args.fmt, READ_FORMATS)
    check_format(args.out_fmt)
    ops: dict[str, Any] = {"bs": 512, "count": None, "skip": 0}
    paths: dict[str, str] = {}
    for operand in args.operands:
        key, sep, value = operand.partition("=")
        if not sep or key not in ("bs", "count", "skip", "if", "of"):
            raise CliError(f"unrecognized operand {key}")
        if key in ("if", "of"):
            paths[key] = value
        else:
            ops[key] = _number(key, value)
    if "if" not in paths or "of" not in paths:
        raise CliError("Must specify both input and output files")
    try:
        with Progress(args.progress, "dd") as bar:
            dd(
                paths["if"],
                paths["of"],
                source_format=args.fmt,
                output_format=args.out_fmt,
                force_share=args.force_share,
                progress=bar.callback,
                **ops,
            )
    except ValueError as e:
        raise CliError(str(e)) from None
    return 0
