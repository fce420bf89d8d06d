"""`qcowrs.measure` and `qcowrs measure` side by side with `qemu-img measure` (issue 11, item 6).

Every number is compared with qemu-img's, in JSON (the API's dict and the command's text) and
in the human layout: empty disks of many sizes under every combination of the options that
change the numbers, and images of every kind as sources (raw, qcow2 plain, compressed, with
zero clusters, extended L2, chains, persistent bitmaps, internal snapshots, preallocation, data
files, 512-byte and 2 MiB clusters). Beyond equality: an image converted from a source fits in
the required size (`qemu-img convert` and `qcowrs.convert`), a fully preallocated one is
exactly the fully allocated size.

Intended differences, each asserted where it shows: qemu-img's errors of several lines are one
line here ("Invalid options for file format 'qcow2': Invalid parameter 'foo'"); formats other
than raw and qcow2 are "Unknown file format"; a missing source is "Could not open 'x': No such
file or directory" once; a missing snapshot (-l) is named in "Can't find snapshot 'x'".
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import ImageBuilder, held_by_qemu_io, qemu_img, requires_qemu

pytestmark = requires_qemu

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


def qemu_measure(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    argv = ["qemu-img", "measure", *(str(a) for a in args)]
    return subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=120, check=False)


def qemu_error(p: subprocess.CompletedProcess[str]) -> list[str]:
    """qemu-img's error lines without the program name (the hint lines of a bad size dropped)."""
    return [
        ln.removeprefix("qemu-img: ") for ln in p.stderr.splitlines() if ln.startswith("qemu-img: ")
    ]


