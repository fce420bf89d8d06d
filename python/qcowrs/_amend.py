"""``qcowrs.amend``: ``qemu-img amend`` from Python (the work is ``ops/amend.rs``)."""

from __future__ import annotations

import os
from collections.abc import Callable

from qcowrs import _qcowrs


def amend(
    path: str | os.PathLike[str],
    *,
    compat: str | None = None,
    refcount_bits: int | None = None,
    lazy_refcounts: bool | None = None,
    data_file: str | None = None,
    data_file_raw: bool | None = None,
    size: int | str | None = None,
    progress: Callable[[int, int], object] | None = None,
) -> None:
    """Changes options of the qcow2 image at ``path`` in place, as ``qemu-img amend -o``.
    ``None`` leaves an option as it is.

    ``compat``: ``"1.1"``/``"v3"`` upgrades a v2 image, ``"0.10"``/``"v2"`` downgrades (zero
    clusters are expanded; refused for what v2 cannot hold: a data file, extended L2 entries,
    other refcount widths, snapshots of another size, zstd-compressed clusters).
    ``refcount_bits``: the whole refcount structure is rewritten with the new width (the old
    one stays valid until one header write switches to the new one). ``lazy_refcounts``,
    ``data_file`` (a new name for the external data file; ``""`` removes it),
    ``data_file_raw=False``, ``size`` (bytes or ``"10G"``; smaller shrinks). A new backing
    file is :func:`qcowrs.rebase`'s job, as in qemu-img 10. Every refusal comes before any
    change; ``progress(done, total)`` counts the steps."""
    if isinstance(size, str):
        from qcowrs.cli._common import CliError, size_option

        try:
            size = size_option("size", size)
        except CliError as e:
            raise ValueError(str(e)) from None
    _qcowrs.amend(
        os.fspath(path),
        compat=compat,
        refcount_bits=refcount_bits,
        lazy_refcounts=lazy_refcounts,
        data_file=data_file,
        data_file_raw=data_file_raw,
        size=size,
        progress=progress,
    )
