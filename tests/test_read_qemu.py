"""Images made by qemu-img/qemu-io, read through qcowrs, checked against QEMU's own view.

For every scenario:
  * the guest content read through qcowrs equals `qemu-img convert -O raw` (sha256 of the
    whole disk, plus random unaligned slices),
  * `allocated_ranges()` equals the depth-0 entries of `qemu-img map --output=json`
    (compared as merged interval sets per kind; see conftest.qemu_kind for the mapping),
  * virtual_size, cluster_size and the header fields agree with `qemu-img info --output=json`
    and with an independent struct parse of the header bytes.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    ImageBuilder,
    file_sha256,
    parse_header,
    qcowrs_sha256,
    qemu_allocation,
    qemu_img,
    qemu_info,
    qemu_io,
    ranges_by_kind,
    raw_bytes,
    requires_qemu,
)

pytestmark = requires_qemu

KiB = 1024
MiB = 1024 * KiB


def scattered(size: int, cluster: int) -> list[str]:
    """Pattern writes at unaligned offsets, crossing cluster boundaries, up to the last byte."""
    c = cluster
    cmds = [
        "write -P 0x11 0 1",
        "write -P 0x12 1 510",
        f"write -P 0x21 {c - 1} 2",  # straddles clusters 0/1
        f"write -P 0x31 {3 * c + 7} {2 * c + 5}",  # several clusters, both ends unaligned
        f"write -P 0x41 {7 * c - 300} 600",
        f"write -P 0x51 {size // 2 - 3} {c + 6}",
        f"write -P 0x61 {size - c - 3} {c + 3}",  # ends exactly at the last guest byte
    ]
    for cmd in cmds:
        _, _, _, off, length = cmd.split()
        assert int(off) + int(length) <= size, f"scenario bug: {cmd} past {size}"
    return cmds


_FOUR_SYMBOLS = bytes(b"abcd"[i & 3] for i in range(256))


def semi_random(n: int, seed: int) -> bytes:
    """Deterministic data mixing incompressible, compressible and zero stretches."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < n:
        kind = rng.randrange(4)
        chunk = rng.randrange(1, 96 * KiB)
        if kind == 0:
            out += rng.randbytes(chunk)  # incompressible
        elif kind == 1:
            out += rng.randbytes(chunk).translate(_FOUR_SYMBOLS)  # ~2 bits/byte
        elif kind == 2:
            out += bytes(chunk)  # zeros
        else:
            out += bytes([rng.randrange(256)]) * chunk
    return bytes(out[:n])


# --------------------------------------------------------------------------------------------
# Scenario builders: each returns the path of the image to read (the top of a chain).

Builder = Callable[[ImageBuilder], Path]


def plain(
    compat: str, cluster: int, size: int, *, extra: list[str] | None = None, **opts: Any
) -> Builder:
    def build(b: ImageBuilder) -> Path:
        p = b.create("t.qcow2", size, compat=compat, cluster_size=cluster, **opts)
        b.io("t.qcow2", *scattered(size, cluster), *(extra or []))
        return p

    return build


def zero_and_discard(
    compat: str, cluster: int = 64 * KiB, size: int = 4 * MiB, **opts: Any
) -> Builder:
    c = cluster

    def build(b: ImageBuilder) -> Path:
        p = b.create("t.qcow2", size, compat=compat, cluster_size=c, **opts)
        b.io(
            "t.qcow2",
            f"write -P 0x5a 0 {12 * c}",
            f"write -z {c} {c}",  # zero over an allocated cluster (v3: ZERO_ALLOC)
            f"write -z -u {3 * c} {2 * c}",  # zero with unmap (v3: ZERO_PLAIN)
            f"write -z {20 * c} {3 * c}",  # zero over unallocated clusters
            f"write -z {6 * c + 100} 300",  # partial-cluster zero write inside data
            f"discard {8 * c} {2 * c}",  # whole clusters
            f"discard {10 * c + 512} 1024",  # part of a cluster: must stay data
            f"write -P 0x6b {30 * c - 5} 10",
            f"discard {30 * c} {c}",
        )
        return p

    return build


