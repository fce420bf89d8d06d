"""``qcowrs compare`` side by side with ``qemu-img compare`` (issue 11 item 7): the same pairs
of images through both, as a user runs them (subprocesses); stdout, exit code and the error
line must be qemu-img's.

Intended differences (asserted where they show):
* qemu-img prints a second line after a usage error ("Try 'qemu-img compare --help'..."), and
  a "qcow2: Image is corrupt..." line before some errors; qcowrs prints one line.
* For a locked or damaged image the error text is qcowrs's own (the exit code is qemu-img's).
* ``-p``: qemu-img prints percentages on stdout; qcowrs draws its progress bar on stderr, only
  when stderr is a terminal.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import ImageBuilder, held_by_qemu_io, poke, qemu_img, qemu_map, requires_qemu

pytestmark = requires_qemu

MiB = 1 << 20
SIZE = 16 * MiB


def qcowrs(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "qcowrs", "compare", *(str(a) for a in args)]
    p = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=120, check=False)
    assert "Traceback" not in p.stderr, p.stderr
    return p


def qemu(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    argv = ["qemu-img", "compare", *(str(a) for a in args)]
    return subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=120, check=False)


def same_as_qemu(d: Path, *args: str | Path, stderr: str = "equal") -> str:
    """Runs both; asserts the same exit code and stdout, and (``stderr``) the same error line
    ("equal"), or only one line of ours ("own"). Returns the stdout."""
    q, o = qemu(*args, cwd=d), qcowrs(*args, cwd=d)
    what = f"compare {' '.join(map(str, args))}"
    assert (o.returncode, o.stdout) == (q.returncode, q.stdout), (
        f"{what}\nqemu-img: {q.returncode} {q.stdout!r} {q.stderr!r}\n"
        f"qcowrs:   {o.returncode} {o.stdout!r} {o.stderr!r}"
    )
    ours = o.stderr.splitlines()
    if not q.stderr:
        assert not o.stderr, f"{what}: {o.stderr!r}"
        return o.stdout
    assert len(ours) == 1, f"{what}: {o.stderr!r}"
    assert ours[0].startswith("qcowrs: "), f"{what}: {o.stderr!r}"
    if stderr == "equal":
        theirs = [ln for ln in q.stderr.splitlines() if ln.startswith("qemu-img: ")]
        assert ours[0].removeprefix("qcowrs: ") == theirs[0].removeprefix("qemu-img: "), (
            f"{what}\nqemu-img: {q.stderr!r}\nqcowrs:   {o.stderr!r}"
        )
    return o.stdout


def both_ways(d: Path, a: str, b: str, *opts: str) -> list[str]:
    """Compares a/b and b/a, without and with -s (plus ``opts``); the outputs."""
    return [same_as_qemu(d, *s, *opts, x, y) for s in ([], ["-s"]) for x, y in ((a, b), (b, a))]


# --------------------------------------------------------------------------------------------
# Images


@pytest.fixture(scope="module")
def imgs(tmp_path_factory: pytest.TempPathFactory) -> ImageBuilder:
    b = ImageBuilder(tmp_path_factory.mktemp("compare"))
    b.create("plain.qcow2", SIZE)
    b.io(
        "plain.qcow2",
        "write -P 0x11 0 1M",
        "write -z 2M 128k",
        "write -P 0x22 3146240 5000",  # 3 MiB + 512: a partly written cluster
        f"write -P 0x33 {SIZE - MiB} 1M",
    )
    b.convert("plain.qcow2", "plain.raw", fmt="raw")
    b.convert("plain.qcow2", "comp.qcow2", compress=True)
    b.convert("plain.qcow2", "extl2.qcow2", extended_l2="on", cluster_size="64k")
    b.convert("plain.qcow2", "c512.qcow2", cluster_size=512)
    b.convert("plain.qcow2", "c2m.qcow2", cluster_size="2M")
    # A chain of 2 and one of 3 (the middle one shorter), and their flattened conversions.
    b.create("base.qcow2", SIZE)
    b.io("base.qcow2", "write -P 0x41 0 4M", f"write -P 0x42 {SIZE - 64 * 1024} 64k")
    b.create("top2.qcow2", SIZE, backing="base.qcow2")
    b.io("top2.qcow2", "write -P 0x43 1M 64k", "write -z 2M 1M", "discard 3M 64k")
    b.convert("top2.qcow2", "flat2.qcow2")
    b.create("mid.qcow2", 8 * MiB, backing="base.qcow2")
    b.io("mid.qcow2", "write -P 0x44 512k 1M")
    b.create("top3.qcow2", SIZE, backing="mid.qcow2")
    b.io("top3.qcow2", "write -P 0x45 1M 4k", "write -z 6M 64k")
    b.convert("top3.qcow2", "flat3.qcow2")
    b.convert("top3.qcow2", "flat3.raw", fmt="raw")
    # A qcow2 over a raw backing file.
    b.create("rawbase.raw", 4 * MiB, fmt="raw")
    b.io("rawbase.raw", "write -P 0x51 64k 1M", fmt="raw")
    b.create("overraw.qcow2", 4 * MiB, backing="rawbase.raw", backing_fmt="raw")
    b.io("overraw.qcow2", "write -P 0x52 512k 4k")
    b.convert("overraw.qcow2", "overraw-flat.qcow2")
    return b


# --------------------------------------------------------------------------------------------
# Identical content, other layouts


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("plain.qcow2", "plain.raw"),
        ("plain.qcow2", "comp.qcow2"),
        ("plain.qcow2", "extl2.qcow2"),
        ("plain.qcow2", "c512.qcow2"),
        ("plain.qcow2", "c2m.qcow2"),
        ("comp.qcow2", "plain.raw"),
        ("top2.qcow2", "flat2.qcow2"),
        ("top3.qcow2", "flat3.qcow2"),
        ("top3.qcow2", "flat3.raw"),
        ("overraw.qcow2", "overraw-flat.qcow2"),
        ("plain.qcow2", "plain.qcow2"),
    ],
)
def test_identical_content_as_qemu(imgs: ImageBuilder, a: str, b: str) -> None:
    outs = both_ways(imgs.root, a, b)
    assert outs[:2] == ["Images are identical.\n"] * 2
    if a == b:
        assert outs == ["Images are identical.\n"] * 4


def test_explicit_formats_and_quiet(imgs: ImageBuilder) -> None:
    d = imgs.root
    assert same_as_qemu(d, "-f", "qcow2", "-F", "raw", "plain.qcow2", "plain.raw")
    # The qcow2 file read as raw bytes differs from its guest content.
    assert same_as_qemu(d, "-f", "raw", "plain.qcow2", "plain.raw").startswith("Content mismatch")
    assert same_as_qemu(d, "--a-format=raw", "--b-format=raw", "plain.raw", "plain.raw")
    assert same_as_qemu(d, "-q", "plain.qcow2", "comp.qcow2") == ""
    assert same_as_qemu(d, "-q", "-s", "plain.qcow2", "plain.raw") == ""
    assert same_as_qemu(d, "-T", "none", "-U", "plain.qcow2", "plain.raw")
    # -p: qemu-img writes its percentages to stdout; qcowrs draws a bar on stderr, and only on
    # a terminal (as every qcowrs command), so the output stays the same.
    p = qcowrs("-p", "plain.qcow2", "plain.raw", cwd=d)
    assert (p.returncode, p.stdout, p.stderr) == (0, "Images are identical.\n", "")


# --------------------------------------------------------------------------------------------
# One byte differs


OFFSETS = [
    0,
    1000,  # inside data
    MiB - 1,  # last byte of a data run
    2 * MiB + 4097,  # in a zero cluster
    3 * MiB + 100,  # in the unwritten head of a partly written cluster
    3 * MiB + 5511,  # just past the data of that cluster
    8 * MiB + 12345,  # unallocated everywhere
    SIZE - 1,  # the last byte
]


@pytest.mark.parametrize("offset", OFFSETS)
def test_one_byte_difference_as_qemu(imgs: ImageBuilder, tmp_path: Path, offset: int) -> None:
    for src, name in (("plain.qcow2", "d.qcow2"), ("plain.raw", "d.raw")):
        imgs.copy(imgs.path(src), name)
        fmt = "raw" if name.endswith(".raw") else "qcow2"
        imgs.io(name, f"write -P 0xee {offset} 1", fmt=fmt)
    d = imgs.root
    try:
        for other in ("plain.qcow2", "plain.raw", "comp.qcow2", "c512.qcow2", "extl2.qcow2"):
            for changed in ("d.qcow2", "d.raw"):
                outs = both_ways(d, other, changed)
                assert outs[0] == f"Content mismatch at offset {offset // 512 * 512}!\n"
    finally:
        os.unlink(imgs.path("d.qcow2"))
        os.unlink(imgs.path("d.raw"))


def test_first_of_several_differences(imgs: ImageBuilder) -> None:
    imgs.copy(imgs.path("plain.qcow2"), "several.qcow2")
    imgs.io("several.qcow2", "write -P 1 15M 1", "write -P 2 9M 3", "write -P 3 600k 1")
    try:
        outs = both_ways(imgs.root, "plain.qcow2", "several.qcow2")
        assert outs[0] == f"Content mismatch at offset {600 * 1024}!\n"
    finally:
        os.unlink(imgs.path("several.qcow2"))


# --------------------------------------------------------------------------------------------
# Sizes


def test_sizes_differ_as_qemu(imgs: ImageBuilder) -> None:
    d = imgs.root
    imgs.copy(imgs.path("plain.qcow2"), "longer.qcow2")
    qemu_img("resize", "-q", str(imgs.path("longer.qcow2")), "+1M")
    imgs.copy(imgs.path("plain.raw"), "longer.raw")
    os.truncate(imgs.path("longer.raw"), SIZE + 3 * MiB)
    try:
        outs = both_ways(d, "plain.qcow2", "longer.qcow2")
        assert outs[0] == "Warning: Image size mismatch!\nImages are identical.\n"
        assert outs[2] == "Strict mode: Image size mismatch!\n"
        both_ways(d, "longer.qcow2", "longer.raw")
        # Data in the tail of the longer image, zeros written as data there too.
        imgs.io("longer.qcow2", f"write -P 0 {SIZE} 64k", f"write -P 9 {SIZE + 70000} 1")
        imgs.io("longer.raw", f"write -P 7 {SIZE + 2 * MiB + 1} 1", fmt="raw")
        outs = both_ways(d, "plain.raw", "longer.qcow2")
        assert outs[
            0
        ] == f"Warning: Image size mismatch!\nContent mismatch at offset {69632}!\n".replace(
            "69632", str(SIZE + 70000 // 512 * 512)
        )
        both_ways(d, "plain.qcow2", "longer.raw")
        both_ways(d, "longer.qcow2", "longer.raw")
    finally:
        os.unlink(imgs.path("longer.qcow2"))
        os.unlink(imgs.path("longer.raw"))


def test_raw_file_of_odd_length(tmp_path: Path) -> None:
    """A raw file of 1000 bytes is 1024 long for QEMU; its last step starts at byte 1000,
    so a difference at 1010 is reported at 1000 (not at the sector, 512)."""
    b = ImageBuilder(tmp_path)
    b.path("odd.raw").write_bytes(b"\x01" * 1000)
    b.create("odd.qcow2", 1024)
    b.io("odd.qcow2", "write -P 1 0 1000")
    assert both_ways(tmp_path, "odd.raw", "odd.qcow2")[0] == "Images are identical.\n"
    b.io("odd.qcow2", "write -P 9 1010 1")
    assert both_ways(tmp_path, "odd.raw", "odd.qcow2")[0] == "Content mismatch at offset 1000!\n"


# --------------------------------------------------------------------------------------------
# Strict mode: block status


def test_strict_allocation_mismatch(imgs: ImageBuilder) -> None:
    d = imgs.root
    imgs.copy(imgs.path("plain.qcow2"), "zeros-as-data.qcow2")
    imgs.io("zeros-as-data.qcow2", "write -P 0 5M 64k")
    try:
        outs = both_ways(d, "plain.qcow2", "zeros-as-data.qcow2")
        assert outs[0] == "Images are identical.\n"
        assert outs[2] == f"Strict mode: Offset {5 * MiB} block status mismatch!\n"
    finally:
        os.unlink(imgs.path("zeros-as-data.qcow2"))


def test_strict_sees_the_end_of_each_answer(tmp_path: Path) -> None:
    """qemu-img compares every flag, EOF included: identical empty images whose L2 tables
    span other ranges (cluster sizes), or whose answers are cut at INT_MAX bytes, differ.
    (qcowrs computes these stretches of empty L1 entries rather than walking them.)"""
    b = ImageBuilder(tmp_path)
    b.create("e64k.qcow2", "1G")
    b.create("e2m.qcow2", "1G", cluster_size="2M")
    assert (
        both_ways(tmp_path, "e64k.qcow2", "e2m.qcow2")[2:]
        == ["Strict mode: Offset 0 block status mismatch!\n"] * 2
    )
    b.create("f64k.qcow2", "5G")
    b.create("f2m.qcow2", "5G", cluster_size="2M")
    assert both_ways(tmp_path, "f64k.qcow2", "f2m.qcow2")[2] == (
        f"Strict mode: Offset {3584 * MiB} block status mismatch!\n"
    )
    # Answers of INT_MAX bytes: the offset is a multiple of 2^31 - 1, not of a sector.
    b.create("g1m.qcow2", "129G", cluster_size="1M")
    b.create("g2m.qcow2", "129G", cluster_size="2M")
    b.create("g512k.qcow2", "129G", cluster_size="512k")
    assert both_ways(tmp_path, "g1m.qcow2", "g2m.qcow2")[2] == (
        f"Strict mode: Offset {64 * 0x7FFF_FFFF} block status mismatch!\n"
    )
    both_ways(tmp_path, "g512k.qcow2", "g2m.qcow2")
    both_ways(tmp_path, "g512k.qcow2", "g1m.qcow2")


def test_strict_with_chains_and_preallocation(imgs: ImageBuilder, tmp_path: Path) -> None:
    both_ways(imgs.root, "top3.qcow2", "top2.qcow2")
    both_ways(imgs.root, "overraw.qcow2", "rawbase.raw")
    b = ImageBuilder(tmp_path)
    b.create("meta.qcow2", 4 * MiB, preallocation="metadata")
    b.io("meta.qcow2", "write -P 3 1M 4k")
    b.create("empty.qcow2", 4 * MiB)
    b.io("empty.qcow2", "write -P 3 1M 4k")
    both_ways(tmp_path, "meta.qcow2", "empty.qcow2")


# --------------------------------------------------------------------------------------------
# Errors


ERRORS = [
    ["missing.qcow2", "plain.qcow2"],
    ["plain.qcow2", "missing.qcow2"],
    ["-f", "foo", "missing.qcow2", "plain.raw"],
    ["-F", "foo", "plain.qcow2", "plain.raw"],
    ["-f", "qcow2", "plain.raw", "plain.qcow2"],
    ["-F", "qcow2", "plain.qcow2", "plain.raw"],
    ["-T", "bogus", "plain.qcow2", "plain.raw"],
    ["plain.qcow2"],
    [],
]


@pytest.mark.parametrize("argv", ERRORS, ids=[" ".join(a) or "none" for a in ERRORS])
def test_errors_as_qemu(imgs: ImageBuilder, argv: list[str]) -> None:
    same_as_qemu(imgs.root, *argv)


def test_locked_image_and_force_share(imgs: ImageBuilder) -> None:
    imgs.copy(imgs.path("plain.qcow2"), "held.qcow2")
    try:
        with held_by_qemu_io(imgs.path("held.qcow2")):
            same_as_qemu(imgs.root, "held.qcow2", "plain.raw", stderr="own")
            assert same_as_qemu(imgs.root, "-U", "held.qcow2", "plain.raw")
    finally:
        os.unlink(imgs.path("held.qcow2"))


def test_damaged_images_fail_with_qemus_exit_codes(tmp_path: Path) -> None:
    b = ImageBuilder(tmp_path)
    b.create("ok.raw", 4 * MiB, fmt="raw")
    b.io("ok.raw", "write -P 1 0 128k", fmt="raw")
    # An L2 entry whose data offset is not cluster aligned: no block status (3).
    b.create("l2.qcow2", 4 * MiB)
    b.io("l2.qcow2", "write -P 1 0 128k")
    host = qemu_map(b.path("l2.qcow2"))[0]["offset"]
    l2 = host - 65536  # qemu 10: header, reftable, refblock, L1, L2, data
    poke(b.path("l2.qcow2"), l2 + 8, ">Q", (1 << 63) | (host + 65536 + 512))
    same_as_qemu(tmp_path, "l2.qcow2", "ok.raw", stderr="own")
    # A compressed cluster that does not inflate: a read error (4).
    b.create("comp.qcow2", 4 * MiB)
    b.io("comp.qcow2", "write -c -P 1 0 64k")
    with open(b.path("comp.qcow2"), "rb") as fh:
        fh.seek(l2)
        entry = int.from_bytes(fh.read(8), "big")
    poke(b.path("comp.qcow2"), entry & ((1 << 54) - 1), "", b"\xff" * 64)
    same_as_qemu(tmp_path, "comp.qcow2", "ok.raw", stderr="own")


# --------------------------------------------------------------------------------------------
# Work proportional to the data


def test_sparse_1tib_images_compare_in_seconds(tmp_path: Path) -> None:
    b = ImageBuilder(tmp_path)
    b.create("big.qcow2", "1T")
    b.io("big.qcow2", "write -P 5 0 2M", "write -P 6 500G 3M", "write -P 7 1023G 1M")
    b.convert("big.qcow2", "big.raw", fmt="raw")
    b.copy(b.path("big.qcow2"), "big2.qcow2")
    b.io("big2.qcow2", f"write -P 8 {(1 << 40) - 1} 1")
    for pair, want in (
        (("big.qcow2", "big.raw"), "Images are identical.\n"),
        (("big.raw", "big2.qcow2"), f"Content mismatch at offset {(1 << 40) - 512}!\n"),
    ):
        t = time.monotonic()
        p = qcowrs(*pair, cwd=tmp_path)
        assert time.monotonic() - t < 5, "compare read the unallocated parts"
        assert (p.returncode, p.stdout) == (want != "Images are identical.\n", want)
    same_as_qemu(tmp_path, "-s", "big.qcow2", "big2.qcow2")


# --------------------------------------------------------------------------------------------
# The Python API


def test_python_api(imgs: ImageBuilder, qcowrs_mod: Any) -> None:
    d = imgs.root
    r = qcowrs_mod.compare(d / "plain.qcow2", str(d / "plain.raw"))
    assert isinstance(r, qcowrs_mod.CompareResult)
    assert (r.identical, r.first_difference, r.reason) == (True, None, None)
    assert (r.size_a, r.size_b) == (SIZE, SIZE)
    r = qcowrs_mod.compare(d / "plain.qcow2", d / "plain.raw", strict=True)
    assert (r.identical, r.reason) == (False, "block-status")
    assert r.first_difference == int(
        qemu(*["-s", "plain.qcow2", "plain.raw"], cwd=d).stdout.split()[3]
    )
    r = qcowrs_mod.compare(d / "plain.qcow2", d / "top2.qcow2", format_b="qcow2", force_share=True)
    assert (r.identical, r.reason, r.first_difference) == (False, "content", 0)
    r = qcowrs_mod.compare(d / "base.qcow2", d / "mid.qcow2", strict=True)
    assert (r.identical, r.reason, r.first_difference) == (False, "size", None)
    assert "first_difference=None" in repr(r)
    calls: list[tuple[int, int]] = []
    r = qcowrs_mod.compare(d / "plain.qcow2", d / "comp.qcow2", progress=lambda *a: calls.append(a))
    assert r.identical
    assert calls[-1] == (SIZE, SIZE)
    assert all(done <= total == SIZE for done, total in calls)


def test_python_api_errors(imgs: ImageBuilder, qcowrs_mod: Any) -> None:
    d = imgs.root
    with pytest.raises(OSError, match="Could not open") as e:
        qcowrs_mod.compare(d / "plain.qcow2", d / "missing")
    assert isinstance(e.value, qcowrs_mod.QcowError)
    assert getattr(e.value, "compare_stage", None) == "open"
    with pytest.raises(ValueError, match="Unknown driver 'vmdk2'"):
        qcowrs_mod.compare(d / "plain.qcow2", d / "plain.raw", format_b="vmdk2")

    class Stop(Exception):
        pass

    def stop(done: int, total: int) -> None:
        raise Stop

    with pytest.raises(Stop):
        qcowrs_mod.compare(d / "plain.qcow2", d / "plain.raw", progress=stop)


# --------------------------------------------------------------------------------------------
# Random pairs


def _random_ops(r: random.Random, size: int, cluster: int) -> list[str]:
    ops = []
    for _ in range(r.randint(1, 6)):
        unit = r.choice([512, 4096, cluster, 65536])
        off = r.randrange(max(1, size // unit)) * unit
        n = min(size - off, unit * r.randint(1, 8))
        kind = r.choice(["write", "write", "zero", "discard", "byte"])
        if kind == "write":
            ops.append(f"write -P {r.randint(1, 255)} {off} {n}")
        elif kind == "zero":
            ops.append(f"write -z {off} {n}")
        elif kind == "discard":
            ops.append(f"discard {off} {n}")
        else:
            ops.append(f"write -P {r.randint(1, 255)} {r.randrange(size)} 1")
    return ops


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(6))
def test_random_pairs_as_qemu(tmp_path: Path, seed: int) -> None:
    """Random images (cluster sizes, extended L2, chains, compressed and raw conversions,
    sparse copies, resizes, random writes) compared with qemu-img, both ways, strict or not."""
    r = random.Random(seed)
    b = ImageBuilder(tmp_path)
    size = r.choice([MiB, 3 * MiB, 4 * MiB + 512, 24 * MiB])
    cluster = r.choice([512, 4096, 65536, 2 * MiB])
    opts: dict[str, Any] = {"cluster_size": cluster}
    if cluster >= 16384 and r.random() < 0.5:
        opts["extended_l2"] = "on"
    b.create("a.qcow2", size, **opts)
    b.io("a.qcow2", *_random_ops(r, size, cluster))
    a = "a.qcow2"
    if r.random() < 0.5:
        b.create("a2.qcow2", r.choice([size, size // 2, size + 65536]), backing=a)
        b.io("a2.qcow2", *_random_ops(r, size // 2, cluster))
        a = "a2.qcow2"
    kind = r.choice(["raw", "qcow2", "compressed", "copy"])
    if kind == "copy":
        subprocess.run(["cp", "--sparse=always", b.path(a), b.path("b.qcow2")], check=True)
        other = "b.qcow2"
    else:
        other = "b.raw" if kind == "raw" else "b.qcow2"
        b.convert(
            a,
            other,
            fmt="raw" if kind == "raw" else "qcow2",
            compress=kind == "compressed",
            **({} if kind == "raw" else {"cluster_size": r.choice([512, 65536, 2 * MiB])}),
        )
    fmt = "raw" if other.endswith(".raw") else "qcow2"
    if r.random() < 0.7:
        ops = [o for o in _random_ops(r, size, 65536) if fmt == "qcow2" or "discard" not in o]
        b.io(other, *ops, fmt=fmt)
    if fmt == "qcow2" and r.random() < 0.3:
        qemu_img("resize", "-q", str(b.path(other)), "+64k")
    both_ways(tmp_path, a, other)
