"""Refcount check, repair and rebuild, with `qemu-img check` as the oracle.

Every case starts from an image made by qemu-img/qemu-io (a "base"), breaks its refcount
structure by poking bytes (a "corruption"), and then:

  (a) `qcowrs.check(img)` reports the same `corruptions`, `leaks` and exit code as
      `qemu-img check --output=json` on the same bytes, and does not modify the file;
  (b) `QcowFile.open(copy1, "r+b", rebuild=True)` (where it must act: cluster 0's refcount is 0,
      the dirty bit is set, or lazy refcounts are on and wrong) and
      `qcowrs.check(copy2, repair="all")` each leave an image that `qemu-img check` calls clean,
      whose guest content and every internal snapshot's content are unchanged;
  (c) `qcowrs.check(copy2)` after the repair is clean, and the repair report says `rebuilt`
      whenever QEMU needed a rebuild for the same image ("Rebuilding refcount structure").

Expected numbers are never hard coded: they come from QEMU at test time. Where qcowrs is meant
to differ from QEMU, the case is listed in INTENDED_DIFFERENCES with the reason.

The module ends with targeted regressions (multi-cluster L1, many refblocks, refcount
overflow, truncated file, shared compressed clusters, 1 PiB virtual size, lazy refcounts,
cross-linked clusters).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    ImageBuilder,
    Refcounts,
    assert_qemu_clean,
    content_digest,
    data_host_clusters,
    file_sha256,
    parse_header,
    peek,
    poke,
    poke_field,
    qemu_check,
    qemu_img,
    qemu_info,
    qemu_io,
    raw_sha256,
    requires_qemu,
    set_header_bits,
    snapshot_names,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = requires_qemu

KiB = 1024
MiB = 1024 * KiB
DIRTY = 1 << 0  # incompatible_features bit 0
LAZY = 1 << 0  # compatible_features bit 0
REBUILD_MARK = "Rebuilding refcount structure"  # what qemu-img check -r all prints to stderr

# --------------------------------------------------------------------------------------------
# Raw structure helpers


def l1_entries(path: Path) -> list[int]:
    h = parse_header(path)
    n = h["l1_size"]
    with open(path, "rb") as fh:
        fh.seek(h["l1_table_offset"])
        raw = fh.read(8 * n).ljust(8 * n, b"\0")
    return [int.from_bytes(raw[i * 8 : i * 8 + 8], "big") for i in range(n)]


def l2_table_offset(path: Path, l1_index: int = 0) -> int:
    return l1_entries(path)[l1_index] & 0x00FFFFFFFFFFFE00


def compressed_geometry(path: Path) -> tuple[int, int, int]:
    """(csize_shift x, offset mask, sector-count mask) of compressed L2 descriptors."""
    cb = parse_header(path)["cluster_bits"]
    x = 62 - (cb - 8)
    return x, (1 << x) - 1, (1 << (cb - 8)) - 1


def compressed_host_ranges(path: Path) -> list[tuple[int, int]]:
    """[start, end) host byte ranges of the compressed clusters of L2 table 0."""
    x, omask, smask = compressed_geometry(path)
    cs = parse_header(path)["cluster_size"]
    l2 = l2_table_offset(path)
    out = []
    with open(path, "rb") as fh:
        fh.seek(l2)
        raw = fh.read(cs)
    for i in range(cs // 8):
        e = int.from_bytes(raw[i * 8 : i * 8 + 8], "big")
        if e >> 62 & 1:
            off = e & omask
            nsect = ((e >> x) & smask) + 1
            out.append((off, off + nsect * 512 - (off & 511)))
    return out


def share_compressed(path: Path) -> int:
    """Moves the second compressed cluster's stream into the first one's host cluster, behind
    the first stream, and repoints L2[1] at it: two guest clusters now share one host cluster
    with unchanged content. Returns the host cluster that is no longer referenced."""
    h = parse_header(path)
    cb = h["cluster_bits"]
    x, omask, smask = compressed_geometry(path)
    l2 = l2_table_offset(path)
    e0, e1 = peek(path, l2, ">Q"), peek(path, l2 + 8, ">Q")
    assert e0 >> 62 & 1, "scenario bug: L2[0] must be compressed"
    assert e1 >> 62 & 1, "scenario bug: L2[1] must be compressed"
    c0, n0 = e0 & omask, ((e0 >> x) & smask) + 1
    c1, n1 = e1 & omask, ((e1 >> x) & smask) + 1
    new = (c0 & ~511) + n0 * 512
    assert c1 % 512 == 0, "scenario bug: second stream not sector aligned"
    assert (new + n1 * 512 - 1) >> cb == c0 >> cb, "scenario bug: no room in the host cluster"
    with open(path, "rb") as fh:
        fh.seek(c1)
        blob = fh.read(n1 * 512)
    poke(path, new, "", blob)
    poke(path, l2 + 8, ">Q", (1 << 62) | ((n1 - 1) << x) | new)
    return c1 >> cb


def info_data(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = qemu_info(path)["format-specific"]["data"]
    return data


# --------------------------------------------------------------------------------------------
# Bases: images made by QEMU. Each builder returns the image path inside its own directory.

Build = Callable[[ImageBuilder], Path]


def _plain(size: str | int, *cmds: str, **opts: Any) -> Build:
    def build(b: ImageBuilder) -> Path:
        p = b.create("base.qcow2", size, **opts)
        if cmds:
            b.io("base.qcow2", *cmds)
        return p

    return build


def _with_snapshots(size: str | int = "4M", **opts: Any) -> Build:
    def build(b: ImageBuilder) -> Path:
        p = b.create("base.qcow2", size, **opts)
        b.io("base.qcow2", "write -P 0x01 0 1M", "write -P 0x0a 3M 64k")
        qemu_img("snapshot", "-c", "s1", p)
        b.io("base.qcow2", "write -P 0x02 512k 1M")  # COW of shared clusters
        qemu_img("snapshot", "-c", "s2", p)
        b.io("base.qcow2", "write -P 0x03 0 64k", "write -z 3M 64k")
        return p

    return build


def _compressed(b: ImageBuilder) -> Path:
    p = b.create("base.qcow2", "4M")
    # two compressed clusters sharing host cluster 5, then normal data
    b.io(
        "base.qcow2",
        "write -c -P 1 0 64k",
        "write -c -P 2 64k 64k",
        "write -P 3 1M 128k",
        "write -c -P 4 2M 64k",
    )
    return p


def _bitmap(b: ImageBuilder) -> Path:
    p = b.create("base.qcow2", "4M")
    qemu_img("bitmap", "--add", p, "b0")
    b.io("base.qcow2", "write -P 7 0 256k", "write -P 8 3M 64k")
    return p


def _backing(b: ImageBuilder) -> Path:
    base = b.create("backing.qcow2", "4M")
    b.io("backing.qcow2", "write -P 0x11 0 4M")
    # absolute backing name: the overlay is copied elsewhere by the tests
    p = b.create("base.qcow2", backing=str(base), backing_fmt="qcow2")
    b.io("base.qcow2", "write -P 0x22 100000 200000", "write -z 2M 64k", "write -P 0x23 3M 4k")
    return p


def _lazy_abort(b: ImageBuilder) -> Path:
    """lazy_refcounts=on, writes, then qemu-io `abort`: dirty bit set, refcounts missing."""
    p = b.create("base.qcow2", "4M", lazy_refcounts="on")
    proc = subprocess.run(
        [
            "qemu-io",
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5a 0 300k",
            "-c",
            "write -P 0x5b 2M 64k",
            "-c",
            "abort",
            os.fspath(p),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode in (-6, 134), f"qemu-io abort: {proc.returncode} {proc.stderr}"
    assert parse_header(p)["incompatible_features"] & DIRTY, "abort left no dirty bit"
    return p


def _data_file(b: ImageBuilder) -> Path:
    """External data file (absolute name, the copies share it): data is not refcounted."""
    raw = b.path("data.raw")
    p = b.create("base.qcow2", "4M", data_file=str(raw))
    b.io("base.qcow2", "write -P 0x31 0 300k", "write -P 0x32 3M 64k")
    return p


SCATTER = (
    "write -P 0xab 0 1M",
    "write -P 0xcd 3M 4096",
    "write -z 2M 64k",  # ZERO_PLAIN
    "write -P 0xee 1536k 128k",
    "write -z 1536k 64k",  # over allocated data: ZERO_ALLOC (refcounted)
)

BASES: dict[str, Build] = {
    "v3": _plain("4M", *SCATTER),
    "v2": _plain("4M", "write -P 0xab 0 1M", "write -P 0xcd 3M 4096", compat="0.10"),
    "snapshots": _with_snapshots(),
    "compressed": _compressed,
    "bitmap": _bitmap,
    "refbits1": _plain(
        "2M", "write -P 1 0 100k", "write -P 2 1M 8k", cluster_size=4096, refcount_bits=1
    ),
    "refbits2_snap": _with_snapshots("4M", cluster_size=4096, refcount_bits=2),
    "refbits8": _plain(
        "2M", "write -P 1 0 100k", "write -P 2 1M 8k", cluster_size=4096, refcount_bits=8
    ),
    "refbits64": _plain(
        "2M", "write -P 1 0 100k", "write -P 2 1M 8k", cluster_size=4096, refcount_bits=64
    ),
    # 512 B clusters: l1_size 256 (4 L1 clusters, the last one used), ~26 refblocks
    "c512": _plain("8M", "write -P 1 0 3M", "write -P 2 7M 100k", cluster_size=512),
    # 512 B clusters with 64-bit refcounts: a 2-cluster reftable
    "c512_rt2": _plain(
        "8M", "write -P 1 0 3M", "write -P 2 7M 100k", cluster_size=512, refcount_bits=64
    ),
    "c2m": _plain("16M", "write -P 1 0 3M", "write -P 2 12M 100k", cluster_size=2 * MiB),
    "backing": _backing,
    "lazy_abort": _lazy_abort,
    "lazy_clean": _plain("4M", *SCATTER, lazy_refcounts="on"),
    # nothing written: the file ends inside the L1 cluster (length not cluster aligned)
    "empty": _plain("4M"),
    "extended_l2": _plain(
        "4M", "write -P 1 2k 2k", "write -P 2 1M 100k", "write -z 1M 4k", extended_l2="on"
    ),
    # every L2 entry points at a hole of the host file
    "prealloc_metadata": _plain("8M", "write -P 5 1M 64k", preallocation="metadata"),
    "data_file": _data_file,
}


@dataclass(frozen=True)
class BaseImage:
    path: Path
    digest: dict[str, str]  # "" -> active layer sha256, snapshot name -> its sha256
    info: dict[str, Any]  # qemu-img info format-specific data


def base_cache(root: Path) -> Callable[[str], BaseImage]:
    """Builds each base image of BASES once, under `root`, on first use."""
    cache: dict[str, BaseImage] = {}

    def get(name: str) -> BaseImage:
        if name not in cache:
            p = BASES[name](ImageBuilder(root / name))
            cache[name] = BaseImage(p, content_digest(p), info_data(p))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def bases(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], BaseImage]:
    return base_cache(tmp_path_factory.mktemp("rebuild-bases"))


# --------------------------------------------------------------------------------------------
# Corruptions: poke the refcount structure of a copy of a base.


def _zero_cluster0(p: Path) -> None:
    Refcounts(p).set(0, 0)


def _first_data_cluster(p: Path) -> int:
    clusters = data_host_clusters(p)
    assert clusters, "scenario bug: no data cluster"
    return clusters[len(clusters) // 2]


def _zero_data(p: Path) -> None:
    Refcounts(p).set(_first_data_cluster(p), 0)


def _zero_refblock0(p: Path) -> None:
    r = Refcounts(p)
    rb = r.reftable()[0] & ~0x1FF
    poke(p, rb, "", bytes(r.cluster_size))


def _zero_reftable_entry0(p: Path) -> None:
    Refcounts(p).set_reftable_entry(0, 0)


def _no_reftable(p: Path) -> None:
    poke_field(p, "refcount_table_offset", 0)
    poke_field(p, "refcount_table_clusters", 0)


def _raise_cluster0(p: Path) -> None:
    r = Refcounts(p)
    assert r.bits > 1, "scenario bug: 1-bit refcounts cannot be raised"
    r.set(0, min(r.max_refcount, 2))


def _raise_data(p: Path) -> None:
    r = Refcounts(p)
    assert r.bits > 1
    r.set(_first_data_cluster(p), 2)


def _orphans(p: Path) -> None:
    """Three clusters appended to the file with refcount 1 and no reference."""
    r = Refcounts(p)
    n = -(-p.stat().st_size // r.cluster_size)
    os.truncate(p, (n + 3) * r.cluster_size)
    for c in range(n, n + 3):
        r.set(c, 1)


def _zero_later_reftable_entry(p: Path) -> None:
    r = Refcounts(p)
    used = [i for i, e in enumerate(r.reftable()) if e]
    assert len(used) >= 3, "scenario bug: needs several refblocks"
    r.set_reftable_entry(used[len(used) // 2], 0)


def _truncate_reftable(p: Path) -> None:
    r = Refcounts(p)
    per = r.cluster_size // 8
    table = r.reftable()
    assert r.reftable_clusters >= 2, "scenario bug: needs a multi-cluster reftable"
    assert any(table[per:]), "scenario bug: the second reftable cluster must be used"
    poke_field(p, "refcount_table_clusters", 1)


def _lower_shared(p: Path) -> None:
    r = Refcounts(p)
    shared = [c for c, v in r.all_refcounts().items() if v >= 2]
    assert shared, "scenario bug: no shared cluster"
    r.set(shared[0], 1)


def _refblock_on_data(p: Path) -> None:
    """reftable[0] points at a data cluster: the "refblock" overlaps guest data."""
    r = Refcounts(p)
    r.set_reftable_entry(0, _first_data_cluster(p) * r.cluster_size)


def _refblock_on_l2(p: Path) -> None:
    """reftable[0] points at the L2 table: the "refblock" overlaps metadata."""
    Refcounts(p).set_reftable_entry(0, l2_table_offset(p))


def _reftable_entry_reserved(p: Path) -> None:
    r = Refcounts(p)
    r.set_reftable_entry(0, r.reftable()[0] | 0x100)


def _refblock_beyond_eof(p: Path) -> None:
    r = Refcounts(p)
    r.set_reftable_entry(1, (p.stat().st_size // r.cluster_size + 100) * r.cluster_size)


def _refblock0_past_eof(p: Path) -> None:
    """reftable[0] points past the end of the file: QEMU reads that refblock as zeros
    ("refcount block 0 is outside image", then every cluster refcount=0 reference=1)."""
    r = Refcounts(p)
    r.set_reftable_entry(0, (p.stat().st_size // r.cluster_size + 10) * r.cluster_size)


def _refblock_duplicated(p: Path) -> None:
    r = Refcounts(p)
    r.set_reftable_entry(1, r.reftable()[0])


def _nothing(p: Path) -> None:
    pass


def _set_dirty(p: Path) -> None:
    set_header_bits(p, "incompatible_features", DIRTY)


@dataclass(frozen=True)
class Corruption:
    steps: tuple[Callable[[Path], None], ...]
    # QcowFile.open(rebuild=True) must act on the result: cluster 0's refcount is 0 or the
    # dirty bit is set (lazy images: also when the refcounts are wrong, see Case.open_trigger)
    trigger: bool


CORRUPTIONS: dict[str, Corruption] = {
    "cluster0_zero": Corruption((_zero_cluster0,), True),
    "data_zero": Corruption((_zero_data,), False),
    "data_zero_dirty": Corruption((_zero_data, _set_dirty), True),
    "refblock0_zeroed": Corruption((_zero_refblock0,), True),  # covers cluster 0
    "reftable_entry0_zero": Corruption((_zero_reftable_entry0,), True),
    "no_reftable": Corruption((_no_reftable,), True),
    "leak_cluster0": Corruption((_raise_cluster0,), False),
    "leak_data": Corruption((_raise_data,), False),  # leak + OFLAG_COPIED corruption
    "orphans": Corruption((_orphans,), False),
    "later_reftable_entry_zero": Corruption((_zero_later_reftable_entry,), False),
    "later_reftable_entry_zero_dirty": Corruption((_zero_later_reftable_entry, _set_dirty), True),
    "reftable_truncated": Corruption((_truncate_reftable,), False),
    "reftable_truncated_dirty": Corruption((_truncate_reftable, _set_dirty), True),
    "shared_lowered": Corruption((_lower_shared,), False),
    "dirty_only": Corruption((_set_dirty,), True),
    "refblock_on_data": Corruption((_refblock_on_data,), False),
    "refblock_on_l2": Corruption((_refblock_on_l2,), False),
    "refblock_on_l2_dirty": Corruption((_refblock_on_l2, _set_dirty), True),
    "reftable_entry_reserved": Corruption((_reftable_entry_reserved,), False),
    "refblock_beyond_eof": Corruption((_refblock_beyond_eof,), False),
    "refblock0_past_eof": Corruption((_refblock0_past_eof,), False),
    "refblock_duplicated": Corruption((_refblock_duplicated,), False),
    "as_built": Corruption((_nothing,), False),
}

MATRIX: dict[str, tuple[str, ...]] = {
    "v3": (
        "cluster0_zero",
        "data_zero",
        "data_zero_dirty",
        "refblock0_zeroed",
        "reftable_entry0_zero",
        "no_reftable",
        "leak_cluster0",
        "leak_data",
        "orphans",
        "dirty_only",
        "refblock_on_data",
        "refblock_on_l2",
        "refblock_on_l2_dirty",
        "reftable_entry_reserved",
        "refblock_beyond_eof",
        "refblock0_past_eof",
        "refblock_duplicated",
    ),
    "v2": (
        "cluster0_zero",
        "data_zero",
        "refblock0_zeroed",
        "no_reftable",
        "leak_cluster0",
        "orphans",
    ),
    "snapshots": (
        "cluster0_zero",
        "refblock0_zeroed",
        "shared_lowered",
        "data_zero_dirty",
        "leak_cluster0",
        "orphans",
    ),
    "compressed": ("cluster0_zero", "refblock0_zeroed", "shared_lowered", "data_zero_dirty"),
    "bitmap": ("cluster0_zero", "refblock0_zeroed", "data_zero_dirty", "leak_cluster0"),
    "refbits1": ("cluster0_zero", "data_zero", "refblock0_zeroed", "orphans"),
    "refbits2_snap": ("cluster0_zero", "shared_lowered", "leak_cluster0", "refblock0_zeroed"),
    "refbits8": ("cluster0_zero", "data_zero_dirty", "leak_cluster0"),
    "refbits64": ("cluster0_zero", "refblock0_zeroed", "leak_cluster0", "reftable_entry0_zero"),
    "c512": (
        "cluster0_zero",
        "later_reftable_entry_zero",
        "later_reftable_entry_zero_dirty",
        "refblock0_zeroed",
        "data_zero_dirty",
        "refblock0_past_eof",
    ),
    "c512_rt2": ("reftable_truncated", "reftable_truncated_dirty", "cluster0_zero"),
    "c2m": ("cluster0_zero", "data_zero", "leak_cluster0"),
    "backing": ("cluster0_zero", "data_zero_dirty", "refblock0_zeroed", "leak_cluster0"),
    "lazy_abort": ("as_built", "cluster0_zero"),
    "lazy_clean": ("data_zero", "cluster0_zero", "as_built"),
    "empty": ("cluster0_zero", "leak_cluster0", "no_reftable"),
    "extended_l2": ("cluster0_zero", "data_zero_dirty", "refblock0_zeroed"),
    "prealloc_metadata": ("cluster0_zero", "data_zero", "refblock0_zeroed"),
    "data_file": ("cluster0_zero", "refblock0_zeroed", "leak_cluster0"),
}

# (base, corruption) -> why qcowrs's pre-repair verdict may differ from qemu-img check's.
# Generic rule, applied to every case: when qemu-img cannot open the image at all (exit 1,
# no JSON; e.g. older QEMU on a header without a reftable: "Image does not contain a reference
# count table"), qcowrs must still open it for checking and report it broken (exit 1 or 2).
INTENDED_DIFFERENCES: dict[tuple[str, str], str] = {}

# (base, corruption) -> why `qemu-img check -r all` fails where qcowrs must succeed.
QEMU_CANNOT_REPAIR: dict[tuple[str, str], str] = {
    ("v3", "reftable_entry_reserved"): (
        "qemu 10.0 rebuilds but its overlap check still counts the old refblock at the masked "
        "offset: 'Preventing invalid write on metadata (overlaps with refcount block)', "
        "marks the image corrupt and exits 1"
    ),
}


@dataclass(frozen=True)
class Case:
    base: str
    corruption: str

    @property
    def id(self) -> str:
        return f"{self.base}-{self.corruption}"

    @property
    def open_trigger(self) -> bool:
        """Whether QcowFile.open(rebuild=True) must repair this image."""
        if CORRUPTIONS[self.corruption].trigger:
            return True
        # lazy refcounts: open checks and repairs if wrong (a clean image is also fine to open)
        return self.base.startswith("lazy")


CASES = [Case(b, c) for b, cs in MATRIX.items() for c in cs]


def make_corrupt(base: BaseImage, corruption: str, dst: Path) -> Path:
    shutil.copyfile(base.path, dst)
    for step in CORRUPTIONS[corruption].steps:
        step(dst)
    return dst


def assert_same_verdict_as_qemu(
    report: Any, rc: int, q: dict[str, Any], what: str, key: tuple[str, str] | None = None
) -> None:
    """qcowrs's check report vs `qemu-img check --output=json` (exit code rc, JSON q)."""
    if key is not None and key in INTENDED_DIFFERENCES:
        assert not report.is_clean, f"{what}: {INTENDED_DIFFERENCES[key]}"
        return
    if not q:  # qemu could not open the image
        assert rc == 1
        assert not report.is_clean, f"{what}: qemu cannot open it; qcowrs calls it clean"
        assert report.exit_code in (1, 2), f"{what}: exit code {report.exit_code}"
        return
    got = (report.corruptions, report.leaks, report.exit_code)
    want = (q.get("corruptions", 0), q.get("leaks", 0), rc)
    assert got == want, (
        f"{what}: qcowrs (corruptions, leaks, exit) = {got}, qemu-img check = {want}\n"
        f"qcowrs: {report.to_dict()}\nqemu: {q}\nproblems: {problems_text(report)}"
    )


