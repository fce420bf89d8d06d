"""``qcowrs.bitmap``: ``qemu-img bitmap`` from Python (the work is ``ops/bitmap.rs``)."""

from __future__ import annotations

import os

from qcowrs import _qcowrs

ACTIONS = ("add", "remove", "clear", "enable", "disable", "merge")


def bitmap(
    path: str | os.PathLike[str],
    action: str,
    name: str,
    *,
    granularity: int | None = None,
    source: str | None = None,
) -> None:
    """Changes the persistent dirty bitmap ``name`` of the qcow2 image at ``path`` as
    ``qemu-img bitmap`` does. ``action``:

    * ``"add"``: a new, empty, enabled bitmap; ``granularity`` (bytes per bit, a power of two
      of at least 512) defaults to QEMU's: the cluster size within 4 KiB..64 KiB;
    * ``"remove"``; ``"clear"`` (every bit cleared); ``"enable"``/``"disable"`` (start/stop
      recording writes);
    * ``"merge"``: the bits of the bitmap ``source`` (same image) are set in ``name`` too.

    Refusals raise ``ValueError`` with qemu-img's message (a missing bitmap, an existing name,
    a bitmap in use, a v2 image, ...), before anything is written. The new directory and
    tables are written to new clusters and switched to by one header write: a crash leaves the
    old or the new state, with at most leaked clusters."""
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {', '.join(map(repr, ACTIONS))}, not {action!r}")
    _qcowrs.bitmap(os.fspath(path), action, name, granularity=granularity, source=source)