def refcount_bits(bits: int) -> Builder:
    def build(b: ImageBuilder) -> Path:
        size = 2 * MiB
        p = b.create("t.qcow2", size, cluster_size=4096, refcount_bits=bits)
        b.io("t.qcow2", *scattered(size, 4096), "write -z 409600 8192", "discard 8192 4096")
        return p

    return build


def compressed_convert(cluster: int, ctype: str, size: int = 3 * MiB) -> Builder:
    def build(b: ImageBuilder) -> Path:
        src = b.path("src.raw")
        src.write_bytes(semi_random(size, seed=cluster + len(ctype)))
        return b.convert(
            "src.raw",
            "t.qcow2",
            src_fmt="raw",
            compress=True,
            cluster_size=cluster,
            compression_type=ctype,
        )

    return build


def compressed_qemu_io(ctype: str, cluster: int = 64 * KiB) -> Builder:
    c = cluster

    def build(b: ImageBuilder) -> Path:
        p = b.create("t.qcow2", 2 * MiB, cluster_size=c, compression_type=ctype)
        b.io(
            "t.qcow2",
            f"write -c -P 0x71 0 {c}",
            f"write -c -P 0x72 {c} {c}",  # may share a host cluster with the previous one
            f"write -c -P 0x73 {5 * c} {3 * c}",
            f"write -P 0x74 {6 * c + 3} 7",  # COW of a compressed cluster -> data
            f"write -c -P 0x75 {10 * c} {c}",
            f"write -z {10 * c} {c}",  # compressed cluster zeroed
            f"write -c -P 0x76 {12 * c} {c}",
            f"discard {12 * c} {c}",
        )
        return p

    return build


def backing_chain(b: ImageBuilder) -> Path:
    b.create("base.qcow2", 4 * MiB)
    b.io("base.qcow2", "write -P 0x11 0 1M", "write -P 0x12 3M 65536")
    b.create("mid.qcow2", backing="base.qcow2", backing_fmt="qcow2")
    b.io("mid.qcow2", "write -P 0x22 512K 1M", "write -z 3M 32K")
    p = b.create("top.qcow2", backing="mid.qcow2", backing_fmt="qcow2")
    b.io(
        "top.qcow2",
        "write -P 0x33 100000 100",  # partial cluster: COW from the backing chain
        "write -z 0 64K",
        "discard 1M 64K",  # v3 with backing: becomes a zero cluster
        "write -P 0x34 2000000 70000",
    )
    return p


def backing_shorter(b: ImageBuilder) -> Path:
    b.create("base.qcow2", 1 * MiB)
    b.io("base.qcow2", "write -P 0x11 0 1M")
    p = b.create("top.qcow2", 3 * MiB, backing="base.qcow2", backing_fmt="qcow2")
    b.io("top.qcow2", "write -P 0x22 1040000 20000", "write -P 0x23 2500000 1000")
    return p


def backing_raw(b: ImageBuilder) -> Path:
    b.path("base.raw").write_bytes(semi_random(2 * MiB, seed=7))
    p = b.create("top.qcow2", backing="base.raw", backing_fmt="raw")
    b.io("top.qcow2", "write -P 0x44 65530 20", "write -z 1M 64K", "write -P 0x45 1900000 5")
    return p


def backing_v2(b: ImageBuilder) -> Path:
    b.create("base.qcow2", 2 * MiB, compat="0.10")
    b.io("base.qcow2", "write -P 0x11 0 2M")
    p = b.create("top.qcow2", backing="base.qcow2", backing_fmt="qcow2", compat="0.10")
    b.io("top.qcow2", "write -P 0x22 70000 1000", "write -z 1M 64K", "discard 1536K 64K")
    return p


