"""``qcowrs bitmap``: as ``qemu-img bitmap`` (the actions run in the order given; the first
that fails stops the command, those before it stay done)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

from qcowrs.cli._common import CliError, add_format, check_format, parse_size


class _Act(argparse.Action):
    """Appends ``(action, source)`` to ``actions`` in command-line order."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        acts = list(getattr(namespace, self.dest) or [])
        acts.append((self.const, values if isinstance(values, str) else None))
        setattr(namespace, self.dest, acts)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "bitmap",
        help="change the persistent dirty bitmaps of an image (qemu-img bitmap)",
        description="Runs the actions, in order, on the persistent dirty bitmap BITMAP of "
        "IMAGE: --add (a new, enabled bitmap; -g sets its granularity), --remove, --clear, "
        "--enable, --disable, --merge SOURCE (the bits of the bitmap SOURCE set in BITMAP).",
    )
    for flag, act, text in (
        ("--add", "add", "create BITMAP, enabled to record future writes"),
        ("--remove", "remove", "remove BITMAP"),
        ("--clear", "clear", "clear BITMAP"),
        ("--enable", "enable", "start recording future writes to BITMAP"),
        ("--disable", "disable", "stop recording future writes to BITMAP"),
    ):
        p.add_argument(flag, dest="actions", action=_Act, nargs=0, const=act, help=text)
    p.add_argument(
        "--merge",
        dest="actions",
        action=_Act,
        const="merge",
        metavar="SOURCE",
        help="merge the contents of the bitmap SOURCE into BITMAP",
    )
    p.add_argument("-g", "--granularity", metavar="SIZE", help="granularity for --add")
    p.add_argument(
        "-b",
        "--source-file",
        dest="source_file",
        metavar="SRC_FILENAME",
        help="the image holding the --merge source (only IMAGE itself is supported)",
    )
    p.add_argument("-F", "--source-format", dest="source_fmt", metavar="SRC_FMT")
    add_format(p, help="image format (qcow2)")
    p.add_argument("args", nargs="*", metavar="IMAGE BITMAP", help="the image and the bitmap")
    p.set_defaults(func=run, actions=None)


def run(args: argparse.Namespace) -> int:
    from qcowrs._bitmap import bitmap

    granularity = None
    if args.granularity is not None:
        granularity = parse_size(args.granularity, "granularity") or None
    actions: list[tuple[str, str | None]] = args.actions or []
    if not actions:
        raise CliError(
            "Need at least one of --add, --remove, --clear, --enable, --disable, or --merge"
        )
    if granularity and not any(a == "add" for a, _ in actions):
        raise CliError("granularity only supported with --add")
    if args.source_fmt and not args.source_file:
        raise CliError("-F only supported with -b")
    if args.source_file and not any(a == "merge" for a, _ in actions):
        raise CliError("Merge bitmap source file only supported with --merge")
    if len(args.args) != 2:
        raise CliError("Expecting filename and bitmap name")
    image, name = args.args
    check_format(args.fmt, ("qcow2",))
    if args.source_file and not (
        os.path.exists(args.source_file) and os.path.samefile(args.source_file, image)
    ):
        raise CliError("merging a bitmap of another image (-b) is not supported")
    for act, source in actions:
        try:
            bitmap(
                image,
                act,
                name,
                granularity=granularity if act == "add" else None,
                source=source,
            )
        except ValueError as e:
            raise CliError(f"Operation {act} on bitmap {name} failed: {e}") from None
    return 0