def problems_text(report: Any, limit: int = 10) -> str:
    items = [
        f"{p.kind} host={p.host_offset} guest={p.guest_offset}: {p.message}"
        for p in list(report.problems)[:limit]
    ]
    return "; ".join(items)


def assert_repaired(path: Path, base: BaseImage, what: str) -> None:
    """qemu-img check is clean; guest content, snapshots, bitmaps, lazy bit unchanged."""
    assert_qemu_clean(path, what)
    assert content_digest(path) == base.digest, f"{what}: guest or snapshot content changed"
    info = info_data(path)
    assert info.get("bitmaps") == base.info.get("bitmaps"), f"{what}: bitmaps changed"
    assert info.get("lazy-refcounts") == base.info.get("lazy-refcounts"), what
    assert not (parse_header(path)["incompatible_features"] & DIRTY), f"{what}: still dirty"


def qemu_repair_oracle(src: Path, tmp: Path) -> tuple[int, dict[str, Any], bool]:
    """`qemu-img check -r all` on a scratch copy: (exit, JSON, whether QEMU rebuilt)."""
    scratch = tmp / "qemu-repaired.qcow2"
    shutil.copyfile(src, scratch)
    rc, q, err = qemu_check(scratch, "all")
    return rc, q, REBUILD_MARK in err


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_check_and_repair_match_qemu(
    case: Case, bases: Callable[[str], BaseImage], qcowrs_mod: Any, tmp_path: Path
) -> None:
    base = bases(case.base)
    img = make_corrupt(base, case.corruption, tmp_path / "corrupt.qcow2")
    rc, q, _ = qemu_check(img)
    qrc_all, q_all, qemu_rebuilt = qemu_repair_oracle(img, tmp_path)

    # (a) plain check: same verdict as qemu, file untouched
    before = file_sha256(img)
    report = qcowrs_mod.check(img)
    assert file_sha256(img) == before, "check without repair modified the file"
    assert_same_verdict_as_qemu(report, rc, q, f"{case.id} check", (case.base, case.corruption))
    assert report.rebuilt is False
    if not report.is_clean:
        assert report.problems, "a broken image with no problem listed"

    # (b1) open with rebuild=True
    if case.open_trigger:
        c1 = tmp_path / "opened.qcow2"
        shutil.copyfile(img, c1)
        with qcowrs_mod.QcowFile.open(c1, mode="r+b", rebuild=True) as f:
            assert f.virtual_size == qemu_info(base.path)["virtual-size"]
        assert_repaired(c1, base, f"{case.id} open(rebuild=True)")

    # (b2) check(repair="all")
    c2 = tmp_path / "repaired.qcow2"
    shutil.copyfile(img, c2)
    fixed = qcowrs_mod.check(c2, repair="all")
    assert (fixed.corruptions, fixed.leaks, fixed.check_errors, fixed.exit_code) == (0, 0, 0, 0), (
        f"{case.id} repair report: {fixed.to_dict()} {problems_text(fixed)}"
    )
    if qrc_all != 0:
        assert (case.base, case.corruption) in QEMU_CANNOT_REPAIR, (
            f"scenario bug: qemu itself cannot repair {case.id}: {q_all}"
        )
    if qemu_rebuilt:
        assert fixed.rebuilt, f"{case.id}: qemu rebuilt the refcounts, qcowrs did not say so"
        assert fixed.corruptions_fixed > 0, fixed.to_dict()
    elif qrc_all == 0:
        # no rebuild: the repair pass is QEMU's, figure for figure
        want = {k: v for k, v in q_all.items() if k not in ("filename", "format")}
        assert fixed.to_dict() == want, f"{case.id} repair: qcowrs {fixed.to_dict()} qemu {want}"
    assert_repaired(c2, base, f"{case.id} check(repair='all')")

    # (c) the repaired image checks clean through qcowrs too
    again = qcowrs_mod.check(c2)
    assert again.is_clean, again.to_dict()
    assert again.exit_code == 0, again.to_dict()
    assert again.rebuilt is False