def extended_l2(cluster: int, *, with_backing: bool = False) -> Builder:
    sub = cluster // 32

    def build(b: ImageBuilder) -> Path:
        size = 4 * MiB
        kw: dict[str, Any] = {}
        if with_backing:
            b.create("base.qcow2", size)
            b.io("base.qcow2", f"write -P 0x99 0 {size}")
            kw = {"backing": "base.qcow2", "backing_fmt": "qcow2"}
        p = b.create(
            "t.qcow2", None if with_backing else size, cluster_size=cluster, extended_l2="on", **kw
        )
        b.io(
            "t.qcow2",
            f"write -P 0x11 {sub} {sub}",  # one subcluster
            f"write -P 0x12 {3 * sub + 5} 7",  # partial subcluster
            f"write -P 0x13 {cluster - sub} {2 * sub}",  # across a cluster boundary
            f"write -P 0x14 {2 * cluster} {cluster}",
            f"write -z {2 * cluster + 2 * sub} {sub}",  # zero subcluster inside data
            f"write -z {5 * cluster + 7 * sub} {3 * sub}",  # zero subclusters, unallocated
            f"write -P 0x15 {8 * cluster + 100} {5 * sub}",
            f"write -z {8 * cluster + 2 * sub} {sub + 1}",  # unaligned zero within data
            f"discard {8 * cluster + 4 * sub} {sub}",
        )
        return p

    return build


def data_file(raw: bool) -> Builder:
    def build(b: ImageBuilder) -> Path:
        size = 4 * MiB
        # Absolute name: qemu resolves a relative data-file name against the *working
        # directory* of the process opening the image, not the image's directory (unlike
        # backing files), so a relative name only works from the image's directory.
        opts: dict[str, Any] = {"data_file": b.path("t.data")}
        if raw:
            opts["data_file_raw"] = "on"
        p = b.create("t.qcow2", size, **opts)
        b.io("t.qcow2", *scattered(size, 64 * KiB), "write -z 2M 128K")
        return p

    return build


def l1_multi_cluster(b: ImageBuilder) -> Path:
    # 512 B clusters: 64 L2 entries per table, one L2 covers 32 KiB, an L1 cluster (64 entries)
    # covers 2 MiB, so a 16 MiB disk needs 512 L1 entries = 8 clusters of L1.
    size = 16 * MiB
    p = b.create("t.qcow2", size, cluster_size=512)
    b.io(
        "t.qcow2",
        "write -P 0x11 0 5000",
        "write -P 0x12 2097000 2000",  # crosses the first L1-cluster boundary (2 MiB)
        "write -P 0x13 9437180 8",
        f"write -P 0x14 {size - 70000} 70000",  # the far end: last L1 cluster
        f"write -z {size - 40000} 1024",
    )
    return p


def snapshot(b: ImageBuilder) -> Path:
    p = b.create("t.qcow2", 2 * MiB)
    b.io("t.qcow2", "write -P 0x11 0 1M")
    qemu_img("snapshot", "-c", "snap1", p)
    b.io("t.qcow2", "write -P 0x22 65536 100", "write -P 0x23 1M 64K", "discard 512K 64K")
    qemu_img("snapshot", "-c", "snap2", p)
    b.io("t.qcow2", "write -P 0x24 0 10")
    return p


def prealloc(mode: str) -> Builder:
    def build(b: ImageBuilder) -> Path:
        p = b.create("t.qcow2", 2 * MiB, preallocation=mode)
        b.io("t.qcow2", "write -P 0x11 100000 5000", "write -z 1M 64K")
        return p

    return build


def odd_size(b: ImageBuilder) -> Path:
    size = 1000448  # 1954 sectors: not a multiple of the 64 KiB cluster size
    p = b.create("t.qcow2", size)
    b.io("t.qcow2", "write -P 0x11 0 1000", f"write -P 0x22 {size - 5000} 5000")
    return p


def empty(compat: str) -> Builder:
    def build(b: ImageBuilder) -> Path:
        # A fresh image ends inside its L1 cluster (file length 0x30008, not cluster aligned).
        return b.create("t.qcow2", 3 * MiB, compat=compat)

    return build


