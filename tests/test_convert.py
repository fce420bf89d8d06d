"""`qcowrs convert` / `qcowrs.convert` against `qemu-img convert` on the same images.

For every source kind (raw, qcow2 v2/v3, compressed zlib/zstd, extended L2, an external data
file, chains of 2 and 3, 512-byte and 2 MiB clusters) and every output kind (raw, qcow2,
compressed zlib and zstd, and `-B` with the backing file kept): `qemu-img compare` says the
output equals the source, `qemu-img check` is clean, the output's allocated size is within 5%
of what `qemu-img convert` makes with the same options, and with `-B` no cluster the output
holds equals the backing file's. Then the safety cases (the target is a file the convert reads,
or held by qemu-io: refused, both files unchanged), `-S`, `-n`, concatenation, the time of an
overlay over a sparse 1 TiB backing file, and SIGINT/SIGKILL in the middle of a convert.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import ImageBuilder, file_sha256, held_by_qemu_io, qemu_img, requires_qemu

pytestmark = requires_qemu

MiB = 1 << 20
KiB = 1 << 10
SIZE = 16 * MiB


def qcowrs_cli(
    *args: str | os.PathLike[str], cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "qcowrs", *map(os.fspath, args)]
    return subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=300, check=False)


def content() -> bytes:
    """16 MiB: random 64 KiB blocks, half-compressible ones, patterns and zero gaps."""
    rng = random.Random(7)
    out = bytearray(SIZE)
    for i in range(SIZE // (64 * KiB)):
        kind = rng.randrange(5)
        at = i * 64 * KiB
        if kind == 0:
            out[at : at + 64 * KiB] = rng.randbytes(64 * KiB)
        elif kind == 1:
            half = rng.randbytes(32 * KiB)
            out[at : at + 64 * KiB] = half + bytes(32 * KiB)
        elif kind == 2:
            out[at : at + 64 * KiB] = bytes([i % 251 + 1]) * (64 * KiB)
        elif kind == 3:
            out[at + 512 : at + 1024] = rng.randbytes(512)  # mostly zeros
    return bytes(out)


SOURCES = [
    "raw",
    "v2",
    "v3",
    "zlib",
    "zstd",
    "extl2",
    "datafile",
    "chain2",
    "chain3",
    "c512",
    "c2m",
]
CHAINS = {"chain2": "base.qcow2", "chain3": "mid.qcow2"}


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    b = ImageBuilder(tmp_path_factory.mktemp("convsrc"))
    data = content()
    raw = b.path("src.raw")
    with open(raw, "wb") as fh:  # sparse: the zero blocks are holes
        fh.truncate(SIZE)
        for at in range(0, SIZE, 64 * KiB):
            block = data[at : at + 64 * KiB]
            if block.count(0) != len(block):
                fh.seek(at)
                fh.write(block)
    out = {"raw": raw}
    out["v2"] = b.convert("src.raw", "v2.qcow2", src_fmt="raw", compat="0.10")
    out["v3"] = b.convert("src.raw", "v3.qcow2", src_fmt="raw")
    out["zlib"] = b.convert("src.raw", "zlib.qcow2", src_fmt="raw", compress=True)
    out["zstd"] = b.convert(
        "src.raw", "zstd.qcow2", src_fmt="raw", compress=True, compression_type="zstd"
    )
    out["extl2"] = b.convert(
        "src.raw", "extl2.qcow2", src_fmt="raw", extended_l2="on", cluster_size="128k"
    )
    b.io("extl2.qcow2", "write -P 0x5a 4100k 8k", "write -z 1M 32k")
    out["datafile"] = b.convert(
        "src.raw", "df.qcow2", src_fmt="raw", data_file=str(b.path("df.data"))
    )
    out["c512"] = b.convert("src.raw", "c512.qcow2", src_fmt="raw", cluster_size=512)
    out["c2m"] = b.convert("src.raw", "c2m.qcow2", src_fmt="raw", cluster_size="2M")
    b.convert("src.raw", "base.qcow2", src_fmt="raw")
    b.create("mid.qcow2", backing="base.qcow2")
    b.io(
        "mid.qcow2",
        "write -P 0x11 1M 3M",
        "write -z 6M 1M",
        "discard 9M 64k",
        "write -P 0x22 12M 4k",
    )
    out["chain2"] = b.path("mid.qcow2")
    b.create("top.qcow2", backing="mid.qcow2")
    b.io("top.qcow2", "write -P 0x33 2M 128k", "write -z 1M 64k", "write -P 0 13M 64k")
    out["chain3"] = b.path("top.qcow2")
    return out


def allocated(p: Path) -> int:
    return os.stat(p).st_blocks * 512


def qemu_fmt(p: Path) -> str:
    return "raw" if p.suffix == ".raw" else "qcow2"


OUTPUTS: dict[str, list[str]] = {
    "raw": ["-O", "raw"],
    "qcow2": ["-O", "qcow2"],
    "zlib": ["-O", "qcow2", "-c"],
    "zstd": ["-O", "qcow2", "-c", "-o", "compression_type=zstd"],
}


def convert_both(src: Path, tmp: Path, args: list[str], ext: str) -> tuple[Path, Path]:
    ours, theirs = tmp / f"ours.{ext}", tmp / f"theirs.{ext}"
    fmt = ["-f", qemu_fmt(src)]
    r = qcowrs_cli("convert", *fmt, *args, src, ours)
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    assert r.stderr == ""
    qemu_img("convert", *fmt, *args, src, theirs)
    return ours, theirs


def assert_same_guest(src: Path, out: Path, out_fmt: str) -> None:
    r = qemu_img("compare", "-f", qemu_fmt(src), "-F", out_fmt, src, out, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def assert_clean(p: Path) -> None:
    r = qemu_img("check", "--output=json", p, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout).get("corruptions", 0) == 0


@pytest.mark.parametrize("out", list(OUTPUTS))
@pytest.mark.parametrize("kind", SOURCES)
def test_convert_equals_source_and_qemu(
    sources: dict[str, Path], tmp_path: Path, kind: str, out: str
) -> None:
    src = sources[kind]
    args = OUTPUTS[out]
    fmt = "raw" if out == "raw" else "qcow2"
    ours, theirs = convert_both(src, tmp_path, args, fmt)
    assert_same_guest(src, ours, fmt)
    if fmt == "qcow2":
        assert_clean(ours)
        info = json.loads(qemu_img("info", "--output=json", ours).stdout)
        want = "zstd" if out == "zstd" else "zlib"
        assert info["format-specific"]["data"]["compression-type"] == want
    a, q = allocated(ours), allocated(theirs)
    assert a <= q * 1.05 + 8 * KiB, f"ours {a} bytes allocated, qemu-img {q}"
    assert a >= q * 0.95 - 8 * KiB, f"ours {a} bytes allocated, qemu-img {q}"
    if out in ("zlib", "zstd"):
        # Compressed clusters as qemu-img makes them (same count, give or take).
        ours_c = sum(
            e["length"]
            for e in json.loads(qemu_img("map", "--output=json", ours).stdout)
            if e.get("compressed")
        )
        theirs_c = sum(
            e["length"]
            for e in json.loads(qemu_img("map", "--output=json", theirs).stdout)
            if e.get("compressed")
        )
        assert ours_c == theirs_c


def cluster_hashes(p: Path, fmt: str, cs: int) -> list[str]:
    out = p.with_suffix(".flat")
    qemu_img("convert", "-f", fmt, "-O", "raw", p, out)
    data = out.read_bytes()
    out.unlink()
    return [hashlib.sha256(data[i : i + cs]).hexdigest() for i in range(0, len(data), cs)]


@pytest.mark.parametrize("kind", list(CHAINS))
def test_convert_keeping_the_backing_file(
    sources: dict[str, Path], tmp_path: Path, kind: str
) -> None:
    src = sources[kind]
    backing = src.parent / CHAINS[kind]
    if kind == "chain3":
        backing = src.parent / "mid.qcow2"
    ours = tmp_path / "ours.qcow2"
    r = qcowrs_cli("convert", "-O", "qcow2", "-B", backing, "-F", "qcow2", src, ours)
    assert r.returncode == 0, r.stderr
    assert_same_guest(src, ours, "qcow2")
    assert_clean(ours)
    info = json.loads(qemu_img("info", "--output=json", ours).stdout)
    assert info["backing-filename"] == str(backing)
    # Only what differs from the backing file is in the output.
    cs = 65536
    b_hashes = cluster_hashes(backing, "qcow2", cs)
    o_hashes = cluster_hashes(ours, "qcow2", cs)
    own = [
        e
        for e in json.loads(qemu_img("map", "--output=json", ours).stdout)
        if e["depth"] == 0 and e["data"]
    ]
    assert own, "the overlay's own data is written"
    for e in own:
        for c in range(e["start"] // cs, (e["start"] + e["length"]) // cs):
            assert o_hashes[c] != b_hashes[c], f"cluster {c} equals the backing file's"
    theirs = tmp_path / "theirs.qcow2"
    qemu_img("convert", "-O", "qcow2", "-B", backing, "-F", "qcow2", src, theirs)
    assert allocated(ours) <= allocated(theirs) + 8 * KiB


def test_backing_file_not_in_the_chain(sources: dict[str, Path], tmp_path: Path) -> None:
    """-B names a file that is not the source's backing file: where it holds data the source
    does not, zeros are written over it; equal clusters are left to it."""
    src = sources["v3"]
    other = tmp_path / "other.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", other, str(SIZE))
    subprocess.run(
        ["qemu-io", "-c", "write -P 0x77 0 2M", "-c", "write -P 0 4M 1M", str(other)],
        check=True,
        capture_output=True,
    )
    ours = tmp_path / "ours.qcow2"
    r = qcowrs_cli("convert", "-O", "qcow2", "-B", other, "-F", "qcow2", src, ours)
    assert r.returncode == 0, r.stderr
    assert_same_guest(src, ours, "qcow2")
    assert_clean(ours)


def test_api_convert(sources: dict[str, Path], tmp_path: Path, qcowrs_mod: Any) -> None:
    calls: list[tuple[int, int]] = []
    out = tmp_path / "api.qcow2"
    qcowrs_mod.convert(
        sources["chain3"],
        out,
        compress="zstd",
        options={"cluster_size": 32768},
        progress=lambda d, t: calls.append((d, t)),
    )
    assert_same_guest(sources["chain3"], out, "qcow2")
    assert_clean(out)
    info = json.loads(qemu_img("info", "--output=json", out).stdout)
    assert info["cluster-size"] == 32768
    assert calls
    assert calls[-1][0] == calls[-1][1] > 0
    assert all(a[0] <= b[0] for a, b in itertools.pairwise(calls))
    # Several sources are concatenated, as qemu-img does.
    cat = tmp_path / "cat.raw"
    qcowrs_mod.convert([sources["raw"], sources["zlib"]], cat, "raw")
    theirs = tmp_path / "cat-q.raw"
    qemu_img("convert", "-O", "raw", sources["raw"], sources["zlib"], theirs)
    assert file_sha256(cat) == file_sha256(theirs)


# --------------------------------------------------------------------------------------------
# Sparseness, -n


def test_sparse_size(sources: dict[str, Path], tmp_path: Path) -> None:
    src = sources["v3"]
    for s in ("4k", "64k", "0"):
        ours, theirs = convert_both(src, tmp_path, ["-O", "raw", "-S", s], f"{s}.raw")
        assert_same_guest(src, ours, "raw")
        a, q = allocated(ours), allocated(theirs)
        assert abs(a - q) <= q * 0.05 + 8 * KiB, (s, a, q)
        if s == "0":
            assert a >= SIZE  # fully allocated
        ours.unlink()
        theirs.unlink()


def test_existing_target(sources: dict[str, Path], tmp_path: Path) -> None:
    src = sources["chain2"]
    for fmt in ("raw", "qcow2"):
        t = tmp_path / f"existing.{fmt}"
        qemu_img("create", "-q", "-f", fmt, t, str(SIZE))
        subprocess.run(
            ["qemu-io", "-f", fmt, "-c", f"write -P 0xee 0 {SIZE}", str(t)],
            check=True,
            capture_output=True,
        )
        r = qcowrs_cli("convert", "-n", "-O", fmt, src, t)
        assert r.returncode == 0, r.stderr
        assert_same_guest(src, t, fmt)
        if fmt == "qcow2":
            assert_clean(t)
    r = qcowrs_cli("convert", "--target-is-zero", "-O", "raw", src, tmp_path / "x.raw")
    assert r.returncode == 1
    assert r.stderr.strip() == "qcowrs: --target-is-zero requires use of -n flag"


# --------------------------------------------------------------------------------------------
# Safety


def test_refuses_to_overwrite_what_it_reads(sources: dict[str, Path], tmp_path: Path) -> None:
    b = ImageBuilder(tmp_path)
    b.convert(str(sources["v3"]), "base.qcow2")
    b.create("top.qcow2", backing="base.qcow2")
    b.io("top.qcow2", "write -P 0x44 0 1M")
    cases = [
        ("top.qcow2", "top.qcow2", "qcow2"),
        ("top.qcow2", "top.qcow2", "raw"),
        ("top.qcow2", "base.qcow2", "qcow2"),
        ("top.qcow2", "base.qcow2", "raw"),
    ]
    for src, dst, fmt in cases:
        before = {n: file_sha256(b.path(n)) for n in ("top.qcow2", "base.qcow2")}
        r = qcowrs_cli("convert", "-O", fmt, src, dst, cwd=tmp_path)
        assert r.returncode == 1, (src, dst, fmt)
        assert len(r.stderr.splitlines()) == 1
        assert 'Failed to get "write" lock' in r.stderr
        assert {n: file_sha256(b.path(n)) for n in before} == before
        q = qemu_img("convert", "-O", fmt, src, dst, cwd=tmp_path, check=False)
        assert q.returncode == 1  # qemu-img refuses too
    # A symbolic link to the source is the source.
    os.symlink("top.qcow2", b.path("link.qcow2"))
    before = file_sha256(b.path("top.qcow2"))
    r = qcowrs_cli("convert", "-O", "qcow2", "top.qcow2", "link.qcow2", cwd=tmp_path)
    assert r.returncode == 1
    assert file_sha256(b.path("top.qcow2")) == before


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_refuses_a_target_qemu_holds(sources: dict[str, Path], tmp_path: Path, fmt: str) -> None:
    t = tmp_path / f"held.{fmt}"
    qemu_img("create", "-q", "-f", fmt, t, "1M")
    with held_by_qemu_io(t) if fmt == "qcow2" else HeldRaw(t):
        before = file_sha256(t)
        r = qcowrs_cli("convert", "-O", fmt, sources["v3"], t)
        assert r.returncode == 1
        assert len(r.stderr.splitlines()) == 1
        assert "in use" in r.stderr
        assert file_sha256(t) == before


class HeldRaw:
    """qemu-io holding a raw file (the conftest helper opens qcow2)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> None:
        ino = os.stat(self.path).st_ino
        self.proc = subprocess.Popen(
            ["qemu-io", "-f", "raw", "-c", "sleep 20000", str(self.path)], stdout=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while not any(f":{ino} " in line for line in Path("/proc/locks").read_text().splitlines()):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(0.2)

    def __exit__(self, *exc: object) -> None:
        self.proc.kill()
        self.proc.wait()


# --------------------------------------------------------------------------------------------
# Proportional to the data


def test_overlay_of_a_sparse_1tib_backing_file(tmp_path: Path) -> None:
    b = ImageBuilder(tmp_path)
    b.create("huge.qcow2", "1T")
    b.io("huge.qcow2", "write -P 0x61 0 1M", "write -P 0x62 900G 1M")
    b.create("over.qcow2", backing="huge.qcow2")
    b.io("over.qcow2", "write -P 0x63 512k 1M", "write -P 0x64 1000G 64k")
    for fmt in ("qcow2", "raw"):
        t0 = time.monotonic()
        r = qcowrs_cli("convert", "-O", fmt, "over.qcow2", f"flat.{fmt}", cwd=tmp_path)
        took = time.monotonic() - t0
        assert r.returncode == 0, r.stderr
        assert took < 20, f"{took:.1f} s for 3 MiB of data"
        assert_same_guest(b.path("over.qcow2"), b.path(f"flat.{fmt}"), fmt)
        assert allocated(b.path(f"flat.{fmt}")) < 8 * MiB


# --------------------------------------------------------------------------------------------
# Interrupted converts


@pytest.fixture(scope="module")
def big_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("convbig")
    raw = d / "big.raw"
    rng = random.Random(3)
    with open(raw, "wb") as fh:
        for i in range(192):
            fh.write(rng.randbytes(512 * KiB) + bytes([i]) * (512 * KiB))
    src = d / "big.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, src)
    raw.unlink()
    return src


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_convert_leaves_a_valid_target(
    big_source: Path, tmp_path: Path, sig: int
) -> None:
    before = file_sha256(big_source)
    t = tmp_path / "t.qcow2"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qcowrs",
            "convert",
            "-c",
            "-m",
            "1",
            "-O",
            "qcow2",
            str(big_source),
            str(t),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while not t.exists() or t.stat().st_size < 2 * MiB:
        assert proc.poll() is None, "convert finished before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    if sig == signal.SIGINT:
        assert err.strip() == "qcowrs: interrupted"
    assert file_sha256(big_source) == before
    r = qemu_img("check", "--output=json", t, check=False)
    report = json.loads(r.stdout)
    assert report.get("corruptions", 0) == 0, r.stdout
    assert report.get("check-errors", 0) == 0, r.stdout
    if sig == signal.SIGINT:
        # Stopped between two units and closed properly: no leak, and what was written is
        # there and reads as the source's.
        assert r.returncode == 0, r.stdout
        written = [e for e in json.loads(qemu_img("map", "--output=json", t).stdout) if e["data"]]
        assert written, "some data was written before the signal"
        assert_prefix_equal(big_source, t, written)
    else:
        # Killed: clusters allocated but not yet linked from an L2 table on disk are leaks
        # (exit 3, as after a killed qemu-img convert); nothing is corrupt and a leak repair
        # makes it clean.
        assert r.returncode in (0, 3), r.stdout
        fix = qcowrs_cli("check", "-r", "leaks", t)
        assert fix.returncode == 0, fix.stdout + fix.stderr
        assert qemu_img("check", t, check=False).returncode == 0


def assert_prefix_equal(src: Path, t: Path, written: list[dict[str, Any]]) -> None:
    for e in written[:4]:
        a = subprocess.run(
            ["qemu-io", "-r", "-c", f"read -v {e['start']} 512", str(src)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        b = subprocess.run(
            ["qemu-io", "-r", "-c", f"read -v {e['start']} 512", str(t)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert a.splitlines()[:32] == b.splitlines()[:32]


# --------------------------------------------------------------------------------------------
# Streams


def stream_to(
    args: list[str], out: Path, cwd: Path | None = None, stdin: Path | None = None
) -> str:
    """Runs `qcowrs convert ARGS` with its standard output a pipe (through cat) into `out`."""
    cmd = " ".join(["exec", sys.executable, "-m", "qcowrs", "convert", *map(str, args)])
    src = f"< {stdin}" if stdin else ""
    proc = subprocess.run(
        ["bash", "-o", "pipefail", "-c", f"{cmd} {src} | cat > {out}"],
        capture_output=True,
        text=True,
        cwd=cwd,
        check=False,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


@pytest.mark.parametrize(
    ("kind", "opts"),
    [
        ("chain3", []),
        ("extl2", ["-o", "extended_l2=on"]),
        ("zstd", ["-o", "compat=0.10"]),
        ("c2m", ["-o", "cluster_size=512,refcount_bits=1"]),
        ("raw", ["-S", "0"]),
        ("chain2", ["-B", "base.qcow2", "-F", "qcow2"]),
    ],
)
def test_stream_qcow2_to_a_pipe(
    sources: dict[str, Path], tmp_path: Path, kind: str, opts: list[str]
) -> None:
    src = sources[kind]
    # Beside the source: a relative -B name is relative to the image.
    out = src.parent / f"streamed-{kind}.qcow2"
    stream_to(["-f", qemu_fmt(src), "-O", "qcow2", *opts, src, "-"], out, cwd=src.parent)
    assert_clean(out)
    assert_same_guest(src, out, "qcow2")
    if "-B" in opts:
        info = json.loads(qemu_img("info", "--output=json", "-U", out).stdout)
        assert info["backing-filename"] == "base.qcow2"
    else:
        # About as long as qemu-img's file output with the same options (a stream has no
        # holes, so the length is what compares).
        theirs = tmp_path / "theirs.qcow2"
        qemu_img("convert", "-f", qemu_fmt(src), "-O", "qcow2", *opts, src, theirs)
        a, q = out.stat().st_size, theirs.stat().st_size
        assert a <= q * 1.05 + 64 * KiB, (a, q)


def test_stream_raw_both_ways(sources: dict[str, Path], tmp_path: Path) -> None:
    src = sources["chain3"]
    out = tmp_path / "streamed.raw"
    stream_to(["-O", "raw", src, "-"], out)
    flat = tmp_path / "flat.raw"
    qemu_img("convert", "-O", "raw", src, flat)
    assert file_sha256(out) == file_sha256(flat)
    # A raw stream read from standard input.
    back = tmp_path / "back.qcow2"
    with open(out, "rb") as stdin:
        r = subprocess.run(
            [sys.executable, "-m", "qcowrs", "convert", "-O", "qcow2", "-", str(back)],
            stdin=stdin,
            capture_output=True,
            text=True,
            check=False,
        )
    assert r.returncode == 0, r.stderr
    assert_same_guest(src, back, "qcow2")
    assert_clean(back)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".qcowrs-stdin")]
    # Compressed clusters cannot be laid out ahead: refused in one line.
    r = qcowrs_cli("convert", "-c", "-O", "qcow2", src, "-")
    assert r.returncode == 1
    assert len(r.stderr.splitlines()) == 1
    assert "cannot be streamed" in r.stderr


# --------------------------------------------------------------------------------------------
# dd


@pytest.mark.parametrize(
    "ops",
    [
        "bs=64k",
        "bs=64k count=10",
        "bs=64k skip=10",
        "bs=64k count=10 skip=4",
        "bs=1M count=300",
        "bs=512 count=3",
        "bs=4k skip=1000 count=1003",
    ],
)
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_dd_equals_qemu_img_dd(
    sources: dict[str, Path], tmp_path: Path, ops: str, fmt: str
) -> None:
    src = sources["chain3"]
    ours, theirs = tmp_path / "ours.out", tmp_path / "theirs.out"
    r = qcowrs_cli("dd", "-O", fmt, *ops.split(), f"if={src}", f"of={ours}")
    assert r.returncode == 0, r.stderr
    qemu_img("dd", "-O", fmt, *ops.split(), f"if={src}", f"of={theirs}")
    if fmt == "raw":
        assert file_sha256(ours) == file_sha256(theirs)
    else:
        assert_clean(ours)
        r = qemu_img("compare", ours, theirs, check=False)
        assert r.returncode == 0, r.stdout
        size = [
            json.loads(qemu_img("info", "--output=json", p).stdout)["virtual-size"]
            for p in (ours, theirs)
        ]
        assert size[0] == size[1]


@pytest.mark.parametrize(
    ("ops", "message"),
    [
        (["bs=1M", "foo=1"], "unrecognized operand foo"),
        (["bs=1M", "count=x"], "Invalid count specified: 'x'."),
        (["bs=0"], "Invalid bs specified. Must be between 1 and 2147483647."),
        (["bs=1M", "skip=100", "count=10"], "cannot skip to specified offset"),
        (["bs=1M", "skip=100"], "cannot skip to specified offset"),
    ],
)
def test_dd_errors(sources: dict[str, Path], tmp_path: Path, ops: list[str], message: str) -> None:
    out = tmp_path / "o.raw"
    r = qcowrs_cli("dd", *ops, f"if={sources['v3']}", f"of={out}")
    assert r.returncode == 1
    assert len(r.stderr.splitlines()) == 1
    assert message in r.stderr
    assert not out.exists()
    r = qcowrs_cli("dd", "bs=1M", f"if={sources['v3']}")
    assert r.stderr == "qcowrs: Must specify both input and output files\n"