# --------------------------------------------------------------------------------------------
# Targeted regressions


def test_l1_spanning_several_clusters_is_counted_fully(
    bases: Callable[[str], BaseImage], qcowrs_mod: Any, tmp_path: Path
) -> None:
    base = bases("c512")
    h = parse_header(base.path)
    cs = h["cluster_size"]
    assert h["l1_size"] * 8 > 2 * cs, "scenario bug: L1 must span several clusters"
    l1 = l1_entries(base.path)
    per = cs // 8
    assert any(l1[-per:]), "scenario bug: the last L1 cluster must hold L2 pointers"
    l1_clusters = [h["l1_table_offset"] // cs + i for i in range(-(-h["l1_size"] * 8 // cs))]

    # (1) a zeroed refcount of the last L1 cluster is seen, as qemu sees it
    img = tmp_path / "l1.qcow2"
    shutil.copyfile(base.path, img)
    Refcounts(img).set(l1_clusters[-1], 0)
    rc, q, _ = qemu_check(img)
    assert q.get("corruptions", 0) >= 1
    assert_same_verdict_as_qemu(qcowrs_mod.check(img), rc, q, "L1 tail refcount 0")

    # (2) a rebuild counts every L1 cluster and every L2 they point to
    img2 = tmp_path / "l1b.qcow2"
    shutil.copyfile(base.path, img2)
    Refcounts(img2).set(0, 0)
    with qcowrs_mod.QcowFile.open(img2, mode="r+b", rebuild=True):
        pass
    assert_repaired(img2, base, "multi-cluster L1 rebuild")
    r = Refcounts(img2)
    assert [r.get(c) for c in l1_clusters] == [1] * len(l1_clusters)
    for e in l1:
        if e & 0x00FFFFFFFFFFFE00:
            assert r.get((e & 0x00FFFFFFFFFFFE00) // cs) == 1, f"L2 at {e:#x} not counted"


def test_rebuild_spanning_many_refblocks(
    bases: Callable[[str], BaseImage], qcowrs_mod: Any, tmp_path: Path
) -> None:
    """512 B clusters: one 16-bit refblock covers 128 KiB; every refblock must be rebuilt."""
    base = bases("c512")
    img = tmp_path / "many.qcow2"
    shutil.copyfile(base.path, img)
    r0 = Refcounts(img)
    assert sum(1 for e in r0.reftable() if e) > 20
    expected = r0.all_refcounts()
    r0.set(0, 0)
    report = qcowrs_mod.check(img, repair="all")
    assert report.rebuilt
    assert_repaired(img, base, "many refblocks")
    after = Refcounts(img).all_refcounts()
    # every cluster that was in use (apart from the old refcount structure) still is
    old_meta = {r0.reftable_offset // r0.cluster_size} | {
        (e & ~0x1FF) // r0.cluster_size for e in r0.reftable() if e
    }
    missing = [c for c in expected if c not in old_meta and after.get(c) != expected[c]]
    assert not missing, f"refcounts lost for clusters {missing[:20]}"


def _overflow_image(b: ImageBuilder) -> Path:
    """refcount_bits=1 with two compressed clusters sharing one host cluster.

    qemu refuses to share with 1-bit refcounts (`qemu-img snapshot -c` fails with EINVAL and
    compressed writes get separate host clusters), so the sharing is made by poking."""
    p = b.create("ovf.qcow2", "1M", refcount_bits=1)
    b.io("ovf.qcow2", "write -c -P 1 0 64k", "write -c -P 2 64k 64k")
    freed = share_compressed(p)
    Refcounts(p).set(freed, 0)
    return p


def test_refcount_overflow_is_reported_and_repair_does_no_harm(
    builder: ImageBuilder, qcowrs_mod: Any, tmp_path: Path
) -> None:
    img = _overflow_image(builder)
    sha = raw_sha256(img)
    rc, q, err = qemu_check(img)
    assert "overflow" in err, err
    assert q.get("corruptions", 0) >= 1, (rc, q, err)

    report = qcowrs_mod.check(img)
    assert_same_verdict_as_qemu(report, rc, q, "overflow")
    kinds = [p.kind for p in report.problems]
    assert any("overflow" in k for k in kinds), f"no overflow problem in {kinds}"

    c2 = tmp_path / "ovf-repair.qcow2"
    shutil.copyfile(img, c2)
    before = file_sha256(c2)
    # Issue 8: a repair that cannot end clean refuses before writing anything (before, it ran
    # and left the overflow corruption in place).
    with pytest.raises(qcowrs_mod.CorruptImage, match=r"refused.*refcounts can count"):
        qcowrs_mod.check(c2, repair="all")
    assert file_sha256(c2) == before, "a refused repair changed the file"
    assert raw_sha256(c2) == sha


_CHILD = textwrap.dedent(
    r"""
    import json, resource, sys, time, traceback
    path, action = sys.argv[1], sys.argv[2]
    out = {}
    try:
        import qcowrs
        out["rss0"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t = time.perf_counter()
        if action == "check":
            r = qcowrs.check(path)
        elif action == "repair":
            r = qcowrs.check(path, repair="all")
        else:
            with qcowrs.QcowFile.open(path, mode="r+b", rebuild=True) as f:
                r = f.check()
        out["seconds"] = time.perf_counter() - t
        out["rss1"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["report"] = r.to_dict()
        out["clean"] = r.is_clean
        out["ok"] = True
    except BaseException as e:
        out["ok"] = False
        out["mro"] = [c.__name__ for c in type(e).__mro__]
        out["msg"] = str(e)
        out["tb"] = traceback.format_exc()[-2000:]
    sys.stdout.write("\n@@CHILD@@" + json.dumps(out))
    """
)


def run_child(path: Path, action: str, timeout: float = 60) -> dict[str, Any]:
    """check / repair / open(rebuild=True) in a child process: a crash fails only this test."""
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, os.fspath(path), action],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"qcowrs hung (> {timeout}s) on {action} of {path}")
    mark = proc.stdout.rfind("@@CHILD@@")
    if proc.returncode != 0 or mark < 0:
        pytest.fail(f"qcowrs crashed (exit {proc.returncode}) on {action}: {proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout[mark + len("@@CHILD@@") :])
    return result


def test_file_shorter_than_one_cluster(builder: ImageBuilder, qcowrs_mod: Any) -> None:
    """A valid 64 KiB-cluster header in a 300-byte file: clean errors, never a panic."""
    src = builder.create("v.qcow2", "4M")
    short = builder.path("short.qcow2")
    short.write_bytes(src.read_bytes()[:300])
    _, q, _ = qemu_check(short)
    before = file_sha256(short)
    res = run_child(short, "check")
    assert file_sha256(short) == before, "check without repair modified the file"
    if res["ok"]:
        assert not res["clean"], res
        if q:
            assert res["report"].get("corruptions", 0) == q.get("corruptions", 0), (res, q)
    else:
        assert "QcowError" in res["mro"], res
    for action in ("rebuild", "repair"):
        c = builder.copy(src, f"short-{action}.qcow2")
        c.write_bytes(src.read_bytes()[:300])
        res = run_child(c, action)
        if res["ok"]:  # a repair that claims success must really have repaired
            assert_qemu_clean(c, f"short file after {action}")
        else:
            assert "QcowError" in res["mro"], res
            assert res["msg"], res


def test_shared_compressed_cluster_gets_refcount_2(
    bases: Callable[[str], BaseImage], qcowrs_mod: Any, tmp_path: Path
) -> None:
    """Compressed clusters sharing a host cluster: one reference per compressed cluster that
    touches it (by byte range), after a rebuild as before."""
    base = bases("compressed")
    cs = parse_header(base.path)["cluster_size"]
    refs: dict[int, int] = {}
    for start, end in compressed_host_ranges(base.path):
        for c in range(start // cs, (end - 1) // cs + 1):
            refs[c] = refs.get(c, 0) + 1
    assert max(refs.values()) >= 2, f"scenario bug: no shared host cluster {refs}"
    assert {c: Refcounts(base.path).get(c) for c in refs} == refs
    img = tmp_path / "c.qcow2"
    shutil.copyfile(base.path, img)
    _zero_refblock0(img)
    with qcowrs_mod.QcowFile.open(img, mode="r+b", rebuild=True):
        pass
    assert_repaired(img, base, "compressed rebuild")
    assert {c: Refcounts(img).get(c) for c in refs} == refs


def test_snapshot_data_survives_rebuild(
    bases: Callable[[str], BaseImage], qcowrs_mod: Any, tmp_path: Path
) -> None:
    base = bases("snapshots")
    assert snapshot_names(base.path) == ["s1", "s2"]
    assert len(set(base.digest.values())) == 3, "scenario bug: snapshots should differ"
    img = tmp_path / "s.qcow2"
    shutil.copyfile(base.path, img)
    _zero_refblock0(img)
    with qcowrs_mod.QcowFile.open(img, mode="r+b", rebuild=True) as f:
        report = f.check()
        assert report.is_clean, report.to_dict()
    assert_repaired(img, base, "snapshots rebuild")
    # the snapshots still share their clusters: refcounts above 1 survive the rebuild
    assert max(Refcounts(img).all_refcounts().values()) >= 3


def test_huge_virtual_size_rebuilds_fast_in_little_memory(
    builder: ImageBuilder, qcowrs_mod: Any
) -> None:
    """1 PiB virtual size, a 17 MiB file: the rebuild is sized by the file, not the disk."""
    p = builder.create("big.qcow2", "1P")
    builder.io("big.qcow2", "write -P 1 0 64k", "write -P 2 900T 64k")
    # far too big for a raw copy (or even a quick `qemu-img map`): read back the written data
    Refcounts(p).set(0, 0)
    res = run_child(p, "rebuild", timeout=60)
    assert res["ok"], res
    growth_mb = (res["rss1"] - res["rss0"]) / 1024  # ru_maxrss is in KiB on Linux
    assert growth_mb < 200, f"peak RSS grew by {growth_mb:.0f} MB"
    assert res["seconds"] < 20, f"rebuild took {res['seconds']:.1f}s"
    assert_qemu_clean(p, "1 PiB rebuild")
    out = qemu_io(p, "read -P 1 0 64k", "read -P 2 900T 64k", "read -P 0 64k 64k").stdout
    assert "Pattern verification failed" not in out, out


def test_old_refcount_structure_is_freed(
    bases: Callable[[str], BaseImage], qcowrs_mod: Any, tmp_path: Path
) -> None:
    base = bases("v3")
    img = tmp_path / "free.qcow2"
    shutil.copyfile(base.path, img)
    old = Refcounts(img)
    cs = old.cluster_size
    old_clusters = {old.reftable_offset // cs} | {(e & ~0x1FF) // cs for e in old.reftable() if e}
    old.set(0, 0)
    report = qcowrs_mod.check(img, repair="all")
    assert report.rebuilt
    rc, q, _ = qemu_check(img)
    assert rc == 0, q
    assert not q.get("leaks"), q
    new = Refcounts(img)
    new_clusters = {new.reftable_offset // cs} | {(e & ~0x1FF) // cs for e in new.reftable() if e}
    still = [c for c in old_clusters - new_clusters if new.get(c)]
    assert not still, f"old refcount clusters {still} are still allocated"


@pytest.mark.parametrize("how", ["open", "check"])
def test_lazy_refcounts_kept_after_rebuild(
    bases: Callable[[str], BaseImage], qcowrs_mod: Any, tmp_path: Path, how: str
) -> None:
    base = bases("lazy_abort")
    img = tmp_path / "lazy.qcow2"
    shutil.copyfile(base.path, img)
    if how == "open":
        with qcowrs_mod.QcowFile.open(img, mode="r+b", rebuild=True):
            pass
    else:
        assert qcowrs_mod.check(img, repair="all").rebuilt
    info = qemu_info(img)
    assert info["format-specific"]["data"]["lazy-refcounts"] is True
    assert info.get("dirty-flag") is False
    assert_repaired(img, base, "lazy rebuild")


def test_clean_lazy_image_opened_with_rebuild_stays_lazy(
    bases: Callable[[str], BaseImage], qcowrs_mod: Any, tmp_path: Path
) -> None:
    base = bases("lazy_clean")
    img = tmp_path / "lazy.qcow2"
    shutil.copyfile(base.path, img)
    with qcowrs_mod.QcowFile.open(img, mode="r+b", rebuild=True) as f:
        f.read(4096)
    assert info_data(img)["lazy-refcounts"] is True
    assert_repaired(img, base, "clean lazy open")


def test_repair_leaks_on_an_image_needing_a_rebuild(
    bases: Callable[[str], BaseImage], qcowrs_mod: Any, tmp_path: Path
) -> None:
    base = bases("v3")
    img = make_corrupt(base, "cluster0_zero", tmp_path / "c0.qcow2")
    scratch = tmp_path / "q.qcow2"
    shutil.copyfile(img, scratch)
    qrc, _, qerr = qemu_check(scratch, "leaks")
    assert qrc == 1, qerr
    assert "need to rebuild" in qerr, qerr
    report = qcowrs_mod.check(img, repair="leaks")
    assert report.check_errors >= 1, report.to_dict()
    assert report.exit_code == 1, report.to_dict()
    assert not report.rebuilt
    # no harm done: qemu still sees the same single problem, content intact
    rc, q, _ = qemu_check(img)
    assert (rc, q.get("corruptions")) == (2, 1), q
    assert raw_sha256(img) == base.digest[""]


def test_explicit_rebuild_of_a_clean_image(
    bases: Callable[[str], BaseImage], qcowrs_mod: Any, tmp_path: Path
) -> None:
    base = bases("snapshots")
    img = tmp_path / "x.qcow2"
    shutil.copyfile(base.path, img)
    with qcowrs_mod.QcowFile.open(img, mode="r+b") as f:
        assert f.check().is_clean
        report = f.rebuild_refcounts()
        assert report.rebuilt, report.to_dict()
        assert report.is_clean, report.to_dict()
    assert_repaired(img, base, "explicit rebuild")


def test_rebuild_needs_read_write(bases: Callable[[str], BaseImage], qcowrs_mod: Any) -> None:
    base = bases("v3")
    before = file_sha256(base.path)
    with pytest.raises(ValueError, match=r"r\+b|read-write|rebuild"):
        qcowrs_mod.QcowFile.open(base.path, mode="rb", rebuild=True)
    assert file_sha256(base.path) == before


def test_bad_repair_argument(bases: Callable[[str], BaseImage], qcowrs_mod: Any) -> None:
    with pytest.raises(ValueError, match="repair"):
        qcowrs_mod.check(bases("v3").path, repair="everything")


def test_cross_linked_clusters_are_reported(builder: ImageBuilder, qcowrs_mod: Any) -> None:
    """Two active L2 entries pointing at one data cluster, no snapshot: QEMU counts it as
    refcount=1/reference=2 and "repairs" it into a shared cluster; qcowrs must call it a
    cross-link."""
    p = builder.create("x.qcow2", "1M")
    builder.io("x.qcow2", "write -P 1 0 64k", "write -P 2 64k 64k")
    l2 = l2_table_offset(p)
    poke(p, l2 + 8, ">Q", peek(p, l2, ">Q"))
    rc, q, _ = qemu_check(p)
    assert rc == 2, q
    assert q.get("corruptions") == 1, q
    report = qcowrs_mod.check(p)
    kinds = [x.kind for x in report.problems]
    assert any("cross" in k for k in kinds), f"no cross-link problem in {kinds}"
    assert not report.is_clean
    assert report.exit_code == 2, report.to_dict()
    cross = [x for x in report.problems if "cross" in x.kind]
    assert any(x.host_offset == peek(p, l2, ">Q") & 0x00FFFFFFFFFFFE00 for x in cross), (
        problems_text(report)
    )


def test_problems_name_the_offsets(
    bases: Callable[[str], BaseImage], qcowrs_mod: Any, tmp_path: Path
) -> None:
    base = bases("v3")
    img = tmp_path / "p.qcow2"
    shutil.copyfile(base.path, img)
    cluster = _first_data_cluster(img)
    Refcounts(img).set(cluster, 0)
    report = qcowrs_mod.check(img)
    cs = parse_header(img)["cluster_size"]
    hits = [p for p in report.problems if p.host_offset == cluster * cs]
    assert hits, problems_text(report)
    assert all(isinstance(p.message, str) and p.message for p in report.problems)


# --------------------------------------------------------------------------------------------
# Differential fuzzing: random refcount pokes, qcowrs vs qemu-img check


POKE_BASES = ("v3", "v2", "snapshots", "refbits2_snap", "compressed", "refbits1", "c512")


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_random_refcount_pokes_match_qemu(
    data: st.DataObject, bases: Callable[[str], BaseImage], qcowrs_mod: Any
) -> None:
    """1-4 refcounts set to random values (also past the end of the file, which QEMU never
    examines), sometimes with the dirty bit: the check equals qemu-img's JSON exactly, and
    repair="all" leaves a clean image with the same content."""
    base_name = data.draw(st.sampled_from(POKE_BASES), label="base")
    base = bases(base_name)
    with tempfile.TemporaryDirectory(prefix="qcowrs-poke-") as d:
        img = Path(d) / "p.qcow2"
        shutil.copyfile(base.path, img)
        r = Refcounts(img)
        n_file = -(-img.stat().st_size // r.cluster_size)
        limit = min(r.rb_entries, n_file + 8)
        value = st.one_of(st.sampled_from([0, 1, 2, 3]), st.integers(0, r.max_refcount)).map(
            lambda v: min(v, r.max_refcount)
        )
        pokes = data.draw(
            st.lists(st.tuples(st.integers(0, limit - 1), value), min_size=1, max_size=4),
            label="pokes",
        )
        for cluster, v in pokes:
            r.set(cluster, v)
        if r.header["version"] >= 3 and data.draw(st.booleans(), label="dirty"):
            _set_dirty(img)

        rc, q, _ = qemu_check(img)
        before = file_sha256(img)
        report = qcowrs_mod.check(img)
        assert file_sha256(img) == before
        want = {k: v for k, v in q.items() if k not in ("filename", "format")}
        assert report.to_dict() == want, f"qcowrs {report.to_dict()}\nqemu   {want}"
        assert report.exit_code == rc

        scratch = Path(d) / "q.qcow2"
        shutil.copyfile(img, scratch)
        qrc, q_all, qerr = qemu_check(scratch, "all")
        fixed = qcowrs_mod.check(img, repair="all")
        assert fixed.is_clean, f"{fixed.to_dict()} {problems_text(fixed)}"
        if REBUILD_MARK in qerr:
            assert fixed.rebuilt
        elif qrc == 0:
            want = {k: v for k, v in q_all.items() if k not in ("filename", "format")}
            assert fixed.to_dict() == want, f"repair: qcowrs {fixed.to_dict()}\nqemu   {want}"
        assert_repaired(img, base, f"{base_name} {pokes}")


def _structure_value(r: Refcounts, img: Path, kind: str, n_file: int, pick: int) -> int:
    cs = r.cluster_size
    table = [e for e in r.reftable() if e]
    return {
        "zero": 0,
        "other_refblock": table[pick % len(table)],
        "any_cluster": (pick % n_file) * cs,
        "past_eof": (n_file + 1 + pick % 50) * cs,
        "reserved_bits": (table[pick % len(table)] | (1 << (pick % 9))),
        "unaligned": (pick % n_file) * cs + 512 * (1 + pick % 7) % cs,
    }[kind]


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_random_reftable_and_l2_pokes_match_qemu(
    data: st.DataObject, bases: Callable[[str], BaseImage], qcowrs_mod: Any
) -> None:
    """Reftable entries and L2 entries poked to other clusters, past EOF, reserved bits,
    unaligned: the plain check equals qemu-img's JSON; a repair never changes the guest
    content of clusters it did not need to touch, and if it claims success qemu agrees."""
    base_name = data.draw(st.sampled_from(("v3", "snapshots", "c512", "refbits2_snap")))
    base = bases(base_name)
    kinds = ("zero", "other_refblock", "any_cluster", "past_eof", "reserved_bits", "unaligned")
    with tempfile.TemporaryDirectory(prefix="qcowrs-poke-") as d:
        img = Path(d) / "p.qcow2"
        shutil.copyfile(base.path, img)
        r = Refcounts(img)
        n_file = -(-img.stat().st_size // r.cluster_size)
        n_rt = max(1, sum(1 for e in r.reftable() if e))
        target = data.draw(st.sampled_from(("reftable", "l2")), label="target")
        kind = data.draw(st.sampled_from(kinds), label="kind")
        pick = data.draw(st.integers(0, 10_000), label="pick")
        if target == "reftable":
            index = data.draw(st.integers(0, n_rt), label="index")
            r.set_reftable_entry(index, _structure_value(r, img, kind, n_file, pick))
        else:
            l2 = l2_table_offset(img)
            index = data.draw(st.integers(0, 15), label="index")
            old = peek(img, l2 + 8 * index, ">Q")
            flags = old & (1 << 63) if old else 1 << 63
            v = _structure_value(r, img, kind, n_file, pick)
            poke(img, l2 + 8 * index, ">Q", flags | v if v else 0)
        rc, q, _ = qemu_check(img)
        report = qcowrs_mod.check(img)
        if not q:
            assert not report.is_clean, "qemu-img cannot open it, qcowrs calls it clean"
            return
        want = {k: v for k, v in q.items() if k not in ("filename", "format")}
        got = report.to_dict()
        assert (got.get("corruptions", 0), got.get("leaks", 0), report.exit_code) == (
            want.get("corruptions", 0),
            want.get("leaks", 0),
            rc,
        ), f"{target}[{index}] {kind}: qcowrs {got}\nqemu   {want}\n{problems_text(report)}"
        if target == "reftable":  # the guest view is unchanged: a repair must keep it
            try:
                fixed = qcowrs_mod.check(img, repair="all")
            except qcowrs_mod.QcowError:
                return
            if fixed.is_clean:
                assert_repaired(img, base, f"{base_name} reftable[{index}] {kind}")


# --------------------------------------------------------------------------------------------
# A broken snapshot L1 pointer must not let a leak repair free the snapshot's clusters


@pytest.mark.parametrize("repair", ["leaks", "all"])
@pytest.mark.parametrize("defect", ["unaligned_l1", "huge_l1_size"])
def test_bad_snapshot_l1_blocks_leak_repair(
    bases: Callable[[str], BaseImage], qcowrs_mod: Any, tmp_path: Path, defect: str, repair: str
) -> None:
    """QEMU skips a snapshot whose L1 pointer is invalid, so its clusters look leaked, and
    `-r leaks` frees them: undoing the one-field damage afterwards no longer gives the snapshot
    back. qcowrs reports the same counts but must not free them (intended difference, see
    qcow2-notes "Snapshot L1s"): after its repair, restoring the field gives a clean image
    with the snapshot intact."""
    base = bases("snapshots")
    img = tmp_path / "s.qcow2"
    shutil.copyfile(base.path, img)
    so = parse_header(img)["snapshots_offset"]
    field, fmt = (so, ">Q") if defect == "unaligned_l1" else (so + 8, ">I")
    good = peek(img, field, fmt)
    poke(img, field, fmt, good + 0x200 if defect == "unaligned_l1" else 5_000_000)

    rc, q, _ = qemu_check(img)
    assert q.get("corruptions", 0) >= 1
    assert q.get("leaks", 0) >= 1, "scenario: the skipped snapshot's clusters look leaked"
    report = qcowrs_mod.check(img)
    assert_same_verdict_as_qemu(report, rc, q, f"snapshot {defect}")
    assert any("snapshot" in p.kind for p in report.problems), problems_text(report)

    fixed = qcowrs_mod.check(img, repair=repair)
    if repair == "all":
        # Issue 8: repair="all" goes beyond QEMU and leaves a clean image: the snapshot whose
        # L1 table cannot be read is dropped (its content was unreadable), listed in
        # `dropped`, and the active disk is unchanged. (Before issue 8 the entry stayed broken
        # and the image unclean.)
        assert [d for d in fixed.dropped if d.kind == "snapshot"], fixed.dropped
        assert fixed.is_clean, problems_text(fixed)
        assert_qemu_clean(img, f"{defect} after repair=all")
        assert raw_sha256(img) == base.digest[""]
        assert len(snapshot_names(img)) == len(base.digest) - 2
        return
    assert fixed.corruptions >= 1, "a broken snapshot entry cannot be declared repaired"
    assert raw_sha256(img) == base.digest[""]
    poke(img, field, fmt, good)  # undo the damage
    assert_qemu_clean(img, f"{defect} after repair={repair}, field restored")
    assert content_digest(img) == base.digest
