"""``qcowrs serve``: an NBD server over one image (qcowrs only; ``qemu-nbd``'s job)."""

from __future__ import annotations

import argparse

from qcowrs.cli._common import CliError

# typing only for the checker (importing it costs a command-line call milliseconds).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="serve an image over NBD (qcowrs only)",
        description="Serves the guest disk of IMAGE over NBD until SIGINT or SIGTERM, then "
        "flushes and closes the image. Clients use nbd+unix:///?socket=PATH with --socket, else "
        "nbd://ADDR:PORT (127.0.0.1:10809 by default). Read-only unless --rw.",
    )
    p.add_argument(
        "--rw", action="store_true", help="accept writes (the export is read-only otherwise)"
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket", metavar="PATH", help="listen on a Unix socket at PATH")
    where.add_argument("--port", type=int, default=None, metavar="N", help="TCP port (10809)")
    p.add_argument(
        "--bind", metavar="ADDR", default=None, help="TCP address to listen on (127.0.0.1)"
    )
    p.add_argument(
        "--shared", type=int, default=8, metavar="N", help="serve at most N clients at once (8)"
    )
    p.add_argument("image", help="the qcow2 image to serve")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qcowrs._serve import serve

    if args.socket is not None and args.bind is not None:
        raise CliError("--bind applies to TCP only, not with --socket")
    try:
        serve(
            args.image,
            socket=args.socket,
            host="127.0.0.1" if args.bind is None else args.bind,
            port=10809 if args.port is None else args.port,
            writable=args.rw,
            shared=args.shared,
        )
    except ValueError as e:
        raise CliError(str(e)) from None
    return 0
