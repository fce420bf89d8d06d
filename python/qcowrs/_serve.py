"""``qcowrs.serve``: an NBD server over one image (the work is ``export/nbd.rs``)."""

from __future__ import annotations

import os

from qcowrs import _qcowrs
from qcowrs._sigterm import until_sigterm


def serve(
    path: str | os.PathLike[str],
    *,
    socket: str | os.PathLike[str] | None = None,
    host: str = "127.0.0.1",
    port: int = 10809,
    writable: bool = False,
    shared: int = 8,
) -> None:
    """Serves the qcow2 image at ``path`` over NBD until SIGINT or SIGTERM, then flushes and
    closes it and returns.

    Clients connect to ``nbd+unix:///?socket=SOCKET`` when ``socket`` is given, else to
    ``nbd://HOST:PORT`` (loopback by default). The export is read-only unless ``writable``;
    at most ``shared`` clients are served at once. The image is locked as QEMU locks it (a
    writable server refuses every other user, a read-only one every writer) while it is
    served. Fixed newstyle handshake, structured replies and block status with the
    ``base:allocation`` context, so ``qemu-img map`` and ``nbdinfo --map`` see holes and zeros.
    From a thread other than the main one, SIGTERM is not caught here."""
    if shared < 1:
        raise ValueError("shared must be at least 1")
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be between 0 and 65535, not {port}")
    until_sigterm(
        lambda: _qcowrs.serve(
            os.fspath(path),
            socket=None if socket is None else os.fspath(socket),
            host=host,
            port=port,
            writable=writable,
            shared=shared,
        ),
        quiet=(KeyboardInterrupt,),
    )
