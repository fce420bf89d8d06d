"""``qcowrs.commit``: ``qemu-img commit`` from Python (the work is ``ops/commit.rs``)."""

from __future__ import annotations

import os
from collections.abc import Callable


def commit(
    path: str | os.PathLike[str],
    *,
    base: str | os.PathLike[str] | None = None,
    drop: bool = False,
    progress: Callable[[int, int], object] | None = None,
) -> None:
    """Writes the data of the overlay at ``path`` into its backing file (or into ``base``, an
    image further down its chain), as ``qemu-img commit``; the base grows if it is smaller.
    The overlay is then emptied (it reads through to the base) unless ``drop`` is true or a
    ``base`` is given (which implies it, as in qemu-img: the images in between are left stale).
    The base is flushed before the overlay is emptied, so a crash never changes what the
    overlay reads. ``progress(done, total)`` is called as the copy goes."""
    from qcowrs import _qcowrs

    _qcowrs.commit(
        os.fspath(path),
        base=None if base is None else os.fspath(base),
        drop=drop,
        progress=progress,
    )