def lazy_refcounts_dirty(b: ImageBuilder) -> Path:
    # qemu-io's `abort` simulates a crash: the dirty bit stays set and refcounts are missing.
    p = b.create("t.qcow2", 2 * MiB, lazy_refcounts="on")
    proc = qemu_io(p, "write -P 0x11 1000 100000", "write -z 1M 64K", "abort", check=False)
    assert proc.returncode != 0, "qemu-io abort should have killed qemu-io"
    assert parse_header(p)["incompatible_features"] & 1, "dirty bit not left set"
    return p


@dataclass(frozen=True)
class Scenario:
    name: str
    build: Builder


SCENARIOS = [
    Scenario(
        "v2_64k", plain("0.10", 64 * KiB, 4 * MiB, extra=["write -z 1M 64K", "discard 2M 128K"])
    ),
    Scenario(
        "v3_64k", plain("1.1", 64 * KiB, 4 * MiB, extra=["write -z 1M 64K", "discard 2M 128K"])
    ),
    Scenario("v2_512", plain("0.10", 512, 1 * MiB)),
    Scenario("cluster_512", plain("1.1", 512, 1 * MiB)),
    Scenario("cluster_4k", plain("1.1", 4 * KiB, 2 * MiB)),
    Scenario("cluster_64k", plain("1.1", 64 * KiB, 4 * MiB)),
    Scenario("cluster_2m", plain("1.1", 2 * MiB, 16 * MiB)),
    *[Scenario(f"refcount_bits_{n}", refcount_bits(n)) for n in (1, 2, 4, 8, 16, 32, 64)],
    Scenario("zero_discard_v3", zero_and_discard("1.1")),
    Scenario("zero_discard_v3_4k", zero_and_discard("1.1", cluster=4 * KiB, size=1 * MiB)),
    Scenario("zero_discard_v2", zero_and_discard("0.10")),
    Scenario("compressed_zlib_64k", compressed_convert(64 * KiB, "zlib")),
    Scenario("compressed_zstd_64k", compressed_convert(64 * KiB, "zstd")),
    Scenario("compressed_zlib_512", compressed_convert(512, "zlib", size=1 * MiB)),
    Scenario("compressed_zlib_4k", compressed_convert(4 * KiB, "zlib")),
    Scenario("compressed_zstd_2m", compressed_convert(2 * MiB, "zstd", size=8 * MiB)),
    Scenario("compressed_qemu_io_zlib", compressed_qemu_io("zlib")),
    Scenario("compressed_qemu_io_zstd", compressed_qemu_io("zstd")),
    Scenario("compressed_qemu_io_zlib_4k", compressed_qemu_io("zlib", cluster=4 * KiB)),
    Scenario("backing_chain", backing_chain),
    Scenario("backing_shorter", backing_shorter),
    Scenario("backing_raw", backing_raw),
    Scenario("backing_v2", backing_v2),
    Scenario("extended_l2_64k", extended_l2(64 * KiB)),
    Scenario("extended_l2_16k", extended_l2(16 * KiB)),
    Scenario("extended_l2_backing", extended_l2(64 * KiB, with_backing=True)),
    Scenario("data_file", data_file(raw=False)),
    Scenario("data_file_raw", data_file(raw=True)),
    Scenario("l1_multi_cluster", l1_multi_cluster),
    Scenario("snapshots", snapshot),
    Scenario("prealloc_metadata", prealloc("metadata")),
    Scenario("prealloc_falloc", prealloc("falloc")),
    Scenario("odd_size", odd_size),
    Scenario("empty_v3", empty("1.1")),
    Scenario("empty_v2", empty("0.10")),
    Scenario("lazy_refcounts_dirty", lazy_refcounts_dirty),
]


@dataclass
class Built:
    path: Path
    raw: bytes
    raw_sha256: str
    file_sha256: str


