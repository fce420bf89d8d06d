"""``qcowrs.mount``: the guest disk as one raw file over FUSE (the work is
``export/fuse.rs``)."""

from __future__ import annotations

import os

from qcowrs import _qcowrs
from qcowrs._sigterm import until_sigterm


def mount(
    path: str | os.PathLike[str],
    mountpoint: str | os.PathLike[str],
    *,
    writable: bool = False,
    foreground: bool = True,
) -> None:
    """Exports the guest disk of the qcow2 image at ``path`` as one raw file of its virtual
    size, over ``mountpoint``, an existing regular file (QEMU's FUSE-export convention), and
    serves it until ``fusermount3 -u MOUNTPOINT``, SIGTERM (both return normally) or Ctrl-C
    (``KeyboardInterrupt``, raised once the export has ended). The image is opened and locked
    as QEMU does for the mode: read-only by default (writes fail with EROFS), read-write with
    ``writable=True`` (writes, ``fallocate`` punch-hole/zero-range as discard/write-zeroes,
    ``fsync`` as a flush). At the end the image is flushed and closed: every write durable,
    the image consistent, its locks released.

    Called from the main thread, SIGTERM is handled for the duration of the call (the previous
    handler is restored). Only ``foreground=True`` (the call blocks while serving) is
    supported: run it in a thread or a process of its own to serve in the background."""
    if not foreground:
        raise NotImplementedError(
            "mount(foreground=False) is not supported: call mount in a thread or a process "
            "of its own"
        )
    until_sigterm(lambda: _qcowrs.mount(os.fspath(path), os.fspath(mountpoint), writable=writable))
