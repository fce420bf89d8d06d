"""Crash safety of the refcount rebuild, by fault injection.

The native module has a test hook: `_fail_after_ops(n)` makes the (n+1)-th following
write/flush/resize of any image file fail with a QcowError, as if the process died there
(nothing after it reaches the file); `_io_ops()` counts those operations.

For each broken image: run the repairing operation once unfaulted to learn its number of I/O
operations K, then for every k < K (or a spread sample when K is large): fresh copy, fault at
k, the operation must fail with a QcowError, and then

  * the crashed image still reads the same guest content in QEMU (the rebuild only writes
    unused clusters before its single header commit),
  * a fresh `QcowFile.open(copy, "r+b", rebuild=True)` succeeds and leaves an image that
    `qemu-img check` calls clean, with unchanged content and snapshots.
"""

from __future__ import annotations

import shutil
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    ImageBuilder,
    Refcounts,
    assert_qemu_clean,
    content_digest,
    raw_sha256,
    requires_qemu,
    set_header_bits,
)
from test_rebuild import (
    BASES,
    _nothing,
    _set_dirty,
    _truncate_reftable,
    _zero_cluster0,
    _zero_refblock0,
    data_host_clusters,
)

pytestmark = requires_qemu

SAMPLE = 30  # spread samples when K is large, plus the first and last EDGE
EDGE = 5


