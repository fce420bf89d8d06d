"""``qcowrs snapshot``: as ``qemu-img snapshot`` (list, create, apply, delete)."""

from __future__ import annotations

import argparse
from typing import Any

from qcowrs.cli._common import CliError, add_force_share, add_format, add_quiet, check_format


def register(sub: Any) -> None:
    p = sub.add_parser(
        "snapshot",
        help="list, create, apply or delete internal snapshots (qemu-img snapshot)",
        description="Without an action, or with -l, lists IMAGE's internal snapshots as "
        "qemu-img does. -c NAME records the disk as it is now; -a reverts the disk (and its "
        "size) to a snapshot; -d deletes one (by id, else by name).",
    )
    add_format(p, help="image format (qcow2)")
    add_force_share(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("-l", dest="list", action="store_true", help="list the snapshots")
    g.add_argument("-c", dest="create", metavar="NAME", help="create a snapshot")
    g.add_argument("-a", dest="apply", metavar="SNAPSHOT", help="apply a snapshot")
    g.add_argument("-d", dest="delete", metavar="SNAPSHOT", help="delete a snapshot")
    add_quiet(p)
    p.add_argument("image", help="the image")
    p.set_defaults(func=run)


def _list(image: str, force_share: bool) -> int:
    from qcowrs._file import QcowFile
    from qcowrs._info import _snapshot_dict, _snapshot_line

    with QcowFile.open(image, force_share=force_share) as f:
        snaps = f.snapshots()
    print("Snapshot list:")
    print(_snapshot_line(None))
    for s in snaps:
        print(_snapshot_line(_snapshot_dict(s)))
    return 0


def run(args: argparse.Namespace) -> int:
    from qcowrs._file import QcowFile

    check_format(args.fmt, ("qcow2",))
    if args.create is None and args.apply is None and args.delete is None:
        return _list(args.image, args.force_share)
    if args.force_share:
        raise CliError("force-share=on can only be used with read-only images")
    with QcowFile.open(args.image, "r+b") as f:
        try:
            if args.create is not None:
                f.create_snapshot(args.create)
            elif args.apply is not None:
                f.apply_snapshot(args.apply)
            else:
                f.delete_snapshot(args.delete)
        except ValueError as e:
            action, name = (
                ("create", args.create)
                if args.create is not None
                else ("apply", args.apply)
                if args.apply is not None
                else ("delete", args.delete)
            )
            raise CliError(f"Could not {action} snapshot '{name}': {e}") from None
    return 0
