"""``qcowrs.rebase``: ``qemu-img rebase`` from Python (the work is ``ops/rebase.rs``)."""

from __future__ import annotations

import os
from collections.abc import Callable

from qcowrs import _qcowrs


def rebase(
    path: str | os.PathLike[str],
    backing_file: str | None,
    backing_format: str | None = None,
    *,
    unsafe: bool = False,
    progress: Callable[[int, int], object] | None = None,
) -> None:
    """Moves the overlay at ``path`` onto ``backing_file`` (stored as given; a relative name
    is relative to the overlay; ``None`` or ``""``: no backing file), as ``qemu-img rebase``.

    Safe mode (the default) keeps the guest content: every cluster the overlay leaves to its
    backing chain and whose content differs on the new backing file is copied into the overlay
    first; the header then names the new file (and ``backing_format``, required with a backing
    file, as in qemu-img 10). ``unsafe=True`` changes only the header (the new backing file
    need not exist). ``progress(done, total)`` is called during the comparison."""
    _qcowrs.rebase(
        os.fspath(path), backing_file or "", backing_format, unsafe=unsafe, progress=progress
    )