def _c512_dirty_stale(p: Path) -> None:
    """Dirty bit over zeroed refcounts of many data clusters in several refblocks."""
    r = Refcounts(p)
    clusters = data_host_clusters(p)
    for c in clusters[:: max(1, len(clusters) // 40)]:
        r.set(c, 0)
    set_header_bits(p, "incompatible_features", 1)


def _v2_cluster0_and_copied(p: Path) -> None:
    """v2 (no dirty bit): cluster 0's refcount zeroed and OFLAG_COPIED cleared on the first data
    entry, so the repair both rebuilds and fixes COPIED; an interrupted one must not leave the
    COPIED error behind (nothing would redo it on the next open)."""
    _zero_cluster0(p)
    with p.open("r+b") as f:
        f.seek(40)
        (l1,) = struct.unpack(">Q", f.read(8))
        f.seek(l1)
        (l2,) = struct.unpack(">Q", f.read(8))
        l2 &= 0x00FF_FFFF_FFFF_FE00
        f.seek(l2)
        table = f.read(65536)
        for i in range(0, len(table), 8):
            (e,) = struct.unpack(">Q", table[i : i + 8])
            if e:
                f.seek(l2 + i)
                f.write(struct.pack(">Q", e & ~(1 << 63)))
                return
    raise AssertionError("no data entry found")


IMAGES: dict[str, tuple[str, Callable[[Path], None]]] = {
    # v2, cluster 0's refcount zeroed and a COPIED flag cleared
    "v2_cluster0_copied": ("v2", _v2_cluster0_and_copied),
    # 64 KiB clusters v3, cluster 0's refcount zeroed
    "v3_cluster0": ("v3", _zero_cluster0),
    # 512 B clusters v3, 3 MiB written, dirty bit over zeroed refcounts
    "c512_dirty": ("c512", _c512_dirty_stale),
    # internal snapshots, refblock 0 zeroed
    "snapshots_refblock": ("snapshots", _zero_refblock0),
    # 512 B clusters, 64-bit refcounts, reftable cut to 1 cluster: the rebuild grows it
    "reftable_growth": ("c512_rt2", lambda p: (_truncate_reftable(p), _set_dirty(p))),
    # lazy refcounts after a qemu-io abort: dirty bit, refcounts missing
    "lazy_abort": ("lazy_abort", _nothing),
}


@pytest.fixture(autouse=True)
def _reset_hook(qcowrs_mod: Any) -> Iterator[None]:
    native = qcowrs_mod._qcowrs
    native._fail_after_ops(None)
    try:
        yield
    finally:
        native._fail_after_ops(None)


@pytest.fixture(scope="module")
def broken(
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[[str], tuple[Path, dict[str, str]]]:
    root = tmp_path_factory.mktemp("fault-images")
    cache: dict[str, tuple[Path, dict[str, str]]] = {}

    def get(name: str) -> tuple[Path, dict[str, str]]:
        if name not in cache:
            base_name, corrupt = IMAGES[name]
            p = BASES[base_name](ImageBuilder(root / name))
            digest = content_digest(p)
            corrupt(p)
            cache[name] = (p, digest)
        return cache[name]

    return get


def sample_ks(k_total: int) -> list[int]:
    if k_total <= SAMPLE + 2 * EDGE:
        return list(range(k_total))
    spread = {round(i * (k_total - 1) / (SAMPLE - 1)) for i in range(SAMPLE)}
    edges = set(range(EDGE)) | set(range(k_total - EDGE, k_total))
    return sorted(spread | edges)


def open_rebuild_close(qcowrs_mod: Any, path: Path) -> None:
    f = qcowrs_mod.QcowFile.open(path, mode="r+b", rebuild=True)
    f.close()


def repair_all(qcowrs_mod: Any, path: Path) -> None:
    report = qcowrs_mod.check(path, repair="all")
    if report.check_errors:  # a report rather than an exception: still a failed repair
        raise qcowrs_mod.QcowError(f"check_errors={report.check_errors}")


def explicit_rebuild(qcowrs_mod: Any, path: Path) -> None:
    with qcowrs_mod.QcowFile.open(path, mode="r+b") as f:
        f.rebuild_refcounts()


OPERATIONS: dict[str, Callable[[Any, Path], None]] = {
    "open_rebuild": open_rebuild_close,
    "check_repair_all": repair_all,
}


def count_ops(qcowrs_mod: Any, op: Callable[[Any, Path], None], path: Path) -> int:
    native = qcowrs_mod._qcowrs
    n0 = native._io_ops()
    op(qcowrs_mod, path)
    return int(native._io_ops() - n0)


def run_faulted(
    qcowrs_mod: Any,
    op: Callable[[Any, Path], None],
    src: Path,
    digest: dict[str, str],
    tmp: Path,
    what: str,
) -> None:
    native = qcowrs_mod._qcowrs
    ref = tmp / "ref.qcow2"
    shutil.copyfile(src, ref)
    k_total = count_ops(qcowrs_mod, op, ref)
    assert k_total > 0, f"{what}: the repair did no I/O at all"
    assert k_total < 10_000, f"{what}: {k_total} I/O operations for a small image"
    assert_qemu_clean(ref, f"{what} unfaulted")
    assert content_digest(ref) == digest

    failures = []
    for k in sample_ks(k_total):
        img = tmp / f"k{k}.qcow2"
        shutil.copyfile(src, img)
        native._fail_after_ops(k)
        try:
            with pytest.raises(qcowrs_mod.QcowError):
                op(qcowrs_mod, img)
        except pytest.fail.Exception:
            failures.append(f"k={k}: no QcowError although write #{k + 1} failed")
            continue
        finally:
            native._fail_after_ops(None)
        # the crash left the guest data readable and intact
        if raw_sha256(img) != digest[""]:
            failures.append(f"k={k}: guest content changed by the interrupted repair")
            continue
        try:
            open_rebuild_close(qcowrs_mod, img)
            assert_qemu_clean(img, f"{what} k={k} recovered")
            assert content_digest(img) == digest, "content changed"
        except (AssertionError, OSError) as e:
            failures.append(f"k={k}: recovery failed: {type(e).__name__}: {str(e)[:300]}")
        img.unlink()
    assert not failures, f"{what} (K={k_total}):\n" + "\n".join(failures)


@pytest.mark.parametrize("op_name", list(OPERATIONS))
@pytest.mark.parametrize("image", list(IMAGES))
def test_interrupted_repair_recovers(
    image: str,
    op_name: str,
    broken: Callable[[str], tuple[Path, dict[str, str]]],
    qcowrs_mod: Any,
    tmp_path: Path,
) -> None:
    src, digest = broken(image)
    run_faulted(qcowrs_mod, OPERATIONS[op_name], src, digest, tmp_path, f"{image}/{op_name}")


def test_interrupted_explicit_rebuild_of_a_clean_image(
    broken: Callable[[str], tuple[Path, dict[str, str]]], qcowrs_mod: Any, tmp_path: Path
) -> None:
    """rebuild_refcounts() on a consistent image with snapshots, interrupted anywhere."""
    root = tmp_path / "clean"
    src = BASES["snapshots"](ImageBuilder(root))
    digest = content_digest(src)
    run_faulted(qcowrs_mod, explicit_rebuild, src, digest, tmp_path, "explicit rebuild")


def test_hook_counts_and_resets(qcowrs_mod: Any, broken: Any, tmp_path: Path) -> None:
    """The hook itself: counting is monotonic, a read-only check does no I/O, reset works."""
    native = qcowrs_mod._qcowrs
    src, _ = broken("v3_cluster0")
    img = tmp_path / "h.qcow2"
    shutil.copyfile(src, img)
    n0 = native._io_ops()
    qcowrs_mod.check(img)
    assert native._io_ops() == n0, "a check without repair wrote to the file"
    native._fail_after_ops(0)
    native._fail_after_ops(None)
    open_rebuild_close(qcowrs_mod, img)
    assert native._io_ops() > n0
    assert_qemu_clean(img, "after reset hook")
