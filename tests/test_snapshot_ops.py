"""Internal snapshots created, applied and deleted by qcowrs, checked by QEMU, and the reverse.

Images of every kind (plain, compressed, extended L2, an overlay over a backing file, 512 B
and 2 MiB clusters, compat 0.10): snapshots qcowrs makes (with writes in between) are listed
by `qemu-img snapshot -l` with the same fields, read by `qemu-img convert -l` as recorded,
applied by `qemu-img snapshot -a` to the recorded content and deleted by QEMU with
`qemu-img check` clean; snapshots `qemu-img snapshot -c` makes are listed (the same
`snapshot -l` output), read through `QcowFile.open(snapshot=...)`, applied and deleted by
qcowrs with the same content and a clean check. Then each operation killed at every write or
sync (the fault-injection hook): the image opens (rebuild) with the old or the new snapshot
list, every snapshot's content intact, the active content old or new, at most leaks.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    ImageBuilder,
    content_digest,
    file_sha256,
    qemu_img,
    raw_sha256,
    requires_qemu,
    snapshot_sha256,
)

pytestmark = requires_qemu

KINDS = ["plain", "compressed", "extl2", "overlay", "c512", "c2m", "v2"]


def build(b: ImageBuilder, kind: str) -> Path:
    opts: dict[str, Any] = {
        "extl2": {"extended_l2": "on"},
        "c512": {"cluster_size": 512},
        "c2m": {"cluster_size": "2M"},
        "v2": {"compat": "0.10"},
    }.get(kind, {})
    if kind == "overlay":
        b.create("base.qcow2", "16M")
        b.io("base.qcow2", "write -P 0x21 0 16M")
        p = b.create("img.qcow2", backing="base.qcow2")
    else:
        p = b.create("img.qcow2", "16M", **opts)
    c = "-c " if kind == "compressed" else ""
    b.io("img.qcow2", f"write {c}-P 0x11 0 2M", f"write {c}-P 0x12 9M 1M", "write -z 1M 128k")
    return p


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {k: build(ImageBuilder(tmp_path_factory.mktemp(f"sn-{k}")), k) for k in KINDS}


def twin(src: Path, tmp: Path, name: str) -> Path:
    d = tmp / name
    d.mkdir()
    for f in src.parent.iterdir():
        shutil.copyfile(f, d / f.name)
    return d / src.name


def qcowrs_cli(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "qcowrs", *map(os.fspath, args)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def assert_clean(p: Path) -> None:
    r = qemu_img("check", "--output=json", p, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def listing(p: Path) -> list[tuple[str, str, int, int | None]]:
    snaps = json.loads(qemu_img("info", "-U", "--output=json", p).stdout).get("snapshots", [])
    return [(s["id"], s["name"], s["vm-state-size"], s.get("icount")) for s in snaps]


@pytest.mark.parametrize("kind", KINDS)
def test_qcowrs_snapshots_seen_by_qemu(
    images: dict[str, Path], tmp_path: Path, qcowrs_mod: Any, kind: str
) -> None:
    p = twin(images[kind], tmp_path, "o")
    recorded: dict[str, str] = {}
    with qcowrs_mod.QcowFile.open(p, "r+b") as f:
        s = f.create_snapshot("first")
        assert (s.id, s.name) == ("1", "first")
        f.pwrite(b"\x31" * 65536, 0)
        f.write_zeroes(9 << 20, 65536)
        f.create_snapshot("second")
        f.pwrite(b"\x32" * 4096, 5 << 20)
        f.discard(0, 65536)
    assert_clean(p)
    assert [(i, n) for i, n, _, _ in listing(p)] == [("1", "first"), ("2", "second")]
    assert {icount for *_, icount in listing(p)} == {0}
    for name in ("first", "second"):
        recorded[name] = snapshot_sha256(p, name)
    assert recorded["first"] == raw_sha256(images[kind])
    active = raw_sha256(p)
    # QEMU applies and deletes what qcowrs made.
    q = twin(p, tmp_path, "q")
    qemu_img("snapshot", "-a", "first", q)
    assert raw_sha256(q) == recorded["first"]
    qemu_img("snapshot", "-d", "second", q)
    assert_clean(q)
    # qcowrs applies and deletes too, with the same results.
    r = qcowrs_cli("snapshot", "-a", "first", p)
    assert r.returncode == 0, r.stderr
    assert raw_sha256(p) == recorded["first"]
    assert snapshot_sha256(p, "second") == recorded["second"]
    assert qcowrs_cli("snapshot", "-d", "second", p).returncode == 0
    assert_clean(p)
    assert [n for _, n, _, _ in listing(p)] == ["first"]
    assert active != recorded["first"]


@pytest.mark.parametrize("kind", KINDS)
def test_qemu_snapshots_read_applied_deleted_by_qcowrs(
    images: dict[str, Path], tmp_path: Path, qcowrs_mod: Any, kind: str
) -> None:
    p = twin(images[kind], tmp_path, "o")
    qemu_img("snapshot", "-c", "s1", p)
    ImageBuilder(p.parent).io(p.name, "write -P 0x41 1M 1M", "write -z 0 64k")
    qemu_img("snapshot", "-c", "s2", p)
    ImageBuilder(p.parent).io(p.name, "write -P 0x42 12M 64k")
    digests = content_digest(p)
    ours = qcowrs_cli("snapshot", "-l", p)
    theirs = qemu_img("snapshot", "-l", p)
    assert ours.stdout == theirs.stdout
    for name in ("s1", "s2"):
        with qcowrs_mod.QcowFile.open(p, snapshot=name) as v:
            data = v.pread(v.virtual_size, 0)

        assert hashlib.sha256(data).hexdigest() == digests[name]
        out = p.parent / f"{name}.raw"
        r = qcowrs_cli("convert", "-l", f"snapshot.name={name}", "-O", "raw", p, out)
        assert r.returncode == 0, r.stderr
        assert file_sha256(out) == digests[name]
        out.unlink()
    with qcowrs_mod.QcowFile.open(p, "r+b") as f:
        f.apply_snapshot("s1")
    assert raw_sha256(p) == digests["s1"]
    assert_clean(p)
    with qcowrs_mod.QcowFile.open(p, "r+b") as f:
        f.delete_snapshot("1")
        f.delete_snapshot("s2")
        assert f.snapshots() == []
    assert_clean(p)
    assert raw_sha256(p) == digests["s1"]


def test_apply_restores_the_size_and_refusals(
    images: dict[str, Path], tmp_path: Path, qcowrs_mod: Any
) -> None:
    p = twin(images["plain"], tmp_path, "o")
    before = raw_sha256(p)
    assert qcowrs_cli("snapshot", "-c", "small", p).returncode == 0
    qemu_img("resize", p, "32M")
    ImageBuilder(p.parent).io(p.name, "write -P 0x51 20M 1M")
    assert qcowrs_cli("snapshot", "-a", "small", p).returncode == 0
    assert json.loads(qemu_img("info", "--output=json", p).stdout)["virtual-size"] == 16 << 20
    assert raw_sha256(p) == before
    assert_clean(p)
    sha = file_sha256(p)
    for action in ("-a", "-d"):
        r = qcowrs_cli("snapshot", action, "nope", p)
        q = qemu_img("snapshot", action, "nope", p, check=False)
        assert (r.returncode, q.returncode) == (1, 1)
        verb = "apply" if action == "-a" else "delete"
        assert f"Could not {verb} snapshot 'nope'" in r.stderr
        assert len(r.stderr.splitlines()) == 1
    assert file_sha256(p) == sha
    with pytest.raises(ValueError, match="read-only"):
        qcowrs_mod.QcowFile.open(p, "r+b", snapshot="small")
    with qcowrs_mod.QcowFile.open(p) as f, pytest.raises(qcowrs_mod.ReadOnlyImage):
        f.create_snapshot("x")


# --------------------------------------------------------------------------------------------
# Interrupted at every write and sync


def _op(qcowrs_mod: Any, path: Path, op: str) -> None:
    with qcowrs_mod.QcowFile.open(path, "r+b") as f:
        if op == "create":
            f.create_snapshot("new")
        elif op == "apply":
            f.apply_snapshot("s1")
        else:
            f.delete_snapshot("s1")


@pytest.mark.parametrize("op", ["create", "apply", "delete"])
@pytest.mark.parametrize("kind", ["plain", "v2"])
def test_interrupted_snapshot_operation(
    images: dict[str, Path], tmp_path: Path, qcowrs_mod: Any, fault_hook: Any, kind: str, op: str
) -> None:
    src = twin(images[kind], tmp_path, "src")
    qemu_img("snapshot", "-c", "s1", src)
    ImageBuilder(src.parent).io(src.name, "write -P 0x61 0 64k", "write -P 0x62 3M 64k")
    old = content_digest(src)
    ref = twin(src, tmp_path, "ref")
    n0 = fault_hook._io_ops()
    _op(qcowrs_mod, ref, op)
    total = fault_hook._io_ops() - n0
    new = content_digest(ref)
    assert 0 < total < 3000
    failures = []
    for k in range(total):
        img = twin(src, tmp_path, f"k{k}")
        fault_hook._fail_after_ops(k)
        try:
            _op(qcowrs_mod, img, op)
            failures.append(f"k={k}: no error although operation {k + 1} failed")
        except qcowrs_mod.QcowError:
            pass
        finally:
            fault_hook._fail_after_ops(None)
        with qcowrs_mod.QcowFile.open(img, rebuild=True):
            pass
        r = qemu_img("check", "--output=json", img, check=False)
        if json.loads(r.stdout).get("corruptions", 0) or r.returncode not in (0, 3):
            failures.append(f"k={k}: {r.stdout[:300]}")
        got = content_digest(img)
        if got not in (old, new):
            failures.append(f"k={k}: neither the old nor the new state: {got} vs {old} / {new}")
        shutil.rmtree(img.parent)
    assert not failures, "\n".join(failures)
