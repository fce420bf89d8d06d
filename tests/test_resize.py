"""`qcowrs resize` / `qcowrs.resize` against `qemu-img resize` on the same images.

Grow and shrink (with `--shrink`) of qcow2 images of every kind (plain, compressed, internal
snapshots, extended L2, 512 B and 2 MiB clusters, an overlay) and of raw images, absolute and
relative sizes: the guest content afterwards equals what qemu-img's own resize gives
(`qemu-img convert -O raw` sha256), `qemu-img check` is clean, `info` agrees on the size, and a
snapshot keeps its own size and content. qemu-img's refusals, one line each. Then a shrink
killed at every write or sync (the fault-injection hook): the image opens (with rebuild) with
either the old or the new content, never a mix, and `qemu-img check` finds at most leaks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import ImageBuilder, qemu_img, raw_sha256, requires_qemu

pytestmark = requires_qemu

MiB = 1 << 20

KINDS = ["plain", "compressed", "snapshots", "extl2", "c512", "c2m", "overlay", "raw"]


def build(b: ImageBuilder, kind: str) -> Path:
    if kind == "raw":
        p = b.create("img.raw", "24M", fmt="raw")
        b.io("img.raw", "write -P 0x11 0 3M", "write -P 0x12 15M 9M", fmt="raw")
        return p
    opts: dict[str, Any] = {
        "plain": {},
        "compressed": {},
        "snapshots": {},
        "extl2": {"extended_l2": "on", "cluster_size": "64k"},
        "c512": {"cluster_size": 512},
        "c2m": {"cluster_size": "2M"},
        "overlay": {},
    }[kind]
    if kind == "overlay":
        b.create("base.qcow2", "24M")
        b.io("base.qcow2", "write -P 0x21 0 24M")
        p = b.create("img.qcow2", backing="base.qcow2")
    else:
        p = b.create("img.qcow2", "24M", **opts)
    c = "-c " if kind == "compressed" else ""
    b.io("img.qcow2", f"write {c}-P 0x11 0 3M", f"write {c}-P 0x12 15M 9M", "write -z 4M 1M")
    if kind == "snapshots":
        subprocess.run(["qemu-img", "snapshot", "-c", "s1", str(p)], check=True)
        b.io("img.qcow2", "write -P 0x13 20M 1M")
    if kind == "extl2":
        b.io("img.qcow2", "write -P 0x14 17M 4k", "write -z 18M 8k")
    return p


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for kind in KINDS:
        out[kind] = build(ImageBuilder(tmp_path_factory.mktemp(f"rs-{kind}")), kind)
    return out


def twin(src: Path, tmp: Path, name: str) -> Path:
    """A copy of the image (with its backing file beside it)."""
    d = tmp / name
    d.mkdir()
    for f in src.parent.iterdir():
        shutil.copyfile(f, d / f.name)
    return d / src.name


def qcowrs_cli(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "qcowrs", *map(os.fspath, args)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def fmt_of(p: Path) -> str:
    return "raw" if p.suffix == ".raw" else "qcow2"


def info(p: Path) -> dict[str, Any]:
    out = qemu_img("info", "--output=json", "-f", fmt_of(p), p).stdout
    return dict(json.loads(out))


SIZES = ["+1G", "48M", "+512", "-9M", "16M", "15M", "4608", "3M", "-1M"]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("kind", KINDS)
def test_resize_equals_qemu(images: dict[str, Path], tmp_path: Path, kind: str, size: str) -> None:
    ours, theirs = twin(images[kind], tmp_path, "o"), twin(images[kind], tmp_path, "q")
    shrink = ["--shrink"] if size.startswith("-") or size in ("16M", "15M", "4608", "3M") else []
    f = fmt_of(ours)
    r = qcowrs_cli("resize", "-f", f, *shrink, ours, size)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "Image resized.\n"
    qemu_img("resize", "-f", f, *shrink, theirs, "--", size)
    assert info(ours)["virtual-size"] == info(theirs)["virtual-size"]
    assert raw_sha256(ours, f) == raw_sha256(theirs, f)
    if f == "qcow2":
        r = qemu_img("check", ours, check=False)
        assert r.returncode == 0, r.stdout
        # The file does not keep what the shrink dropped (within a few clusters of qemu-img's).
        a = ours.stat().st_blocks * 512
        q = theirs.stat().st_blocks * 512
        assert a <= q + 4 * max(65536, info(ours)["cluster-size"]), (a, q)
    if kind == "snapshots":
        for p in (ours, theirs):
            out = p.with_suffix(".s1")
            qemu_img("convert", "-l", "snapshot.name=s1", "-O", "raw", p, out)
        assert ours.with_suffix(".s1").read_bytes() == theirs.with_suffix(".s1").read_bytes()
        # The snapshot table entry keeps the snapshot's own size.
        snaps = info(ours)["snapshots"]
        assert [s["vm-clock-nsec"] for s in snaps] == [
            s["vm-clock-nsec"] for s in info(theirs)["snapshots"]
        ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["16M"], "Use the --shrink option to perform a shrink operation."),
        (["--", "-1000"], "Use the --shrink option to perform a shrink operation."),
        (["+1000"], "The new size must be a multiple of 512"),
        (["--shrink", "--", "-2G"], "New image size must be positive"),
        (["abc"], "Parameter 'size' expects a non-negative number below 2^64"),
    ],
)
def test_refusals(images: dict[str, Path], tmp_path: Path, args: list[str], message: str) -> None:
    img = twin(images["plain"], tmp_path, "o")
    before = img.read_bytes()
    pre = [a for a in args if a == "--shrink"]
    rest = [a for a in args if a != "--shrink"]
    r = qcowrs_cli("resize", *pre, img, *rest)
    assert r.returncode == 1
    assert r.stderr == f"qcowrs: {message}\n"
    assert img.read_bytes() == before
    q = qemu_img("resize", *pre, img, *rest, check=False)
    assert q.returncode == 1
    assert message in q.stderr


def test_api(images: dict[str, Path], tmp_path: Path, qcowrs_mod: Any) -> None:
    img = twin(images["plain"], tmp_path, "o")
    assert qcowrs_mod.resize(img, "+1M") == 25 * MiB
    assert qcowrs_mod.resize(img, 8 * MiB, shrink=True) == 8 * MiB
    with pytest.raises(ValueError, match="--shrink"):
        qcowrs_mod.resize(img, 4 * MiB)
    with qcowrs_mod.QcowFile.open(img) as f:
        assert f.virtual_size == 8 * MiB
        assert f.pread(MiB, 0) == b"\x11" * MiB


# --------------------------------------------------------------------------------------------
# A shrink interrupted at every write and sync


@pytest.mark.parametrize("kind", ["plain", "snapshots", "c512"])
def test_interrupted_shrink(
    images: dict[str, Path], tmp_path: Path, qcowrs_mod: Any, fault_hook: Any, kind: str
) -> None:
    src = images[kind]
    old = raw_sha256(src)
    ref = twin(src, tmp_path, "ref")
    before = fault_hook._io_ops()
    qcowrs_mod.resize(ref, "-9M", shrink=True)
    total = fault_hook._io_ops() - before
    new = raw_sha256(ref)
    assert 0 < total < 5000
    failures = []
    for k in range(total):
        img = twin(src, tmp_path, f"k{k}")
        fault_hook._fail_after_ops(k)
        try:
            qcowrs_mod.resize(img, "-9M", shrink=True)
            failures.append(f"k={k}: no error although operation {k + 1} failed")
        except qcowrs_mod.QcowError:
            pass
        finally:
            fault_hook._fail_after_ops(None)
        with qcowrs_mod.QcowFile.open(img, rebuild=True):
            pass
        r = qemu_img("check", "--output=json", img, check=False)
        report = json.loads(r.stdout)
        if report.get("corruptions", 0) or r.returncode not in (0, 3):
            failures.append(f"k={k}: {r.stdout[:200]}")
        got = raw_sha256(img)
        if got not in (old, new):
            failures.append(f"k={k}: guest content is neither the old nor the new one")
        shutil.rmtree(img.parent)
    assert not failures, "\n".join(failures)
