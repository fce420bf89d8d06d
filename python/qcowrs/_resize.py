"""``qcowrs.resize``: ``qemu-img resize`` from Python (the work is ``ops/resize.rs``)."""

from __future__ import annotations

import os

from qcowrs import _qcowrs


def resize(
    path: str | os.PathLike[str],
    size: int | str,
    *,
    shrink: bool = False,
    format: str | None = None,
) -> int:
    """Resizes the qcow2 or raw image at ``path`` as ``qemu-img resize`` does and returns the
    new size. ``size`` is bytes, or a string with qemu-img's syntax: ``"10G"``, or relative
    ``"+1G"``/``"-512M"``. Making the disk smaller needs ``shrink=True`` (the guest data past
    the new end is dropped; internal snapshots keep theirs); the size must be a positive
    multiple of 512. A qcow2 shrink writes the new size first, so a crash leaves at worst
    leaked clusters."""
    from qcowrs.cli._common import CliError, parse_size

    delta: int | None = None
    absolute: int | None = None
    if isinstance(size, int):
        absolute = size
    else:
        text = size.strip()
        try:
            if text[:1] in ("+", "-"):
                n = parse_size(text[1:])
                delta = -n if text[0] == "-" else n
            else:
                absolute = parse_size(text)
        except CliError:
            raise ValueError("Parameter 'size' expects a non-negative number below 2^64") from None
    if absolute is not None and absolute < 0:
        raise ValueError("New image size must be positive")
    return _qcowrs.resize(os.fspath(path), size=absolute, delta=delta, shrink=shrink, format=format)
