"""``qcowrs mount``: the guest disk as one raw file over FUSE (qcowrs only; QEMU's
``qemu-storage-daemon --export fuse`` convention)."""

from __future__ import annotations

import argparse

# typing only for the checker (importing it costs a command-line call milliseconds).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser(
        "mount",
        help="export the guest disk as a raw file over FUSE (qcowrs only)",
        description="Exports the guest disk of IMAGE as one raw file of its virtual size over "
        "MOUNTPOINT, an existing regular file (as QEMU's FUSE export), and serves it until "
        "'fusermount3 -u MOUNTPOINT', SIGINT or SIGTERM; then every write is flushed and the "
        "image is consistent. Read-only unless --rw. The image is locked as QEMU locks it.",
    )
    p.add_argument(
        "--rw",
        action="store_true",
        help="read-write: writes, fallocate (punch hole, zero range) and fsync reach the image",
    )
    p.add_argument("image", help="the qcow2 image")
    p.add_argument("mountpoint", help="an existing regular file to mount the disk over")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qcowrs._mount import mount

    try:
        mount(args.image, args.mountpoint, writable=args.rw)
    except KeyboardInterrupt:
        # Ctrl-C is the way to stop serving: the export has ended cleanly.
        pass
    return 0
