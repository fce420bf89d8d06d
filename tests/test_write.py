"""The write path against QEMU: images created and written by qcowrs are read back with
`qemu-img convert -O raw`, checked with `qemu-img check --output=json` and mapped with
`qemu-img map`, and compared with a bytearray model of the guest disk.

  * create: every supported option gives the same `qemu-img info` as `qemu-img create`;
  * interop: qcowrs and qemu-io take turns writing the same image;
  * copy-on-write from a backing file, a compressed cluster, a zero cluster, a snapshot;
  * freed clusters are reused; write_zeroes / discard / truncate semantics;
  * refcount-structure growth (new refblocks, reftable relocation) at 512 B clusters;
  * refusals: stale refcounts, read-only, shrink, writes past the end.
"""

from __future__ import annotations

import array
import errno
import hashlib
import io
import os
import random
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    GuestModel,
    ImageBuilder,
    Refcounts,
    assert_qemu_check,
    file_sha256,
    first_difference,
    merge,
    parse_header,
    pattern_bytes,
    qcowrs_read_all,
    qemu_allocation,
    qemu_check_shared,
    qemu_img,
    qemu_info,
    qemu_io,
    qemu_map,
    ranges_by_kind,
    raw_bytes,
    raw_sha256,
    requires_qemu,
    set_header_bits,
    snapshot_sha256,
)

pytestmark = requires_qemu

KiB = 1024
MiB = 1024 * KiB


# --------------------------------------------------------------------------------------------
# Helpers


def qemu_opts(kw: dict[str, Any]) -> dict[str, Any]:
    """qcowrs.QcowFile.create keyword arguments -> `qemu-img create -o` options."""
    out: dict[str, Any] = {}
    for k, v in kw.items():
        if k in ("lazy_refcounts", "extended_l2"):
            out[k] = "on" if v else "off"
        elif k in ("cluster_size", "refcount_bits"):
            out[k] = v
        else:
            raise AssertionError(f"no qemu option for {k}")
    return out


def create(qcowrs: Any, path: Path, size: int, **kw: Any) -> Any:
    f = qcowrs.QcowFile.create(path, size, **kw)
    assert isinstance(f, qcowrs.QcowFile)
    assert f.writable(), "QcowFile.create must return a writable (r+b) file"
    assert f.virtual_size == size
    assert f.tell() == 0
    return f


def assert_content(path: Path, model: GuestModel, what: str) -> None:
    """QEMU's view of the guest disk equals the model; qcowrs reads the same."""
    got = raw_bytes(path)
    assert got == bytes(model.data), (
        f"{what}: qemu-img convert: {first_difference(got, model.data)}"
    )
    mine = qcowrs_read_all(path)
    assert mine == bytes(model.data), f"{what}: qcowrs read: {first_difference(mine, model.data)}"


def assert_ranges_match_qemu(qcowrs: Any, path: Path) -> None:
    with qcowrs.QcowFile.open(path, mode="rb") as f:
        ranges = [tuple(r) for r in f.allocated_ranges()]
    assert ranges_by_kind(ranges) == qemu_allocation(path)  # type: ignore[arg-type]


def zero_in_map(path: Path, start: int, end: int) -> bool:
    """Every byte of [start, end) reads as zero per `qemu-img map` and holds no data of this
    image (zero flag set, data flag clear)."""
    for e in qemu_map(path):
        s, t = e["start"], e["start"] + e["length"]
        if t <= start or s >= end:
            continue
        if not e["zero"] or e["data"]:
            return False
    return True


def data_in_map(path: Path, start: int, end: int) -> bool:
    """Every byte of [start, end) is a data cluster of the image itself (depth 0)."""
    for e in qemu_map(path):
        s, t = e["start"], e["start"] + e["length"]
        if t <= start or s >= end:
            continue
        if e["depth"] != 0 or not e["data"] or e.get("compressed"):
            return False
    return True