def cli_convert(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> int:
    from qcowrs.cli._main import main

    rc = main(["convert", *(str(a) for a in argv)])
    capsys.readouterr()
    return rc


def cli(capsys: pytest.CaptureFixture[str], *argv: str | Path | int) -> tuple[int, str, str]:
    from qcowrs.cli._main import main

    rc = main(["measure", *(str(a) for a in argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def options_of(argv: list[str]) -> tuple[str, dict[str, Any]]:
    """`-O FMT -o k=v,...` as the API's output_format and options (typed as qemu-img types them)."""
    fmt = "raw"
    opts: dict[str, Any] = {}
    it = iter(argv)
    for a in it:
        if a == "-O":
            fmt = next(it)
        elif a == "-o":
            for item in next(it).split(","):
                k, _, v = item.partition("=")
                if k in ("cluster_size", "refcount_bits", "size"):
                    opts[k] = (
                        int(v[:-1]) * (MiB if v.endswith("M") else KiB)
                        if v[-1:] in "kM"
                        else int(v)
                    )
                elif k == "extended_l2":
                    opts[k] = v == "on"
                else:
                    opts[k] = v
    return fmt, opts


# --------------------------------------------------------------------------------------------
# --size: every size under every combination


SIZES = [0, 1, 512, 1000, 65537, 123456789, GiB, TiB, 16 * TiB]
CLUSTERS = [512, 4 * KiB, 64 * KiB, 2 * MiB]
REFCOUNT_BITS = [1, 16, 64]
PREALLOC = ["off", "metadata", "falloc", "full"]


@pytest.mark.parametrize("cluster_size", CLUSTERS)
@pytest.mark.parametrize("compat", ["0.10", "1.1"])
@pytest.mark.parametrize("extended_l2", ["off", "on"])
def test_size_grid_equals_qemu(
    qcowrs_mod: Any,
    capsys: pytest.CaptureFixture[str],
    cluster_size: int,
    compat: str,
    extended_l2: str,
) -> None:
    checked = errors = 0
    for size, bits, prealloc in itertools.product(SIZES, REFCOUNT_BITS, PREALLOC):
        o = (
            f"cluster_size={cluster_size},compat={compat},extended_l2={extended_l2},"
            f"refcount_bits={bits},preallocation={prealloc}"
        )
        what = f"--size {size} -o {o}"
        q = qemu_measure("-O", "qcow2", "--size", str(size), "-o", o, "--output=json")
        options = {
            "compat": compat,
            "extended_l2": extended_l2 == "on",
            "refcount_bits": bits,
            "preallocation": prealloc,
        }
        if q.returncode != 0:
            # The API raises with qemu-img's message; the command prints it in one line.
            (msg,) = qemu_error(q)
            with pytest.raises((ValueError, OSError)) as exc:
                qcowrs_mod.measure(size, cluster_size=cluster_size, options=options)
            assert str(exc.value) == msg, what
            rc, out, err = cli(capsys, "-O", "qcow2", "--size", size, "-o", o)
            assert (rc, out, err) == (1, "", f"qcowrs: {msg}\n"), what
            errors += 1
            continue
        want = json.loads(q.stdout)
        got = qcowrs_mod.measure(size, cluster_size=cluster_size, options=options)
        assert got == want, what
        assert list(got) == list(want), what  # qemu-img's key order
        rc, out, _ = cli(capsys, "-O", "qcow2", "--size", size, "-o", o, "--output=json")
        assert (rc, out) == (0, q.stdout), what
        if bits == 16:
            qh = qemu_measure("-O", "qcow2", "--size", str(size), "-o", o)
            assert cli(capsys, "-O", "qcow2", "--size", size, "-o", o) == (0, qh.stdout, ""), what
        checked += 1
    # Every combination ran, and both kinds of outcome were seen where they must be.
    assert checked + errors == len(SIZES) * len(REFCOUNT_BITS) * len(PREALLOC)
    if cluster_size == 512 or (compat == "0.10"):
        assert errors > 0


@pytest.mark.parametrize("size", [0, 1, 511, 512, 1000, GiB + 1, (1 << 63) - 512])
def test_size_raw_target_equals_qemu(
    qcowrs_mod: Any, capsys: pytest.CaptureFixture[str], size: int
) -> None:
    q = qemu_measure("--size", str(size), "--output=json")
    assert json.loads(q.stdout) == qcowrs_mod.measure(size, output_format="raw")
    assert cli(capsys, "--size", size, "--output=json") == (0, q.stdout, "")
    qh = qemu_measure("--size", str(size))
    assert cli(capsys, "--size", size) == (0, qh.stdout, "")


def test_size_past_int64_is_not_negative(
    qcowrs_mod: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """An intended difference: the largest size rounds up to 2^63 bytes, which qemu-img's JSON
    prints as a negative number (its int64 wraps; its human output is right)."""
    size = (1 << 63) - 1
    q = qemu_measure("--size", str(size), "--output=json")
    assert json.loads(q.stdout) == {"required": -(1 << 63), "fully-allocated": -(1 << 63)}
    want = {"required": 1 << 63, "fully-allocated": 1 << 63}
    assert qcowrs_mod.measure(size, output_format="raw") == want
    assert cli(capsys, "--size", size, "--output=json") == (
        0,
        json.dumps(want, indent=4) + "\n",
        "",
    )
    qh = qemu_measure("--size", str(size))
    assert cli(capsys, "--size", size) == (0, qh.stdout, "")


@pytest.mark.parametrize(
    "extra",
    [
        # Options measure accepts and ignores, or checks differently from create.
        "lazy_refcounts=on,compat=0.10",
        "compression_type=zstd,compat=0.10",
        "compression_type=lz4",
        "data_file=x.raw,data_file_raw=on",
        "backing_file=b.qcow2,backing_fmt=foo",
        "encryption=on",
        "encrypt.format=aes",
        "nocow=on,extent_size_hint=1M",
        "size=5G",
        "cluster_size=64k,cluster_size=512",
        "extended_l2,cluster_size=16k",
        "cluster_size=0x10000",
        "preallocation=metadata,backing_file=x",
    ],
)
def test_size_options_equal_qemu(capsys: pytest.CaptureFixture[str], extra: str) -> None:
    for fmt in ("--output=json", "--output=human"):
        q = qemu_measure("-O", "qcow2", "--size", "1G", "-o", extra, fmt)
        assert q.returncode == 0, q.stderr
        assert cli(capsys, "-O", "qcow2", "--size", "1G", "-o", extra, fmt) == (0, q.stdout, "")


# --------------------------------------------------------------------------------------------
# Sources


def _set_bitmap_in_use(path: Path) -> None:
    """Sets the in_use flag of the first bitmap (as a crash of a writer leaves it)."""
    with open(path, "r+b") as fh:
        head = fh.read(4096)
        off = struct.unpack(">I", head[100:104])[0]
        while True:
            kind, length = struct.unpack(">II", head[off : off + 8])
            if kind == 0:
                raise AssertionError("no bitmaps extension")
            if kind == 0x23852875:
                directory = struct.unpack(">Q", head[off + 24 : off + 32])[0]
                fh.seek(directory + 12)
                flags = struct.unpack(">I", fh.read(4))[0]
                fh.seek(directory + 12)
                fh.write(struct.pack(">I", flags | 1))
                return
            off += 8 + (length + 7) // 8 * 8


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    b = ImageBuilder(tmp_path_factory.mktemp("measure"))
    out: dict[str, Path] = {}

    p = b.path("sparse.raw")
    with open(p, "wb") as fh:
        fh.truncate(10 * MiB)
        fh.seek(5 * MiB)
        fh.write(b"y" * 10)
        fh.seek(9 * MiB)
        fh.write(b"z" * 70000)
    out["raw-sparse"] = p
    out["raw-created"] = b.create("created.raw", "100000", fmt="raw")
    p = b.path("odd.raw")
    p.write_bytes(b"x" * 1000)
    out["raw-odd-length"] = p
    p = b.path("tail.raw")
    with open(p, "wb") as fh:
        fh.truncate(3 * MiB + 700)
        fh.seek(3 * MiB + 100)
        fh.write(b"t" * 600)
    out["raw-data-at-end"] = p

    # qemu-iotests 178's image: data at 512, 64k and 128M (three clusters).
    out["plain"] = b.create("plain.qcow2", "1G")
    b.io("plain.qcow2", "write 512 512", "write 64k 64k", "write 128M 63k")
    out["plain-512"] = b.create("c512.qcow2", "8M", cluster_size=512)
    b.io("c512.qcow2", "write -P 1 0 1000", "write -P 2 1M 70000", "write -P 3 7M 1")
    out["plain-2M"] = b.create("c2m.qcow2", "64M", cluster_size="2M")
    b.io("c2m.qcow2", "write -P 1 0 4k", "write -P 2 5M 3M", "write -P 3 63M 1M")
    out["odd-size"] = b.create("oddsize.qcow2", "1000000")
    b.io("oddsize.qcow2", "write -P 9 999000 1000")

    data = b.path("pattern.raw")
    data.write_bytes(bytes(range(256)) * (4 * MiB // 256) + bytes(2 * MiB) + b"\x01" * MiB)
    out["compressed"] = b.convert("pattern.raw", "comp.qcow2", src_fmt="raw", compress=True)
    out["compressed-2M"] = b.convert(
        "pattern.raw", "comp2m.qcow2", src_fmt="raw", compress=True, cluster_size="2M"
    )
    out["compressed-512"] = b.convert(
        "pattern.raw", "comp512.qcow2", src_fmt="raw", compress=True, cluster_size=512
    )

    out["zero-clusters"] = b.create("zero.qcow2", "16M")
    b.io("zero.qcow2", "write -P 5 0 4M", "write -z 1M 1M", "write -z -u 3M 512k", "write -z 8M 1M")

    b.create("extbase.qcow2", "16M")
    b.io("extbase.qcow2", "write -P 6 0 16M")
    out["extended-l2-overlay"] = b.create(
        "extover.qcow2", "16M", backing="extbase.qcow2", extended_l2="on", cluster_size="32k"
    )
    b.io(
        "extover.qcow2", "write -P 7 1k 1k", "write -z 64k 2k", "write -z 5M 1M", "write -P 7 9M 3k"
    )
    out["extended-l2"] = b.create("extl2.qcow2", "16M", extended_l2="on")
    b.io(
        "extl2.qcow2",
        "write -P 4 3000 5000",
        "write -z 1M 8k",
        "write -P 4 2M 2k",
        "write -P 4 70k 1",
    )

    b.create("base2.qcow2", "32M")
    b.io("base2.qcow2", "write -P 1 0 4M", "write -P 1 20M 1M")
    out["chain-2"] = b.create("top2.qcow2", "32M", backing="base2.qcow2")
    b.io("top2.qcow2", "write -P 2 1M 1M", "write -z 2M 1M", "write -P 2 30M 4k")

    b.create("base3.qcow2", "16M", cluster_size=4096)
    b.io("base3.qcow2", "write -P 1 0 8M", "write -P 1 15M 1M")
    b.create("mid3.qcow2", "24M", backing="base3.qcow2")
    b.io("mid3.qcow2", "write -P 2 4M 64k", "write -z 6M 1M", "write -P 2 20M 100k")
    out["chain-3"] = b.create("top3.qcow2", "64M", backing="mid3.qcow2", cluster_size="2M")
    b.io("top3.qcow2", "write -P 3 0 512", "write -z 7M 512k", "write -P 3 40M 1")

    out["bitmaps"] = b.create("bitmaps.qcow2", "2G")
    b.io("bitmaps.qcow2", "write -P 7 0 1M")
    for args in (
        ["-g", "512", "b1"],
        ["a-much-longer-bitmap-name-than-the-first"],
        ["-g", "2M", "ünïcödé"],
    ):
        qemu_img("bitmap", "--add", *args[:-1], str(out["bitmaps"]), args[-1])
    qemu_img("bitmap", "--disable", str(out["bitmaps"]), "b1")
    out["bitmap-in-use"] = b.copy(out["bitmaps"], "inuse.qcow2")
    _set_bitmap_in_use(out["bitmap-in-use"])
    # Bitmaps a program without bitmap support left behind (autoclear bit clear): QEMU warns
    # and ignores them.
    out["bitmaps-stale"] = b.copy(out["bitmaps"], "stale.qcow2")
    with open(out["bitmaps-stale"], "r+b") as fh:
        fh.seek(88)
        autoclear = struct.unpack(">Q", fh.read(8))[0]
        fh.seek(88)
        fh.write(struct.pack(">Q", autoclear & ~1))
    # A bitmap in the backing file only: not the source's own.
    b.create("bmbase.qcow2", "64M")
    qemu_img("bitmap", "--add", str(b.path("bmbase.qcow2")), "below")
    out["bitmap-below"] = b.create("bmtop.qcow2", "64M", backing="bmbase.qcow2")

    out["snapshots"] = b.create("snaps.qcow2", "16M")
    b.io("snaps.qcow2", "write -P 1 0 2M")
    qemu_img("snapshot", "-c", "first", str(out["snapshots"]))
    b.io("snaps.qcow2", "write -P 2 1M 64k", "write -z 0 512k")
    qemu_img("snapshot", "-c", "second", str(out["snapshots"]))
    b.io("snaps.qcow2", "write -P 3 10M 1M")

    out["prealloc-metadata"] = b.create("pmeta.qcow2", "64M", preallocation="metadata")
    b.io("pmeta.qcow2", "write -P 1 1M 1M", "write -P 1 10M 4k")
    out["prealloc-falloc"] = b.create("pfalloc.qcow2", "8M", preallocation="falloc")
    out["v2"] = b.create("v2.qcow2", "8M", compat="0.10")
    b.io("v2.qcow2", "write -P 1 0 100k")
    b.create("rawbase.raw", "8M", fmt="raw")
    b.io("rawbase.raw", "write -P 1 2M 1M", fmt="raw")
    out["raw-backing"] = b.create("overraw.qcow2", "12M", backing="rawbase.raw", backing_fmt="raw")
    b.io("overraw.qcow2", "write -P 2 0 64k", "write -z 2M 64k")
    out["data-file"] = b.create("df.qcow2", "8M", data_file=str(b.path("df.data")))
    b.io("df.qcow2", "write -P 1 1M 1M")
    out["data-file-raw"] = b.create(
        "dfr.qcow2", "8M", data_file=str(b.path("dfr.data")), data_file_raw="on"
    )
    b.io("dfr.qcow2", "write -P 1 1M 64k")
    out["empty"] = b.create("empty.qcow2", "0")
    return out


TARGETS = [
    ["-O", "raw"],
    ["-O", "qcow2"],
    ["-O", "qcow2", "-o", "cluster_size=512"],
    ["-O", "qcow2", "-o", "cluster_size=2M,refcount_bits=1"],
    ["-O", "qcow2", "-o", "extended_l2=on,refcount_bits=64"],
    ["-O", "qcow2", "-o", "compat=0.10"],
    ["-O", "qcow2", "-o", "cluster_size=4k,preallocation=metadata"],
    ["-O", "qcow2", "-o", "preallocation=full"],
    ["-O", "qcow2", "-o", "preallocation=falloc,cluster_size=16k"],
    ["-O", "qcow2", "-o", "backing_file=anything.qcow2"],
    # Checked, then the source's size measured; QEMU's 64-bit rounding wraps this one to 0.
    ["-O", "qcow2", "-o", "size=18446744073709551615,cluster_size=512"],
]
SOURCES = [
    "raw-sparse",
    "raw-created",
    "raw-odd-length",
    "raw-data-at-end",
    "plain",
    "plain-512",
    "plain-2M",
    "odd-size",
    "compressed",
    "compressed-2M",
    "compressed-512",
    "zero-clusters",
    "extended-l2",
    "extended-l2-overlay",
    "chain-2",
    "chain-3",
    "bitmaps",
    "bitmap-in-use",
    "bitmaps-stale",
    "bitmap-below",
    "snapshots",
    "prealloc-metadata",
    "prealloc-falloc",
    "v2",
    "raw-backing",
    "data-file",
    "data-file-raw",
    "empty",
]


@pytest.mark.parametrize("target", TARGETS, ids=[" ".join(t[1:]) for t in TARGETS])
@pytest.mark.parametrize("kind", SOURCES)
def test_source_equals_qemu(
    sources: dict[str, Path],
    qcowrs_mod: Any,
    capsys: pytest.CaptureFixture[str],
    kind: str,
    target: list[str],
) -> None:
    src = sources[kind]
    q = qemu_measure(*target, "--output=json", src)
    assert q.returncode == 0, q.stderr
    want = json.loads(q.stdout)
    fmt, opts = options_of(target)
    got = qcowrs_mod.measure(source=src, output_format=fmt, options=opts)
    assert got == want
    assert list(got) == list(want)
    assert cli(capsys, *target, "--output=json", src) == (0, q.stdout, "")
    qh = qemu_measure(*target, src)
    assert cli(capsys, *target, src) == (0, qh.stdout, "")


SNAPSHOT_FORMS = [
    "snapshot.name=first",
    "snapshot.id=2",
    "first",
    "2",
    "snapshot.id=1,snapshot.name=first",
]


@pytest.fixture(scope="module")
def snapshot_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three internal snapshots of different content: two of the disk's size now (16 MiB), and
    "big" of a 40 MiB disk with data past 16 MiB."""
    b = ImageBuilder(tmp_path_factory.mktemp("measure-snap"))
    p = b.create("sn.qcow2", "16M")
    b.io("sn.qcow2", "write -P 1 0 2M")
    qemu_img("snapshot", "-c", "first", str(p))
    b.io("sn.qcow2", "write -P 2 4M 3M", "write -z 0 512k")
    qemu_img("snapshot", "-c", "second", str(p))
    qemu_img("resize", str(p), "40M")
    b.io("sn.qcow2", "write -P 3 30M 6M")
    qemu_img("snapshot", "-c", "big", str(p))  # id 3, at 40M
    qemu_img("resize", "--shrink", str(p), "16M")
    b.io("sn.qcow2", "write -P 4 12M 1M")
    return p


@pytest.mark.parametrize("target", TARGETS[:3], ids=[" ".join(t[1:]) for t in TARGETS[:3]])
@pytest.mark.parametrize("form", SNAPSHOT_FORMS)
def test_snapshot_equals_qemu(
    snapshot_source: Path,
    qcowrs_mod: Any,
    capsys: pytest.CaptureFixture[str],
    form: str,
    target: list[str],
) -> None:
    """-l: every form of qemu-img's (snapshots of the disk's size now)."""
    q = qemu_measure(*target, "-l", form, "--output=json", snapshot_source)
    assert q.returncode == 0, q.stderr
    assert cli(capsys, *target, "-l", form, "--output=json", snapshot_source) == (0, q.stdout, "")
    qh = qemu_measure(*target, "-l", form, snapshot_source)
    assert cli(capsys, *target, "-l", form, snapshot_source) == (0, qh.stdout, "")
    # The API takes the id or the name.
    sn = form.split(",")[0].partition("=")[2] or form
    fmt, opts = options_of(target)
    got = qcowrs_mod.measure(source=snapshot_source, output_format=fmt, options=opts, snapshot=sn)
    assert got == json.loads(q.stdout)


def test_snapshot_measures_what_convert_l_writes(
    snapshot_source: Path, qcowrs_mod: Any, tmp_path: Path
) -> None:
    """The snapshot's content, not the disk's: each converted snapshot fits in `required`,
    and the snapshots measure differently from each other and from the current disk."""
    seen = set()
    for name in ("first", "second"):
        got = qcowrs_mod.measure(source=snapshot_source, output_format="qcow2", snapshot=name)
        out = tmp_path / f"{name}.qcow2"
        qemu_img("convert", "-O", "qcow2", "-l", f"snapshot.name={name}", snapshot_source, out)
        assert out.stat().st_size <= got["required"]
        seen.add(got["required"])
    seen.add(qcowrs_mod.measure(source=snapshot_source, output_format="qcow2")["required"])
    assert len(seen) == 3


def test_snapshot_of_another_size_is_measured_whole(
    snapshot_source: Path, qcowrs_mod: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Intended difference: QEMU measures (and `convert -l` copies) a snapshot at the disk's
    size *now*, so a snapshot of a larger disk loses its data past that size; qcowrs measures
    the snapshot at its own size, as `qcowrs convert -l` writes it whole."""
    mib = 1 << 20
    q = qemu_measure("-O", "raw", "-l", "big", "--output=json", snapshot_source)
    assert json.loads(q.stdout)["required"] == 16 * mib  # QEMU: the current size
    assert qcowrs_mod.measure(source=snapshot_source, output_format="raw", snapshot="big") == {
        "required": 40 * mib,
        "fully-allocated": 40 * mib,
    }
    ours = qcowrs_mod.measure(source=snapshot_source, output_format="qcow2", snapshot="big")
    out = tmp_path / "big.raw"
    assert cli_convert(capsys, "-O", "raw", "-l", "snapshot.name=big", snapshot_source, out) == 0
    data = out.read_bytes()
    assert len(data) == 40 * mib
    assert data[30 * mib : 36 * mib] == b"\x03" * (6 * mib)  # past the current 16 MiB
    theirs = tmp_path / "big-qemu.raw"
    qemu_img("convert", "-O", "raw", "-l", "snapshot.name=big", snapshot_source, theirs)
    assert theirs.read_bytes() == data[: 16 * mib]
    packed = tmp_path / "big.qcow2"
    qemu_img("convert", "-O", "qcow2", "-f", "raw", out, packed)
    assert packed.stat().st_size <= ours["required"]


def test_what_qemu_reports_for_each_kind(sources: dict[str, Path], qcowrs_mod: Any) -> None:
    """The rules behind the numbers, spelled out on a few sources (64 KiB target clusters)."""
    m = qcowrs_mod.measure
    # qemu-iotests 178: three data clusters over the metadata of a 1 GiB image.
    assert m(source=sources["plain"]) == {
        "bitmaps": 0,
        "required": 589824,
        "fully-allocated": 1074135040,
    }
    # Bitmaps: b1 (512-byte granularity over 2 GiB: 512 KiB of bits = 8 clusters, and a
    # table cluster), the default one (64 KiB: 4 KiB of bits), the 2 MiB one; each with a
    # table cluster; the directory (three entries) in one cluster.
    assert m(source=sources["bitmaps"])["bitmaps"] == (8 + 1 + 1 + 1 + 1 + 1 + 1) * 65536
    # A v2 source or target, or a raw one, has no bitmaps line.
    assert "bitmaps" not in m(source=sources["v2"])
    assert "bitmaps" not in m(source=sources["plain"], options={"compat": "0.10"})
    assert "bitmaps" not in m(source=sources["raw-sparse"])
    assert "bitmaps" not in m(source=sources["plain"], output_format="raw")
    # Zero clusters count nothing, whether they hide data below or not; data of a
    # metadata-preallocated image counts only where its file holds it.
    meta = m(size=16 * MiB)["required"]
    assert m(source=sources["zero-clusters"])["required"] - meta == 2 * MiB + 512 * KiB
    # A backing file option: every cluster.
    r = m(source=sources["plain"], options={"backing_file": "x"})
    assert r["required"] == r["fully-allocated"]
    # The size option is checked with a source, but the source's size is measured.
    assert m(source=sources["plain"], options={"size": 5 * GiB}) == m(source=sources["plain"])
    with pytest.raises(ValueError, match="The image size is too large"):
        m(source=sources["plain"], cluster_size=512, options={"size": 1 << 50})


CONVERT_SOURCES = ["plain", "plain-2M", "compressed", "zero-clusters", "extended-l2", "chain-3"]
CONVERT_SOURCES += ["raw-sparse", "snapshots", "prealloc-metadata"]


@pytest.mark.parametrize("cluster", ["512", "64k", "2M"])
@pytest.mark.parametrize("kind", CONVERT_SOURCES)
def test_converted_image_fits_in_required(
    sources: dict[str, Path], qcowrs_mod: Any, tmp_path: Path, kind: str, cluster: str
) -> None:
    src = sources[kind]
    cs = {"512": 512, "64k": 64 * KiB, "2M": 2 * MiB}[cluster]
    required = qcowrs_mod.measure(source=src, cluster_size=cs)["required"]
    for compress in ([], ["-c"]):
        dst = tmp_path / f"q{len(compress)}.qcow2"
        qemu_img("convert", *compress, "-O", "qcow2", "-o", f"cluster_size={cluster}", src, dst)
        assert os.path.getsize(dst) <= required, compress
    ours = tmp_path / "ours.qcow2"
    qcowrs_mod.convert(src, ours, cluster_size=cs)
    assert os.path.getsize(ours) <= required


@pytest.mark.parametrize("kind", ["chain-2", "compressed"])
def test_fully_preallocated_convert_is_the_fully_allocated_size(
    sources: dict[str, Path], qcowrs_mod: Any, tmp_path: Path, kind: str
) -> None:
    src = sources[kind]
    want = qcowrs_mod.measure(source=src, options={"preallocation": "full"})
    assert want["required"] == want["fully-allocated"]
    dst = tmp_path / "full.qcow2"
    qemu_img("convert", "-O", "qcow2", "-o", "preallocation=full", src, dst)
    assert os.path.getsize(dst) == want["fully-allocated"]
    ours = tmp_path / "ours.qcow2"
    qcowrs_mod.convert(src, ours, options={"preallocation": "full"})
    assert os.path.getsize(ours) == want["fully-allocated"]


def test_force_share(sources: dict[str, Path], qcowrs_mod: Any, tmp_path: Path) -> None:
    img = tmp_path / "held.qcow2"
    img.write_bytes(sources["plain-512"].read_bytes())
    want = json.loads(qemu_measure("-O", "qcow2", "--output=json", img).stdout)
    with held_by_qemu_io(img):
        q = qemu_measure("-O", "qcow2", "--output=json", img)
        assert q.returncode == 1
        assert "lock" in q.stderr
        with pytest.raises(qcowrs_mod.ImageLocked):
            qcowrs_mod.measure(source=img)
        assert json.loads(qemu_measure("-U", "-O", "qcow2", "--output=json", img).stdout) == want
        assert qcowrs_mod.measure(source=img, force_share=True) == want
        p = subprocess.run(
            [sys.executable, "-m", "qcowrs", "measure", "-U", "-O", "qcow2", "--output=json", img],
            capture_output=True,
            text=True,
            check=False,
        )
        assert (p.returncode, json.loads(p.stdout)) == (0, want)


def test_source_format(
    sources: dict[str, Path], qcowrs_mod: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """A qcow2 file measured as raw (-f raw) is its bytes; -f qcow2 on a raw file fails."""
    src = sources["plain"]
    q = qemu_measure("-f", "raw", "-O", "qcow2", "--output=json", src)
    assert qcowrs_mod.measure(source=src, source_format="raw") == json.loads(q.stdout)
    assert cli(capsys, "-f", "raw", "-O", "qcow2", "--output=json", src) == (0, q.stdout, "")
    with pytest.raises(qcowrs_mod.InvalidMagic):
        qcowrs_mod.measure(source=sources["raw-sparse"], source_format="qcow2")


# --------------------------------------------------------------------------------------------
# Errors


# argv -> what qcowrs prints where it intends to differ (None: qemu-img's message lines, each
# inside our one line).
ERRORS: list[tuple[list[str], str | None]] = [
    ([], None),
    (["--size", "1G", "SRC"], None),
    (["SRC", "SRC"], None),
    (["-f", "qcow2"], None),
    (["-l", "snap", "--size", "1G"], None),
    (["-U", "-f", "raw", "--size", "1G"], None),
    (["--size", "-1"], None),
    (["--size", "1Q"], None),
    (["--size", "9E"], None),
    (["--size", "1.5"], None),
    (["--size", "1G", "-O", "qcow2", "-o", "help"], None),
    (["--size", "1G", "-O", "qcow2", "-o", "?"], None),
    (["--size", "1G", "-o", "help"], None),
    (["--size", "1G", "-O", "qcow2", "-o", "foo=1"], None),
    (["--size", "1G", "-O", "qcow2", "-o", ","], None),
    (["--size", "1G", "-O", "qcow2", "-o", ""], None),
    (["--size", "1G", "-O", "qcow2", "-o", "cluster_size=512,"], None),
    (["--size", "1G", "-O", "qcow2", "-o", "cluster_size=512,,"], None),
    (["--size", "1G", "-O", "qcow2", "-o", "cluster_size=abc"], None),
    (["--size", "1G", "-O", "qcow2", "-o", "refcount_bits=abc"], None),
    (["--size", "1G", "-O", "qcow2", "-o", "lazy_refcounts=maybe"], None),
    (["--size", "1G", "-O", "qcow2", "-o", "nocow=maybe"], None),
    (["--size", "1G", "-O", "qcow2", "-o", "cluster_size=1000"], None),
    (["--size", "1G", "-O", "qcow2", "-o", "cluster_size=4M"], None),
    (["--size", "1G", "-O", "qcow2", "-o", "cluster_size=1000,compat=0.9"], None),
    (["--size", "1G", "-O", "qcow2", "-o", "compat=v3"], None),
    (["--size", "1G", "-O", "qcow2", "-o", "compat=0.9,refcount_bits=3"], None),
    (["--size", "1G", "-O", "qcow2", "-o", "refcount_bits=128"], None),
    (["--size", "1G", "-O", "qcow2", "-o", "refcount_bits=3,preallocation=bad"], None),
    (["--size", "1G", "-O", "qcow2", "-o", "compat=0.10,refcount_bits=8"], None),
    (
        ["--size", "1G", "-O", "qcow2", "-o", "preallocation=bad,extended_l2=on,cluster_size=512"],
        None,
    ),
    (["--size", "1G", "-O", "qcow2", "-o", "preallocation=bad"], None),
    (["--size", "1G", "-O", "qcow2", "-o", "encrypt.format=luks"], None),
    (["--size", "1G", "-O", "qcow2", "-o", "encrypt.format=luks,encrypt.key-secret=s0"], None),
    (["--size", "1P", "-O", "qcow2", "-o", "cluster_size=512"], None),
    (["--size", "8E", "-O", "qcow2"], None),
    (["-O", "raw", "-o", "cluster_size=512", "SRC"], None),
    (["-O", "qcow2", "-o", "size=1P,cluster_size=512", "SRC"], None),
    (["-O", "qcow2", "-o", "size=abc", "SRC"], None),
    (["-O", "qcow2", "-l", "snapshot.foo=snap", "SRC"], None),
    (
        ["-O", "qcow2", "-o", "foo=1", "missing.qcow2"],
        "Could not open 'missing.qcow2': No such file or directory",
    ),
    (["-O", "vdi", "missing.qcow2"], "Could not open 'missing.qcow2': No such file or directory"),
    (["-O", "qcow2", "-l", "snap", "SRC"], None),
    (["-O", "qcow2", "-l", "snapshot.name=x", "SRC"], None),
    (["-O", "qcow2", "-l", "snapshot.id=1", "SRC"], None),
    (["-O", "qcow2", "-l", "x=1", "SRC"], None),
    # qemu-img loads the snapshot before it looks at the target's options.
    (["-O", "qcow2", "-o", "foo=1", "-l", "x", "SRC"], None),
    (["-O", "qcow2", "-l", "x"], None),
    (["--size", "1G", "-O", "vmdk"], "Unknown file format 'vmdk'"),
    (["--size", "1G", "-O", "foo"], "Unknown file format 'foo'"),
    (["-f", "vmdk", "SRC"], "Unknown file format 'vmdk'"),
    (["-f", "qcow2", "RAW"], "not a qcow2 image"),
    (["."], "Could not open '.': Is a directory"),
    (["--size", "1G", "--output=xml"], "invalid choice: 'xml'"),
    (["--size", "1G", "-c"], "unrecognized arguments: -c"),
]


@pytest.mark.parametrize(("argv", "ours"), ERRORS, ids=[" ".join(a) or "(none)" for a, _ in ERRORS])
def test_errors_equal_qemu(
    sources: dict[str, Path], tmp_path: Path, argv: list[str], ours: str | None
) -> None:
    (tmp_path / "SRC").write_bytes(sources["plain-512"].read_bytes())
    (tmp_path / "RAW").write_bytes(sources["raw-odd-length"].read_bytes())
    before = sorted(os.listdir(tmp_path))
    q = qemu_measure(*argv, cwd=tmp_path)
    p = subprocess.run(
        [sys.executable, "-m", "qcowrs", "measure", *argv],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert "Traceback" not in p.stderr
    assert (q.returncode, p.returncode) == (1, 1), (q.stderr, p.stderr)
    assert p.stdout == q.stdout == ""
    (line,) = p.stderr.splitlines()
    assert line.startswith("qcowrs: ")
    if ours is None:
        for msg in qemu_error(q):
            assert msg in line, q.stderr
    else:
        assert ours in line, p.stderr
    assert sorted(os.listdir(tmp_path)) == before


def test_api_arguments(sources: dict[str, Path], qcowrs_mod: Any) -> None:
    m = qcowrs_mod.measure
    src = sources["plain-512"]
    with pytest.raises(ValueError, match="exactly one"):
        m()
    with pytest.raises(ValueError, match="exactly one"):
        m(1 << 20, src)
    with pytest.raises(ValueError, match="Can't find snapshot 'first'"):
        m(source=src, snapshot="first")
    with pytest.raises(ValueError, match="output_format"):
        m(1 << 20, output_format="vmdk")
    with pytest.raises(ValueError, match="compress"):
        m(1 << 20, compress="lz4")
    with pytest.raises(ValueError, match="Compression not supported"):
        m(1 << 20, compress="zlib", output_format="raw")
    with pytest.raises(ValueError, match="Must be between 0 and"):
        m(-1)
    with pytest.raises(ValueError, match="Must be between 0 and"):
        m(1 << 63)
    with pytest.raises(TypeError):
        m("1G")
    with pytest.raises(ValueError, match="does not support option 'foo'"):
        m(1 << 20, options={"foo": 1})
    with pytest.raises(ValueError, match="does not support option 'cluster_size'"):
        m(1 << 20, output_format="raw", options={"cluster_size": 512})
    with pytest.raises(TypeError, match="expected an int"):
        m(1 << 20, options={"cluster_size": "64k"})
    with pytest.raises(TypeError, match="expected a bool"):
        m(1 << 20, options={"extended_l2": "on"})
    with pytest.raises(ValueError, match="raw image has no clusters"):
        m(1 << 20, output_format="raw", cluster_size=4096)
    with pytest.raises(ValueError, match="given twice"):
        m(1 << 20, cluster_size=4096, options={"cluster_size": 512})
    with pytest.raises(qcowrs_mod.InvalidClusterSize, match="power of two between 512 and 2048k"):
        m(1 << 20, cluster_size=1000)
    with pytest.raises(OSError, match="No such file or directory") as exc:
        m(source=src.parent / "missing.qcow2")
    assert exc.value.errno == errno.ENOENT
    # The compression of the image to be written changes nothing (a cluster counts whole).
    assert m(source=src, compress="zstd") == m(source=src)
    # Path-like sources, the cluster size from either spelling, the default target qcow2.
    assert m(source=Path(src), options={"cluster_size": 4096}) == m(
        source=str(src), cluster_size=4096
    )
    assert m(1 << 30) == {"required": 393216, "fully-allocated": 1074135040}
    assert m(1 << 30, output_format="raw") == {"required": 1 << 30, "fully-allocated": 1 << 30}
    assert m(1 << 30, options={"encrypt.key-secret": "s", "encrypt.iter-time": 10}) == m(1 << 30)
    assert m(1 << 30, options={"extended-l2": True}) == m(1 << 30, options={"extended_l2": True})
