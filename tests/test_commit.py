"""`qcowrs commit` / `qcowrs.commit` against `qemu-img commit` on the same chains.

Chains of 3 (base with an internal snapshot, middle, top larger than the base) of several
kinds (plain, compressed top, extended L2, 512-byte clusters, a raw base), committed into the
backing file, with `-d`, and into the bottom with `-b`: every image's guest content afterwards
equals what qemu-img's commit leaves (sha256 of `qemu-img convert -O raw`), the base's
snapshot and size too, `qemu-img check` is clean on every image, and the top reads as before.
qemu-img's refusals, one line. A commit failed at every write or sync keeps the top's guest
content, and every image then opens (repaired) with at most leaks.
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

KINDS = ["plain", "compressed", "extl2", "c512", "rawbase"]


def chain(d: Path, kind: str) -> None:
    b = ImageBuilder(d)
    opts: dict[str, Any] = {"extl2": {"extended_l2": "on"}, "c512": {"cluster_size": 512}}.get(
        kind, {}
    )
    if kind == "rawbase":
        b.create("b.img", "8M", fmt="raw")
        b.io("b.img", "write -P 1 0 4M", fmt="raw")
        b.create("m.qcow2", backing="b.img", backing_fmt="raw")
    else:
        b.create("b.img", "8M", **opts)
        b.io("b.img", "write -P 1 0 4M")
        subprocess.run(["qemu-img", "snapshot", "-c", "s", str(b.path("b.img"))], check=True)
        b.create("m.qcow2", backing="b.img", **opts)
    b.io("m.qcow2", "write -P 2 1M 1M", "write -z 2560k 64k")
    b.create("t.qcow2", "12M", backing="m.qcow2", **opts)
    c = "-c " if kind == "compressed" else ""
    b.io(
        "t.qcow2",
        f"write {c}-P 3 1536k 1M",
        "write -z 3M 64k",
        f"write {c}-P 4 10M 1M",
        "write -P 5 7M 4k",
    )


@pytest.fixture(scope="module")
def chains(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for kind in KINDS:
        d = tmp_path_factory.mktemp(f"cm-{kind}")
        chain(d, kind)
        out[kind] = d
    return out


def qcowrs_cli(
    *args: str | os.PathLike[str], cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "qcowrs", *map(os.fspath, args)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False, cwd=cwd)


def fmt(p: Path) -> str:
    return "raw" if p.read_bytes()[:4] != b"QFI\xfb" else "qcow2"


def state(d: Path) -> dict[str, Any]:
    """Every image's guest content and size, and the base's snapshot."""
    out: dict[str, Any] = {}
    for name in ("t.qcow2", "m.qcow2", "b.img"):
        p = d / name
        f = fmt(p)
        out[name] = raw_sha256(p, f)
        out[name + " size"] = json.loads(qemu_img("info", "--output=json", "-f", f, p).stdout)[
            "virtual-size"
        ]
    if fmt(d / "b.img") == "qcow2":
        snap = d / "snap.raw"
        qemu_img("convert", "-l", "snapshot.name=s", "-O", "raw", d / "b.img", snap)
        out["snapshot"] = raw_sha256(snap, "raw")
        snap.unlink()
    return out


def assert_clean(d: Path) -> None:
    for name in ("t.qcow2", "m.qcow2", "b.img"):
        if fmt(d / name) == "qcow2":
            r = qemu_img("check", d / name, check=False)
            assert r.returncode == 0, f"{name}: {r.stdout}"


@pytest.mark.parametrize("args", [[], ["-d"], ["-b", "b.img"]], ids=["default", "d", "b"])
@pytest.mark.parametrize("kind", KINDS)
def test_commit_equals_qemu(
    chains: dict[str, Path], tmp_path: Path, kind: str, args: list[str]
) -> None:
    ours = shutil.copytree(chains[kind], tmp_path / "o")
    theirs = shutil.copytree(chains[kind], tmp_path / "q")
    top_before = raw_sha256(ours / "t.qcow2")
    r = qcowrs_cli("commit", *args, "t.qcow2", cwd=ours)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "Image committed.\n"
    qemu_img("commit", *args, "t.qcow2", cwd=theirs)
    assert state(ours) == state(theirs)
    assert raw_sha256(ours / "t.qcow2") == top_before or args == ["-b", "b.img"]
    assert_clean(ours)
    if not args:
        # Emptied: the top allocates nothing of its own.
        own = [
            e
            for e in json.loads(qemu_img("map", "--output=json", ours / "t.qcow2").stdout)
            if e["depth"] == 0
        ]
        assert not [e for e in own if e["present"]], own


@pytest.mark.parametrize(
    ("image", "args", "message"),
    [
        ("b.img", [], "Image does not have a backing file"),
        (
            "t.qcow2",
            ["-b", "nothere.qcow2"],
            "Did not find 'nothere.qcow2' in the backing chain of 't.qcow2'",
        ),
        (
            "t.qcow2",
            ["-b", "other.qcow2"],
            "Did not find 'other.qcow2' in the backing chain of 't.qcow2'",
        ),
    ],
)
def test_refusals(
    chains: dict[str, Path], tmp_path: Path, image: str, args: list[str], message: str
) -> None:
    d = shutil.copytree(chains["plain"], tmp_path / "o")
    qemu_img("create", "-q", "-f", "qcow2", d / "other.qcow2", "8M")
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    r = qcowrs_cli("commit", *args, image, cwd=d)
    assert r.returncode == 1
    assert r.stderr == f"qcowrs: {message}\n"
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    q = qemu_img("commit", *args, image, cwd=d, check=False)
    assert q.returncode == 1
    assert message in q.stderr


def test_interrupted_commit(
    chains: dict[str, Path], tmp_path: Path, qcowrs_mod: Any, fault_hook: Any
) -> None:
    src = chains["c512"]
    top_before = raw_sha256(src / "t.qcow2")
    ref = shutil.copytree(src, tmp_path / "ref")
    n0 = fault_hook._io_ops()
    qcowrs_mod.commit(ref / "t.qcow2")
    total = fault_hook._io_ops() - n0
    assert 0 < total < 50000
    ks = sorted({round(i * (total - 1) / 49) for i in range(50)} | set(range(min(total, 8))))
    failures = []
    for k in ks:
        d = shutil.copytree(src, tmp_path / f"k{k}")
        fault_hook._fail_after_ops(k)
        try:
            qcowrs_mod.commit(d / "t.qcow2")
            failures.append(f"k={k}: no error")
        except qcowrs_mod.QcowError:
            pass
        finally:
            fault_hook._fail_after_ops(None)
        for name in ("b.img", "m.qcow2", "t.qcow2"):
            with qcowrs_mod.QcowFile.open(d / name, rebuild=True, backing=False):
                pass
            r = qemu_img("check", "--output=json", d / name, check=False)
            if json.loads(r.stdout).get("corruptions", 0) or r.returncode not in (0, 3):
                failures.append(f"k={k} {name}: {r.stdout[:200]}")
        if raw_sha256(d / "t.qcow2") != top_before:
            failures.append(f"k={k}: the top's guest content changed")
        shutil.rmtree(d)
    assert not failures, "\n".join(failures)