def semi_random(n: int, seed: int) -> bytes:
    """Incompressible, compressible and zero stretches (compressible for `convert -c`)."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < n:
        kind = rng.randrange(3)
        chunk = rng.randrange(1, 40 * KiB)
        if kind == 0:
            out += rng.randbytes(chunk)
        elif kind == 1:
            out += bytes([rng.randrange(1, 256)]) * chunk
        else:
            out += rng.randbytes(chunk).translate(bytes(b"xyz"[i % 3] for i in range(256)))
    return bytes(out[:n])


def scattered_writes(size: int, cs: int) -> list[tuple[int, int, int]]:
    """(offset, length, pattern byte): unaligned, crossing cluster boundaries, to the last byte."""
    w = [
        (0, 1, 0x11),
        (1, 510, 0x12),
        (cs - 1, 2, 0x21),
        (3 * cs + 7, 2 * cs + 5, 0x31),
        (7 * cs - 300, 600, 0x41),
        (size // 2 - 3, cs + 6, 0x51),
        (size // 3 + 12345, 70001, 0x52),
        (size - cs - 3, cs + 3, 0x61),
        (2, 3, 0x71),  # overwrite inside an already written cluster
    ]
    for off, n, _ in w:
        assert 0 <= off <= off + n <= size, (off, n, size)
    return w


# --------------------------------------------------------------------------------------------
# create


INFO_KEYS = ("virtual-size", "cluster-size", "format", "dirty-flag")
SPEC_KEYS = (
    "compat",
    "lazy-refcounts",
    "refcount-bits",
    "corrupt",
    "extended-l2",
    "compression-type",
)


def info_subset(path: Path) -> dict[str, Any]:
    info = qemu_info(path)
    out = {k: info.get(k) for k in INFO_KEYS}
    spec = info["format-specific"]["data"]
    out.update({f"spec.{k}": spec.get(k) for k in SPEC_KEYS})
    out["backing-filename"] = info.get("backing-filename")
    out["backing-filename-format"] = info.get("backing-filename-format")
    out["snapshots"] = info.get("snapshots")
    return out


CREATE_CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("c512", {"cluster_size": 512}),
    ("c4k", {"cluster_size": 4096}),
    ("c64k", {}),
    ("c64k_explicit", {"cluster_size": 65536, "refcount_bits": 16, "lazy_refcounts": False}),
    ("c2m", {"cluster_size": 2 * MiB}),
    ("rb1", {"refcount_bits": 1}),
    ("rb1_c512", {"refcount_bits": 1, "cluster_size": 512}),
    ("rb64", {"refcount_bits": 64}),
    ("rb64_c512", {"refcount_bits": 64, "cluster_size": 512}),
    ("rb8", {"refcount_bits": 8}),
    ("lazy", {"lazy_refcounts": True}),
    ("lazy_c512", {"lazy_refcounts": True, "cluster_size": 512}),
    ("extl2", {"extended_l2": True}),
    ("extl2_c32k", {"extended_l2": True, "cluster_size": 32 * KiB}),
]


@pytest.mark.parametrize(
    ("size", "kw"), [(8 * MiB, c[1]) for c in CREATE_CONFIGS], ids=[c[0] for c in CREATE_CONFIGS]
)
def test_create_matches_qemu_img_create(
    builder: ImageBuilder, qcowrs_mod: Any, size: int, kw: dict[str, Any]
) -> None:
    twin = builder.create("twin.qcow2", size, **qemu_opts(kw))
    p = builder.path("q.qcow2")
    with create(qcowrs_mod, p, size, **kw) as f:
        assert f.cluster_size == kw.get("cluster_size", 65536)
        assert f.read(4096) == bytes(4096)
        assert f.allocated_ranges() == []
    assert info_subset(p) == info_subset(twin)
    assert_qemu_check(p, "fresh image")
    h, ht = parse_header(p), parse_header(twin)
    for field in (
        "version",
        "cluster_bits",
        "size",
        "crypt_method",
        "incompatible_features",
        "compatible_features",
        "autoclear_features",
        "refcount_order",
        "compression_type",
        "nb_snapshots",
        "backing_file_offset",
    ):
        assert h[field] == ht[field], field
    # the L1 table must cover the virtual size (QEMU refuses "L1 table is too small" otherwise)
    l2_entries = h["cluster_size"] // (16 if kw.get("extended_l2") else 8)
    assert h["l1_size"] * l2_entries * h["cluster_size"] >= size
    # readable through qcowrs and QEMU, all zeros
    assert raw_bytes(p) == bytes(size)
    assert qemu_map(p) == qemu_map(twin)


@pytest.mark.parametrize(
    ("size", "kw"),
    [(4 * MiB, c[1]) for c in CREATE_CONFIGS]
    + [(1000448, {}), (3 * MiB + 512, {"cluster_size": 4096})],
    ids=[c[0] for c in CREATE_CONFIGS] + ["odd_size", "odd_size_c4k"],
)
def test_create_then_write_matches_qemu_io_twin(
    builder: ImageBuilder, qcowrs_mod: Any, size: int, kw: dict[str, Any]
) -> None:
    """qcowrs creates and writes constant-pattern ranges; a qemu-img/qemu-io twin gets the same
    writes: `qemu-img compare` finds them identical, both check clean, the content is the model."""
    cs = kw.get("cluster_size", 65536)
    writes = scattered_writes(size, min(cs, 64 * KiB))
    model = GuestModel(bytes(size), cs)
    p = builder.path("q.qcow2")
    with create(qcowrs_mod, p, size, **kw) as f:
        for off, n, pat in writes:
            assert f.seek(off) == off
            assert f.write(bytes([pat]) * n) == n
            assert f.tell() == off + n
            model.write(off, bytes([pat]) * n)
        # read-your-writes before any flush
        f.seek(0)
        assert f.read(size) == bytes(model.data)
    twin = builder.create("twin.qcow2", size, **qemu_opts(kw))
    builder.io("twin.qcow2", *[f"write -P {pat:#x} {off} {n}" for off, n, pat in writes])
    assert_qemu_check(p, "after qcowrs writes")
    info = qemu_info(p)
    assert info["dirty-flag"] is False, "dirty bit left set after close"
    assert qemu_img("compare", "-f", "qcow2", "-F", "qcow2", p, twin, check=False).returncode == 0
    assert_content(p, model, "qcowrs writes")
    assert_ranges_match_qemu(qcowrs_mod, p)
    # data was written where the model has it, nothing else is allocated as data
    for off, n, _ in writes:
        assert data_in_map(p, off, off + n), (off, n)


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_create_with_backing_file(builder: ImageBuilder, qcowrs_mod: Any, fmt: str) -> None:
    size = 2 * MiB
    base_data = semi_random(size, seed=3)
    builder.path("base.raw").write_bytes(base_data)
    base = (
        "base.raw"
        if fmt == "raw"
        else builder.convert("base.raw", "base.qcow2", src_fmt="raw").name
    )
    twin = builder.create("twin.qcow2", size, backing=base, backing_fmt=fmt)
    p = builder.path("top.qcow2")
    with qcowrs_mod.QcowFile.create(p, size, backing_file=base, backing_format=fmt) as f:
        assert f.writable()
        f.seek(0)
        assert f.read(size) == base_data, "a fresh overlay must read its backing file"
    assert info_subset(p) == info_subset(twin)
    assert qemu_info(p)["backing-filename"] == base
    assert_qemu_check(p, "fresh overlay")
    assert raw_bytes(p) == base_data
    assert qemu_img("compare", p, twin, check=False).returncode == 0


def test_create_over_existing_file(builder: ImageBuilder, qcowrs_mod: Any) -> None:
    """Creating over an existing (larger) file either refuses (EEXIST, the file untouched) or,
    like `qemu-img create`, leaves a valid fresh image with no stale tail."""
    p = builder.path("q.qcow2")
    old = pattern_bytes(3 * MiB, 1)
    p.write_bytes(old)
    refused: OSError | None = None
    try:
        f = create(qcowrs_mod, p, 4 * MiB)
    except OSError as e:
        refused = e
    if refused is not None:
        assert refused.errno == errno.EEXIST, refused
        assert isinstance(refused, qcowrs_mod.QcowError), type(refused).__mro__
        assert p.read_bytes() == old, "a refused create modified the file"
        return
    with f:
        f.write(b"hello")
    assert_qemu_check(p, "create over an existing file")
    m = GuestModel(bytes(4 * MiB), 65536)
    m.write(0, b"hello")
    assert_content(p, m, "create over an existing file")


CLI_CASES = [
    ("64M", None, {}),
    ("1G", "cluster_size=4096,refcount_bits=64", {"cluster_size": 4096, "refcount_bits": 64}),
    ("512K", "cluster_size=512,lazy_refcounts=on", {"cluster_size": 512, "lazy_refcounts": "on"}),
    ("2T", "extended_l2=on", {"extended_l2": "on"}),
    ("10M", "cluster_size=2097152,refcount_bits=1", {"cluster_size": 2 * MiB, "refcount_bits": 1}),
]


@pytest.mark.parametrize(("size", "opts", "qopts"), CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_create_matches_qemu(
    builder: ImageBuilder, qcowrs_mod: Any, size: str, opts: str | None, qopts: dict[str, Any]
) -> None:
    from qcowrs.cli import main

    p = builder.path("q.qcow2")
    argv = ["create", "-f", "qcow2", str(p), size] + (["-o", opts] if opts else [])
    assert main(argv) in (0, None)
    twin = builder.create("twin.qcow2", size, **qopts)
    assert info_subset(p) == info_subset(twin)
    assert_qemu_check(p, f"cli create {argv}")


def test_cli_create_with_backing(builder: ImageBuilder, qcowrs_mod: Any) -> None:
    from qcowrs.cli import main

    builder.create("base.qcow2", "3M")
    builder.io("base.qcow2", "write -P 0x42 0 3M")
    cwd = os.getcwd()
    os.chdir(builder.root)  # a relative backing name, as a user would type it
    try:
        assert main(
            ["create", "-f", "qcow2", "top.qcow2", "3M", "-b", "base.qcow2", "-F", "qcow2"]
        ) in (0, None)
    finally:
        os.chdir(cwd)
    twin = builder.create("twin.qcow2", "3M", backing="base.qcow2", backing_fmt="qcow2")
    p = builder.path("top.qcow2")
    assert info_subset(p) == info_subset(twin)
    assert raw_bytes(p) == b"\x42" * (3 * MiB)


# --------------------------------------------------------------------------------------------
# interop


def test_qemu_and_qcowrs_take_turns(builder: ImageBuilder, qcowrs_mod: Any) -> None:
    size, cs = 8 * MiB, 65536
    p = builder.create("t.qcow2", size)
    model = GuestModel(bytes(size), cs)

    qemu_steps = [
        [(0, 1 * MiB, 0x11), (3 * MiB + 5, 70000, 0x12), (6 * MiB, 64 * KiB, 0x13)],
        [(100, 200, 0x21), (1 * MiB - 10, 20, 0x22), (5 * MiB, 3 * cs + 1, 0x23)],
        [(7 * MiB, 1 * MiB, 0x31), (2 * MiB + 1, 1, 0x32)],
    ]
    rng = random.Random(11)
    for step, qwrites in enumerate(qemu_steps):
        qemu_io(p, *[f"write -P {pat:#x} {off} {n}" for off, n, pat in qwrites])
        for off, n, pat in qwrites:
            model.write(off, bytes([pat]) * n)
        if step == 1:
            qemu_io(p, f"write -z {4 * MiB + 100} {2 * cs}", f"discard {6 * MiB} {cs}")
            model.write_zeroes(4 * MiB + 100, 2 * cs)
            model.discard(6 * MiB, cs)
        assert_qemu_check(p, f"after qemu step {step}")
        assert_content(p, model, f"after qemu step {step}")

        with qcowrs_mod.QcowFile.open(p, mode="r+b") as f:
            for i in range(12):
                off = rng.randrange(size - 1)
                n = min(rng.choice([1, 17, 511, 4097, cs - 1, cs + 1, 3 * cs + 77]), size - off)
                data = pattern_bytes(n, 1000 * step + i)
                f.seek(off)
                assert f.write(data) == n
                model.write(off, data)
            f.write_zeroes(2 * MiB + 3, cs + 10)
            model.write_zeroes(2 * MiB + 3, cs + 10)
            f.discard(1 * MiB + cs, 2 * cs)
            model.discard(1 * MiB + cs, 2 * cs)
        assert_qemu_check(p, f"after qcowrs step {step}")
        assert_content(p, model, f"after qcowrs step {step}")
    assert_ranges_match_qemu(qcowrs_mod, p)


# --------------------------------------------------------------------------------------------
# copy-on-write


@pytest.mark.parametrize(
    ("fmt", "extl2"),
    [("qcow2", False), ("raw", False), ("qcow2", True)],
    ids=["qcow2", "raw", "extl2"],
)
def test_cow_from_backing_file(
    builder: ImageBuilder, qcowrs_mod: Any, fmt: str, extl2: bool
) -> None:
    size, cs = 2 * MiB, 65536
    base_data = semi_random(size, seed=5)
    builder.path("base.raw").write_bytes(base_data)
    base = (
        "base.raw"
        if fmt == "raw"
        else builder.convert("base.raw", "base.qcow2", src_fmt="raw").name
    )
    base_sha = file_sha256(builder.path(base))
    p = builder.path("top.qcow2")
    model = GuestModel(base_data, cs)
    writes = [
        (100000, 100),  # middle of cluster 1
        (3 * cs - 5, 10),  # straddles clusters 2/3
        (5 * cs, cs),  # a whole cluster
        (7 * cs + 4096, 2048),  # one subcluster (extended L2: 2 KiB subclusters)
        (size - 7, 7),  # the last bytes
    ]
    with qcowrs_mod.QcowFile.create(
        p, size, backing_file=base, backing_format=fmt, extended_l2=extl2
    ) as f:
        for i, (off, n) in enumerate(writes):
            data = pattern_bytes(n, i)
            f.seek(off)
            f.write(data)
            model.write(off, data)
    assert_qemu_check(p, "COW from backing")
    assert_content(p, model, "COW from backing")
    assert file_sha256(builder.path(base)) == base_sha, "the backing file was modified"
    # only the written clusters (subclusters) are allocated in the overlay
    alloc = qemu_allocation(p)
    assert alloc["zero"] == []
    assert alloc["compressed"] == []

    # allocated: at least the written (sub)clusters, at most the written clusters (QEMU
    # allocates only the written subclusters with extended L2; copying the whole cluster from
    # the backing file is allowed)
    def rounded(g: int) -> list[tuple[int, int]]:
        return merge([(off // g * g, -(-(off + n) // g) * g) for off, n in writes])

    lo, hi = rounded(cs // 32 if extl2 else cs), rounded(cs)
    assert merge(alloc["data"] + lo) == alloc["data"], f"written ranges not allocated: {alloc}"
    assert merge(alloc["data"] + hi) == hi, f"more than the written clusters allocated: {alloc}"
    assert_ranges_match_qemu(qcowrs_mod, p)

    # the same again on an image made by qemu-img (not by qcowrs.create)
    q = builder.create("qtop.qcow2", size, backing=base, backing_fmt=fmt)
    with qcowrs_mod.QcowFile.open(q, mode="r+b") as f:
        for i, (off, n) in enumerate(writes):
            f.seek(off)
            f.write(pattern_bytes(n, i))
    assert_qemu_check(q, "COW from backing (qemu-made overlay)")
    assert raw_bytes(q) == bytes(model.data)


@pytest.mark.parametrize("cs", [65536, 4096, 512])
def test_cow_of_compressed_clusters(builder: ImageBuilder, qcowrs_mod: Any, cs: int) -> None:
    size = 1 * MiB
    data = semi_random(size, seed=cs)
    builder.path("src.raw").write_bytes(data)
    p = builder.convert("src.raw", "c.qcow2", src_fmt="raw", compress=True, cluster_size=cs)
    before = qemu_allocation(p)
    assert before["compressed"], "qemu-img convert -c made no compressed cluster"
    comp = [(s, e) for s, e in before["compressed"]]
    c0 = comp[0][0]
    model = GuestModel(data, cs)
    with qcowrs_mod.QcowFile.open(p, mode="r+b") as f:
        ops: list[tuple[int, bytes]] = [
            (c0 + cs // 3, pattern_bytes(7, 1)),  # partial write inside a compressed cluster
            (comp[-1][1] - cs - 3, pattern_bytes(6, 2)),  # across two (compressed?) clusters
        ]
        # a whole compressed cluster overwritten, if there are at least 3
        whole = [s for s, e in comp for s in range(s, e, cs)]
        if len(whole) > 3:
            ops.append((whole[2], pattern_bytes(cs, 3)))
        for off, b in ops:
            f.seek(off)
            f.write(b)
            model.write(off, b)
        if len(whole) > 5:
            f.write_zeroes(whole[4], cs)
            model.write_zeroes(whole[4], cs)
            f.discard(whole[5], cs)
            model.discard(whole[5], cs)
    assert_qemu_check(p, "COW of compressed clusters")
    assert_content(p, model, "COW of compressed clusters")
    assert data_in_map(p, ops[0][0], ops[0][0] + 7), "a rewritten compressed cluster is data now"
    assert_ranges_match_qemu(qcowrs_mod, p)


@pytest.mark.parametrize("with_backing", [False, True], ids=["no_backing", "backing"])
def test_cow_of_zero_clusters(builder: ImageBuilder, qcowrs_mod: Any, with_backing: bool) -> None:
    """A partial write into a zero cluster keeps the rest of the cluster zero (not the backing
    file's content, not stale data of a preallocated zero cluster)."""
    size, cs = 4 * MiB, 65536
    kw: dict[str, Any] = {}
    base_data = bytes(size)
    if with_backing:
        builder.create("base.qcow2", size)
        builder.io("base.qcow2", f"write -P 0x77 0 {size}")
        base_data = b"\x77" * size
        kw = {"backing": "base.qcow2", "backing_fmt": "qcow2"}
    p = builder.create("t.qcow2", size, **kw)
    model = GuestModel(base_data, cs)
    builder.io(
        "t.qcow2",
        "write -P 0x11 0 1M",
        f"write -z {cs} {cs}",  # over data, no unmap: ZERO_ALLOC (keeps the host cluster)
        f"write -z -u {3 * cs} {cs}",  # ZERO_PLAIN
        f"write -z {2 * MiB} {2 * cs}",  # over unallocated clusters: ZERO_PLAIN
    )
    model.write(0, b"\x11" * MiB)
    for off, n in ((cs, cs), (3 * cs, cs), (2 * MiB, 2 * cs)):
        model.write_zeroes(off, n)
    assert_content(p, model, "qemu-made zero clusters")
    with qcowrs_mod.QcowFile.open(p, mode="r+b") as f:
        for i, (off, n) in enumerate(
            [(cs + 1000, 10), (3 * cs + cs - 1, 2), (2 * MiB + cs + 5, 500), (2 * MiB, 1)]
        ):
            b = pattern_bytes(n, i)
            f.seek(off)
            f.write(b)
            model.write(off, b)
    assert_qemu_check(p, "COW of zero clusters")
    assert_content(p, model, "COW of zero clusters")
    assert_ranges_match_qemu(qcowrs_mod, p)


@pytest.mark.parametrize(
    ("cs", "rb"), [(65536, 16), (512, 16), (65536, 4)], ids=["64k", "512", "rb4"]
)
def test_cow_of_snapshot_clusters(builder: ImageBuilder, qcowrs_mod: Any, cs: int, rb: int) -> None:
    size = 1 * MiB
    p = builder.create("t.qcow2", size, cluster_size=cs, refcount_bits=rb)
    builder.io("t.qcow2", "write -P 0x11 0 512K", f"write -c -P 0x12 {640 * KiB} {4 * cs}")
    qemu_img("snapshot", "-c", "s1", p)
    snap = raw_bytes(p)
    snap_sha = hashlib.sha256(snap).hexdigest()
    assert snapshot_sha256(p, "s1") == snap_sha
    model = GuestModel(snap, cs)
    with qcowrs_mod.QcowFile.open(p, mode="r+b") as f:
        ops = [
            (2 * cs + 10, pattern_bytes(20, 1)),  # partial write into a shared cluster
            (4 * cs, pattern_bytes(cs, 2)),  # whole shared cluster
            (640 * KiB + 5, pattern_bytes(3, 3)),  # shared compressed cluster
            (700 * KiB, pattern_bytes(10000, 4)),  # unallocated in both
            (5 * cs - 1, pattern_bytes(2, 5)),  # straddles a freshly copied and a shared cluster
        ]
        for off, b in ops:
            f.seek(off)
            f.write(b)
            model.write(off, b)
        f.write_zeroes(8 * cs, 2 * cs)
        model.write_zeroes(8 * cs, 2 * cs)
        f.discard(12 * cs, 3 * cs)
        model.discard(12 * cs, 3 * cs)
    assert_qemu_check(p, "writes over snapshot clusters")
    assert snapshot_sha256(p, "s1") == snap_sha, "the snapshot's content changed"
    assert_content(p, model, "writes over snapshot clusters")
    # QEMU can still revert to the snapshot and the image stays consistent
    qemu_img("snapshot", "-a", "s1", p)
    assert_qemu_check(p, "after qemu-img snapshot -a")
    assert raw_bytes(p) == snap


# --------------------------------------------------------------------------------------------
# reuse of freed clusters, write_zeroes / discard / truncate


def test_discarded_clusters_are_reused(builder: ImageBuilder, qcowrs_mod: Any) -> None:
    size, cs = 64 * MiB, 65536
    p = builder.path("q.qcow2")
    model = GuestModel(bytes(size), cs)
    block = pattern_bytes(MiB, 7)
    with create(qcowrs_mod, p, size) as f:
        for _ in range(32):
            f.write(block)
        model.write(0, block * 32)
        f.flush()
        full = p.stat().st_size
        f.discard(0, 32 * MiB)
        model.discard(0, 32 * MiB)
        f.flush()
        assert_qemu_check(p, "after discard", shared=True)
        before = p.stat().st_size
        assert before <= full
        f.seek(40 * MiB)
        for i in range(16):
            f.write(block[i:] + block[:i])
            model.write(40 * MiB + i * MiB, block[i:] + block[:i])
        f.flush()
        after = p.stat().st_size
    assert after <= before + 4 * cs, (
        f"freed clusters not reused: file {before} -> {after} bytes after rewriting 16 MiB "
        f"into an image with 32 MiB discarded"
    )
    data = assert_qemu_check(p, "after reuse")
    assert data.get("image-end-offset", 0) <= before + 4 * cs
    assert zero_in_map(p, 0, 32 * MiB)
    assert hashlib.sha256(raw_bytes(p)).hexdigest() == model.sha256()


@pytest.mark.parametrize("kind", ["plain", "backing", "extl2", "c512"])
def test_write_zeroes_and_discard(builder: ImageBuilder, qcowrs_mod: Any, kind: str) -> None:
    size = 4 * MiB
    cs = 512 if kind == "c512" else 65536
    base_data = bytes(size)
    kw: dict[str, Any] = {"cluster_size": cs}
    if kind == "backing":
        base_data = semi_random(size, seed=9)
        builder.path("base.raw").write_bytes(base_data)
        kw.update(backing_file="base.raw", backing_format="raw")
    if kind == "extl2":
        kw["extended_l2"] = True
    p = builder.path("q.qcow2")
    model = GuestModel(base_data, cs)
    fill = pattern_bytes(2 * MiB, 1)
    with qcowrs_mod.QcowFile.create(p, size, **kw) as f:
        f.write(fill)  # [0, 2M) data
        model.write(0, fill)
        zero_ops = [
            (cs + 100, 3 * cs),  # unaligned: two whole clusters inside
            (8 * cs, cs),  # exactly one cluster
            (10 * cs + 7, 100),  # inside one cluster
            (3 * MiB - 5, 2 * cs),  # over unallocated clusters (backing content / zeros)
        ]
        for off, n in zero_ops:
            f.write_zeroes(off, n)
            model.write_zeroes(off, n)
        discard_ops = [
            (20 * cs + 1, 4 * cs),  # three whole clusters inside, partial ends unchanged
            (30 * cs, cs),
            (26 * cs + 10, 20),  # partial only: unchanged
            (2 * MiB + 2 * cs, 4 * cs),  # unallocated (backing content gone on v3)
        ]
        for off, n in discard_ops:
            f.discard(off, n)
            model.discard(off, n)
        f.seek(0)
        assert f.read(size) == bytes(model.data), "qcowrs reads before close"
    assert_qemu_check(p, "write_zeroes/discard")
    assert_content(p, model, "write_zeroes/discard")
    assert_ranges_match_qemu(qcowrs_mod, p)
    for off, n in zero_ops + discard_ops:
        s, e = -(-off // cs) * cs, (off + n) // cs * cs
        if e > s:
            assert zero_in_map(p, s, e), f"clusters [{s:#x}, {e:#x}) not zero in qemu-img map"
    # partial-cluster zeroing of data leaves the cluster as data
    assert data_in_map(p, 10 * cs, 11 * cs)
    assert data_in_map(p, 26 * cs, 27 * cs)


@pytest.mark.parametrize(
    ("cs", "old", "new"),
    [
        (512, 1 * MiB, 64 * MiB),
        (65536, 4 * MiB, 5 * MiB + 512),
        (65536, 1 * MiB, 8 << 30),
        (65536, 2 * MiB, 2 * MiB),
    ],
    ids=["c512_l1_grows", "unaligned", "8g", "same"],
)
def test_truncate_grow(builder: ImageBuilder, qcowrs_mod: Any, cs: int, old: int, new: int) -> None:
    p = builder.path("q.qcow2")
    head = pattern_bytes(100000, 1)
    with create(qcowrs_mod, p, old, cluster_size=cs) as f:
        f.write(head)
        f.seek(old - 10)
        f.write(b"T" * 10)
        f.truncate(new)
        assert f.virtual_size == new
        f.seek(new - 5)
        f.write(b"END!!")
        if new - old > 5:
            f.seek(old)
            n = min(4096, new - old - 5)
            assert f.read(n) == bytes(n), "the grown area must read as zeros"
    with qcowrs_mod.QcowFile.open(p, mode="rb") as f:
        assert f.virtual_size == new
    assert qemu_info(p)["virtual-size"] == new
    assert_qemu_check(p, "after truncate")
    if new <= 64 * MiB:
        model = GuestModel(bytes(old), cs)
        model.write(0, head)
        model.write(old - 10, b"T" * 10)
        model.truncate(new)
        model.write(new - 5, b"END!!")
        assert_content(p, model, "after truncate")
    else:
        # sparse check of the interesting ranges only
        with qcowrs_mod.QcowFile.open(p, mode="rb") as f:
            assert f.read(100000) == head
            f.seek(old - 10)
            assert f.read(1000) == b"T" * 10 + bytes(990)
            f.seek(new - 1000)
            assert f.read() == bytes(995) + b"END!!"
        out = qemu_io(p, f"read -P 0x21 {new - 1} 1", f"read -P 0 {old} 1M").stdout
        assert "Pattern verification failed" not in out, out
    # QEMU can keep writing the grown image
    qemu_io(p, f"write -P 0x99 {new - cs} 512")
    assert_qemu_check(p, "qemu write after truncate")


def test_truncate_grow_with_longer_backing_reads_zeroes(
    builder: ImageBuilder, qcowrs_mod: Any
) -> None:
    """Growing an overlay over a longer backing file must not expose the backing file's tail
    (`qemu-img resize` zeroes the new area)."""
    builder.create("base.qcow2", 2 * MiB)
    builder.io("base.qcow2", "write -P 0x11 0 2M")
    p = builder.path("top.qcow2")
    with qcowrs_mod.QcowFile.create(
        p, 1 * MiB, backing_file="base.qcow2", backing_format="qcow2"
    ) as f:
        f.truncate(2 * MiB)
        f.seek(1 * MiB)
        assert f.read(4096) == bytes(4096)
    assert_qemu_check(p, "grown overlay")
    assert raw_bytes(p) == b"\x11" * MiB + bytes(MiB)


# --------------------------------------------------------------------------------------------
# growth of the refcount structure


@pytest.mark.slow
@pytest.mark.parametrize(
    ("rb", "amount"), [(16, 12 * MiB), (64, 5 * MiB), (1, 6 * MiB)], ids=["rb16", "rb64", "rb1"]
)
def test_refcount_structure_grows(
    builder: ImageBuilder, qcowrs_mod: Any, rb: int, amount: int
) -> None:
    """512 B clusters: QEMU's initial reftable (one cluster, 64 refblocks) covers 8 MiB of file
    at 16-bit refcounts and 2 MiB at 64-bit ones; writing more needs new refblocks and a
    relocated, larger reftable."""
    cs, size = 512, 16 * MiB
    rng = random.Random(rb)
    model = GuestModel(bytes(size), cs)
    p = builder.create("t.qcow2", size, cluster_size=cs, refcount_bits=rb)
    h0 = parse_header(p)
    with qcowrs_mod.QcowFile.open(p, mode="r+b") as f:
        # disjoint unaligned chunks in random order: `amount` bytes of distinct clusters
        chunk = 256 * KiB + 100
        slots = list(range(size // chunk))
        rng.shuffle(slots)
        for i, slot in enumerate(slots[: amount // chunk]):
            off = slot * chunk + 50
            b = pattern_bytes(chunk, i)
            f.seek(off)
            f.write(b)
            model.write(off, b)
            if i % 4 == 3:
                f.flush()
    h1 = parse_header(p)
    assert_qemu_check(p, "after growth")
    r = Refcounts(p)
    covered = r.reftable_clusters * cs // 8 * r.rb_entries * cs
    assert covered >= p.stat().st_size
    if rb >= 16:
        assert (h1["refcount_table_offset"], h1["refcount_table_clusters"]) != (
            h0["refcount_table_offset"],
            h0["refcount_table_clusters"],
        ), "the reftable should have been relocated"
    assert hashlib.sha256(raw_bytes(p)).hexdigest() == model.sha256()
    assert qcowrs_read_all(p) == bytes(model.data)


# --------------------------------------------------------------------------------------------
# buffers, flush, lazy refcounts


def test_write_accepts_any_buffer(builder: ImageBuilder, qcowrs_mod: Any) -> None:
    p = builder.path("q.qcow2")
    model = GuestModel(bytes(MiB), 65536)
    arr = array.array("I", range(1000))
    big = bytearray(pattern_bytes(200000, 3))
    with create(qcowrs_mod, p, MiB) as f:
        assert f.write(b"bytes") == 5
        assert f.write(bytearray(b"bytearray")) == 9
        assert f.write(memoryview(big)[1000:150000]) == 149000
        assert f.write(arr) == 4000
        assert f.write(b"") == 0
        assert f.tell() == 5 + 9 + 149000 + 4000
    model.write(0, b"bytes" + b"bytearray" + bytes(big[1000:150000]) + arr.tobytes())
    assert_content(p, model, "buffers")


def test_copyfileobj_and_buffered_writer(
    builder: ImageBuilder, qcowrs_mod: Any, tmp_path: Path
) -> None:
    src = tmp_path / "src.raw"
    data = semi_random(3 * MiB, seed=4)
    src.write_bytes(data)
    p = builder.path("q.qcow2")
    with create(qcowrs_mod, p, 4 * MiB) as f:
        with open(src, "rb") as fh:
            shutil.copyfileobj(fh, f, 100003)
        f.seek(3 * MiB)
        bw = io.BufferedWriter(f, buffer_size=8192)
        for i in range(100):
            bw.write(bytes([i]) * 999)
        bw.flush()
        bw.detach()
    model = GuestModel(bytes(4 * MiB), 65536)
    model.write(0, data)
    model.write(3 * MiB, b"".join(bytes([i]) * 999 for i in range(100)))
    assert_qemu_check(p, "copyfileobj")
    assert_content(p, model, "copyfileobj")


@pytest.mark.parametrize("lazy", [False, True], ids=["plain", "lazy"])
def test_flush_leaves_consistent_image(builder: ImageBuilder, qcowrs_mod: Any, lazy: bool) -> None:
    """After flush() (the file still open) QEMU reads the written data and the image checks
    clean. With lazy refcounts QEMU itself leaves the refcounts stale until close, so there
    the dirty bit may stand instead (QEMU repairs such an image when it opens it)."""
    p = builder.path("q.qcow2")
    model = GuestModel(bytes(4 * MiB), 65536)
    with create(qcowrs_mod, p, 4 * MiB, lazy_refcounts=lazy) as f:
        for i in range(20):
            off = (i * 197_123) % (4 * MiB - 5000)
            b = pattern_bytes(4999, i)
            f.seek(off)
            f.write(b)
            model.write(off, b)
        f.flush()
        assert raw_bytes(p) == bytes(model.data), "data not visible to QEMU after flush()"
        rc, data, err = qemu_check_shared(p)
        if lazy and parse_header(p)["incompatible_features"] & 1:
            assert rc in (0, 2, 3), (rc, data, err)
        else:
            assert rc == 0, (rc, data, err)
            assert not data.get("corruptions"), data
            assert not data.get("leaks"), data
        f.write(b"more")
        model.write(f.tell() - 4, b"more")
    assert parse_header(p)["incompatible_features"] & 1 == 0, "dirty bit set after close"
    assert_qemu_check(p, "after close")
    assert_content(p, model, "after close")


# --------------------------------------------------------------------------------------------
# refusals


def _stale_by_crash(b: ImageBuilder) -> Path:
    p = b.create("s.qcow2", 2 * MiB, lazy_refcounts="on")
    proc = qemu_io(p, "write -P 0x11 1000 100000", "abort", check=False)
    assert proc.returncode != 0
    assert parse_header(p)["incompatible_features"] & 1
    return p


def _stale_by_cluster0(b: ImageBuilder) -> Path:
    p = b.create("s.qcow2", 2 * MiB)
    b.io("s.qcow2", "write -P 0x11 1000 100000")
    Refcounts(p).set(0, 0)
    return p


@pytest.mark.parametrize("make", [_stale_by_crash, _stale_by_cluster0], ids=["dirty", "cluster0"])
def test_write_to_stale_image_requires_rebuild(
    builder: ImageBuilder, qcowrs_mod: Any, make: Any
) -> None:
    p = make(builder)
    before = file_sha256(p)
    content = raw_bytes(p)
    with qcowrs_mod.QcowFile.open(p, mode="r+b") as f:
        assert f.refcounts_stale
        f.seek(500000)
        with pytest.raises(qcowrs_mod.RefcountRebuildRequired):
            f.write(b"x" * 70000)
        with pytest.raises(qcowrs_mod.RefcountRebuildRequired):
            f.write_zeroes(0, 65536)
        with pytest.raises(qcowrs_mod.RefcountRebuildRequired):
            f.discard(0, 65536)
        f.seek(0)
        assert f.read(2 * MiB) == content
    assert file_sha256(p) == before, "a refused write modified the file"
    # with rebuild=True the same write succeeds and leaves a clean image
    model = GuestModel(content, 65536)
    with qcowrs_mod.QcowFile.open(p, mode="r+b", rebuild=True) as f:
        assert not f.refcounts_stale
        f.seek(500000)
        f.write(b"x" * 70000)
        model.write(500000, b"x" * 70000)
    assert_qemu_check(p, "write after rebuild")
    assert_content(p, model, "write after rebuild")


@pytest.mark.parametrize("mode", ["rb", "r+b"])
def test_refcounts_stale_reflects_dirty_bit(
    builder: ImageBuilder, qcowrs_mod: Any, mode: str
) -> None:
    """api.md: the dirty bit means the refcounts are always stale, whatever the open mode."""
    p = builder.create("d.qcow2", 2 * MiB, lazy_refcounts="on")
    builder.io("d.qcow2", "write -P 0x11 0 100000")
    set_header_bits(p, "incompatible_features", 1)
    with qcowrs_mod.QcowFile.open(p, mode=mode) as f:
        assert f.refcounts_stale is True


def test_read_only_refuses_writes(valid_image: Path, qcowrs_mod: Any) -> None:
    before = file_sha256(valid_image)
    with qcowrs_mod.QcowFile.open(valid_image, mode="rb") as f:
        assert f.writable() is False
        for call in (
            lambda: f.write(b"abc"),
            lambda: f.write_zeroes(0, 65536),
            lambda: f.discard(0, 65536),
            lambda: f.truncate(8 * MiB),
        ):
            with pytest.raises(OSError):  # noqa: PT011 (io.UnsupportedOperation or a QcowError)
                call()
        f.flush()  # flushing a read-only file is a no-op, as for io files
    assert file_sha256(valid_image) == before


def test_truncate_shrink_refused(builder: ImageBuilder, qcowrs_mod: Any) -> None:
    p = builder.path("q.qcow2")
    with create(qcowrs_mod, p, 4 * MiB) as f:
        f.write(b"a" * 1000)
        with pytest.raises(qcowrs_mod.QcowError):
            f.truncate(2 * MiB)
        assert f.virtual_size == 4 * MiB
    assert qemu_info(p)["virtual-size"] == 4 * MiB
    assert_qemu_check(p, "refused shrink")


def test_write_past_end_refused(builder: ImageBuilder, qcowrs_mod: Any) -> None:
    size = 1 * MiB
    p = builder.path("q.qcow2")
    with create(qcowrs_mod, p, size) as f:
        f.seek(size - 10)
        with pytest.raises(qcowrs_mod.InvalidOffset):
            f.write(b"y" * 20)
        f.seek(size + 100)
        with pytest.raises(qcowrs_mod.InvalidOffset):
            f.write(b"z")
        with pytest.raises(qcowrs_mod.QcowError):
            f.write_zeroes(size - 512, 1024)
        with pytest.raises(qcowrs_mod.QcowError):
            f.discard(size, 65536)
        f.seek(size - 10)
        assert f.write(b"w" * 10) == 10  # up to the last byte is fine
    m = GuestModel(bytes(size), 65536)
    m.write(size - 10, b"w" * 10)
    assert_qemu_check(p, "refused writes past the end")
    assert_content(p, m, "refused writes past the end")


def test_closed_file_refuses_write(builder: ImageBuilder, qcowrs_mod: Any) -> None:
    p = builder.path("q.qcow2")
    f = create(qcowrs_mod, p, MiB)
    f.close()
    with pytest.raises(ValueError, match="closed"):
        f.write(b"x")


# --------------------------------------------------------------------------------------------
# images with less common features: v2, chains, external data files, persistent bitmaps

TwinOp = tuple[str, int, int, int]  # (kind, offset, length, pattern byte)


def apply_ops(qcowrs: Any, path: Path, ops: list[TwinOp]) -> None:
    with qcowrs.QcowFile.open(path, mode="r+b") as f:
        for kind, off, n, pat in ops:
            if kind == "write":
                f.seek(off)
                assert f.write(bytes([pat]) * n) == n
            elif kind == "zero":
                f.write_zeroes(off, n)
            else:
                f.discard(off, n)


def qemu_io_cmds(ops: list[TwinOp]) -> list[str]:
    return [
        f"write -P {pat:#x} {off} {n}"
        if kind == "write"
        else (f"write -z {off} {n}" if kind == "zero" else f"discard {off} {n}")
        for kind, off, n, pat in ops
    ]


TWIN_OPS: list[TwinOp] = [
    ("write", 100, 100, 0x21),
    ("write", 65536 - 7, 20, 0x22),
    ("write", 5 * 65536, 65536, 0x23),
    ("zero", 65536 + 512, 3 * 65536, 0),
    ("zero", 10 * 65536, 65536, 0),
    ("zero", 12 * 65536 + 4096, 8192, 0),
    ("discard", 20 * 65536, 2 * 65536, 0),
    ("discard", 23 * 65536 + 512, 65536, 0),
    ("write", 21 * 65536 + 1, 3, 0x24),
    ("write", 3 * MiB - 1, 2, 0x25),
]


@pytest.mark.parametrize("kind", ["v2", "v2_backing", "chain", "data_file", "data_file_raw"])
def test_writes_match_qemu_twin(builder: ImageBuilder, qcowrs_mod: Any, kind: str) -> None:
    """The same writes, zero writes and discards by qcowrs and by qemu-io on twin images:
    `qemu-img compare` finds them identical and both check clean."""
    size = 4 * MiB
    images = []
    for name in ("q", "twin"):
        if kind.startswith("v2"):
            backing: dict[str, Any] = {}
            if kind == "v2_backing":
                if not builder.path("base.qcow2").exists():
                    builder.create("base.qcow2", size, compat="0.10")
                    builder.io("base.qcow2", f"write -P 0x11 0 {size}")
                backing = {"backing": "base.qcow2", "backing_fmt": "qcow2"}
            p = builder.create(f"{name}.qcow2", size, compat="0.10", **backing)
            builder.io(f"{name}.qcow2", "write -P 0x31 0 1M", f"write -P 0x32 {20 * 65536} 64K")
        elif kind == "chain":
            if not builder.path("base.qcow2").exists():
                builder.path("base.raw").write_bytes(semi_random(size, seed=21))
                builder.create("mid.qcow2", size, backing="base.raw", backing_fmt="raw")
                builder.io("mid.qcow2", "write -P 0x41 512K 1M", "write -z 3M 128K")
                builder.path("base.qcow2").write_bytes(b"")  # marker: the chain exists
            p = builder.create(f"{name}.qcow2", size, backing="mid.qcow2", backing_fmt="qcow2")
            builder.io(f"{name}.qcow2", "write -P 0x42 1M 100K")
        else:
            opts: dict[str, Any] = {"data_file": builder.path(f"{name}.data")}
            if kind == "data_file_raw":
                opts["data_file_raw"] = "on"
            p = builder.create(f"{name}.qcow2", size, **opts)
            builder.io(f"{name}.qcow2", "write -P 0x51 0 1M")
        images.append(p)
    q, twin = images
    ops = TWIN_OPS
    if kind == "v2_backing":
        # v2 has no zero flag: what a discarded cluster reads over a backing file is not
        # specified (QEMU keeps the data); leave discards out
        ops = [op for op in ops if op[0] != "discard"]
    before = raw_bytes(q)
    try:
        apply_ops(qcowrs_mod, q, ops)
    except qcowrs_mod.UnsupportedFeature:
        # refusing an image kind it cannot write is acceptable, damaging it is not
        assert raw_bytes(q) == before
        assert_qemu_check(q, f"{kind}: refused write")
        pytest.skip(f"qcowrs does not write {kind} images")
    qemu_io(twin, *qemu_io_cmds(ops))
    assert_qemu_check(q, kind)
    a, b = raw_bytes(q), raw_bytes(twin)
    assert a == b, f"{kind}: qcowrs vs qemu-io twin: {first_difference(a, b)}"
    assert qcowrs_read_all(q) == a
    if kind == "data_file_raw":
        # the raw external data file holds the guest disk itself
        assert builder.path("q.data").read_bytes()[:size].ljust(size, b"\0") == a


def _bitmaps(path: Path) -> list[dict[str, Any]]:
    """Minimal reader of the persistent dirty bitmaps (qcow2 spec, 'Bitmaps extension')."""
    h = parse_header(path)
    raw = path.read_bytes()
    off, found = h["header_length"], None
    while off + 8 <= h["cluster_size"]:
        typ, ln = struct.unpack_from(">II", raw, off)
        if typ == 0:
            break
        if typ == 0x23852875:
            found = struct.unpack_from(">IIQQ", raw, off + 8)
        off += 8 + (ln + 7) // 8 * 8
    if found is None:
        return []
    nb, _, _dir_size, dir_off = found
    out = []
    p = dir_off
    for _ in range(nb):
        table_off, table_size, flags = struct.unpack_from(">QII", raw, p)
        _typ, gran_bits, name_size, extra = struct.unpack_from(">BBHI", raw, p + 16)
        name = raw[p + 24 + extra : p + 24 + extra + name_size].decode()
        entries = struct.unpack_from(f">{table_size}Q", raw, table_off)
        out.append(
            {
                "name": name,
                "flags": flags,
                "granularity": 1 << gran_bits,
                "entries": entries,
                "cluster_size": h["cluster_size"],
                "raw": raw,
            }
        )
        p += (24 + extra + name_size + 7) // 8 * 8
    return out


def _bitmap_bit(bm: dict[str, Any], guest_offset: int) -> bool:
    g = guest_offset // bm["granularity"]
    bits_per_cluster = bm["cluster_size"] * 8
    e = bm["entries"][g // bits_per_cluster]
    data_off = e & 0x00FFFFFFFFFFFE00
    if data_off == 0:
        return bool(e & 1)
    i = g % bits_per_cluster
    return bool(bm["raw"][data_off + i // 8] >> (i % 8) & 1)


def test_write_keeps_persistent_bitmaps_honest(builder: ImageBuilder, qcowrs_mod: Any) -> None:
    """A persistent dirty bitmap (incremental backups) must not silently miss qcowrs' writes.
    Acceptable: the write is refused; or qcowrs clears autoclear bit 0 (the spec's protocol
    for a writer without bitmap support: QEMU then drops the bitmaps, and their clusters show
    as leaks); or the bitmaps are flagged in_use; or the written granules are set in them."""
    p = builder.create("b.qcow2", 4 * MiB)
    builder.io("b.qcow2", "write -P 0x11 0 1M")
    qemu_img("bitmap", "--add", p, "bm0")
    builder.io("b.qcow2", "write -P 0x12 2M 64K")
    (bm,) = _bitmaps(p)
    assert _bitmap_bit(bm, 2 * MiB), "test bug: QEMU's own write is not in the bitmap"
    assert not _bitmap_bit(bm, 3 * MiB)
    before = file_sha256(p)
    try:
        with qcowrs_mod.QcowFile.open(p, mode="r+b") as f:
            f.seek(3 * MiB + 5)
            f.write(b"x" * 70000)
    except qcowrs_mod.QcowError:
        assert file_sha256(p) == before, "a refused write modified the image"
        return
    if not parse_header(p)["autoclear_features"] & 1:
        assert_qemu_check(p, "bitmaps dropped", allow_leaks=True)
        return
    assert_qemu_check(p, "bitmaps kept")
    for bm in _bitmaps(p):
        if bm["flags"] & 1:
            continue  # in_use: QEMU treats it as inconsistent
        for g in range(3 * MiB, 3 * MiB + 5 + 70000, bm["granularity"]):
            assert _bitmap_bit(bm, g), (
                f"bitmap {bm['name']} is still marked consistent but misses qcowrs' write at "
                f"{g:#x}: an incremental backup taken from it would lose that data"
            )


@pytest.mark.parametrize(
    ("cs", "size"), [(512, 2 << 40), (65536, 1 << 62)], ids=["c512_2t", "2e62"]
)
def test_create_too_large_refused(
    builder: ImageBuilder, qcowrs_mod: Any, cs: int, size: int
) -> None:
    """Sizes whose L1 table would pass QEMU's 32 MiB limit: qemu-img create refuses them."""
    assert (
        qemu_img(
            "create",
            "-f",
            "qcow2",
            "-o",
            f"cluster_size={cs}",
            builder.path("t.qcow2"),
            str(size),
            check=False,
        ).returncode
        != 0
    )
    p = builder.path("q.qcow2")
    with pytest.raises(qcowrs_mod.QcowError):
        qcowrs_mod.QcowFile.create(p, size, cluster_size=cs)
    assert not p.exists(), "a refused create left a file behind"


def test_truncate_past_l1_limit_refused(builder: ImageBuilder, qcowrs_mod: Any) -> None:
    p = builder.path("q.qcow2")
    with create(qcowrs_mod, p, 1 * MiB, cluster_size=512) as f:
        f.write(b"keep")
        with pytest.raises(qcowrs_mod.QcowError):
            f.truncate(2 << 40)
        assert f.virtual_size == 1 * MiB
    assert qemu_info(p)["virtual-size"] == 1 * MiB
    assert_qemu_check(p, "refused truncate")
    assert raw_bytes(p)[:4] == b"keep"


def test_corrupt_flag_refuses_read_write(builder: ImageBuilder, qcowrs_mod: Any) -> None:
    """QEMU will not open an image flagged corrupt read/write; neither may qcowrs write it."""
    p = builder.create("c.qcow2", 4 * MiB)
    builder.io("c.qcow2", "write -P 0x11 0 64K")
    set_header_bits(p, "incompatible_features", 2)
    before = file_sha256(p)
    with pytest.raises(qcowrs_mod.QcowError):
        with qcowrs_mod.QcowFile.open(p, mode="r+b") as f:
            f.write(b"x")
    with qcowrs_mod.QcowFile.open(p, mode="rb") as f:
        assert f.read(4) == b"\x11" * 4
    assert file_sha256(p) == before


@pytest.mark.parametrize("backing", [False, True], ids=["no_backing", "backing"])
def test_extended_l2_allocates_subclusters_like_qemu(
    tmp_path: Path, qcowrs_mod: Any, backing: bool
) -> None:
    """On extended-L2 images qcowrs allocates only the subclusters a write touches, and zero
    writes set subcluster zero bits: `qemu-img map` of a qcowrs-written image equals that of a
    qemu-io-written twin, range for range (depth 0)."""
    ops = [("write", 5000, 3000), ("write", 70000, 2048), ("zero", 140000, 9000)]
    imgs = {}
    for who in ("qcowrs", "qemu"):
        p = tmp_path / f"{who}.qcow2"
        args = ["create", "-q", "-f", "qcow2", "-o", "extended_l2=on"]
        if backing:
            base = tmp_path / "base.qcow2"
            if not base.exists():
                qemu_img("create", "-q", "-f", "qcow2", str(base), "1M")
                qemu_io(base, "write -P 0x11 0 1M")
            args += ["-b", str(base), "-F", "qcow2"]
        qemu_img(*args, str(p), "1M")
        imgs[who] = p
    with qcowrs_mod.QcowFile.open(imgs["qcowrs"], mode="r+b") as f:
        for kind, off, n in ops:
            if kind == "write":
                f.seek(off)
                f.write(b"\x22" * n)
            else:
                f.write_zeroes(off, n)
    qemu_io(
        imgs["qemu"],
        *[
            f"write -P 0x22 {off} {n}" if kind == "write" else f"write -z {off} {n}"
            for kind, off, n in ops
        ],
    )

    def depth0(p: Path) -> list[tuple[int, int, bool, bool]]:
        return [
            (e["start"], e["length"], e["zero"], e["data"])
            for e in qemu_map(p)
            if e["depth"] == 0 and e["present"]
        ]

    assert depth0(imgs["qcowrs"]) == depth0(imgs["qemu"])
    assert raw_sha256(imgs["qcowrs"]) == raw_sha256(imgs["qemu"])
    assert_qemu_check(imgs["qcowrs"], "subclusters")