@pytest.fixture(scope="module", params=SCENARIOS, ids=[s.name for s in SCENARIOS])
def scn(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Built:
    scenario: Scenario = request.param
    b = ImageBuilder(tmp_path_factory.mktemp(scenario.name))
    path = scenario.build(b)
    raw = raw_bytes(path)
    return Built(path, raw, hashlib.sha256(raw).hexdigest(), file_sha256(path))


# --------------------------------------------------------------------------------------------


def test_content_matches_qemu(scn: Built, qcowrs_mod: Any) -> None:
    assert qcowrs_sha256(scn.path) == scn.raw_sha256
    assert file_sha256(scn.path) == scn.file_sha256, "a read-only open modified the image"


def test_random_slices_match_qemu(scn: Built, qcowrs_mod: Any) -> None:
    size = len(scn.raw)
    rng = random.Random(size)
    with qcowrs_mod.QcowFile.open(scn.path, mode="rb") as f:
        for _ in range(60):
            off = rng.randrange(size)
            n = rng.choice([1, 7, 511, 513, 4097, 65537, 200_001])
            assert f.seek(off) == off
            got = f.read(n)
            assert got == scn.raw[off : off + n], f"read({n}) at {off:#x}"
            assert f.tell() == min(off + n, size)
    assert file_sha256(scn.path) == scn.file_sha256


def test_allocated_ranges_match_qemu_map(scn: Built, qcowrs_mod: Any) -> None:
    with qcowrs_mod.QcowFile.open(scn.path, mode="rb") as f:
        ranges = f.allocated_ranges()
        size = f.virtual_size
    ranges = [tuple(r) for r in ranges]
    prev_end, prev_kind = -1, None
    for r in ranges:
        assert len(r) == 3, r
        off, length, kind = r
        assert isinstance(off, int), r
        assert isinstance(length, int), r
        assert kind in ("data", "zero", "compressed"), r
        assert length > 0, r
        assert off >= max(prev_end, 0), f"ranges not sorted/disjoint at {r}"
        assert off + length <= size, f"range past the virtual size: {r}"
        assert not (off == prev_end and kind == prev_kind), f"adjacent {kind} not merged at {r}"
        prev_end, prev_kind = off + length, kind
    assert ranges_by_kind(ranges) == qemu_allocation(scn.path)  # type: ignore[arg-type]


def test_geometry_and_header_match_qemu_info(scn: Built, qcowrs_mod: Any) -> None:
    info = qemu_info(scn.path)
    spec = info["format-specific"]["data"]
    raw = parse_header(scn.path)
    with qcowrs_mod.QcowFile.open(scn.path, mode="rb") as f:
        assert f.virtual_size == info["virtual-size"] == len(scn.raw)
        assert f.cluster_size == info["cluster-size"]
        h = f.header
    assert isinstance(h, qcowrs_mod.QcowHeader)
    h2 = qcowrs_mod.QcowHeader.read(scn.path)

    for hdr in (h, h2):
        for field, want in raw.items():
            assert getattr(hdr, field) == want, field
        assert hdr.version == {"0.10": 2, "1.1": 3}[spec["compat"]]
        assert hdr.size == info["virtual-size"]
        assert hdr.cluster_size == info["cluster-size"]
        assert hdr.refcount_bits == spec["refcount-bits"]
        assert bool(hdr.incompatible_features & 1) == info["dirty-flag"]
        if hdr.version == 3:
            assert hdr.compression_type == {"zlib": 0, "zstd": 1}[spec["compression-type"]]
            assert bool(hdr.incompatible_features & 2) == spec["corrupt"]
            assert bool(hdr.incompatible_features & 16) == spec["extended-l2"]
            assert bool(hdr.compatible_features & 1) == spec["lazy-refcounts"]
            assert bool(hdr.autoclear_features & 2) == spec.get("data-file-raw", False)
        assert hdr.data_file == spec.get("data-file")
        assert hdr.backing_file == info.get("backing-filename")
        assert hdr.backing_format == info.get("backing-filename-format")
