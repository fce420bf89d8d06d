"""`qcowrs rebase` / `qcowrs.rebase` against `qemu-img rebase` on the same chains.

Safe rebase onto another base, onto a deeper image of the chain, onto a raw base and onto no
backing file, for overlays of several kinds: the guest content is unchanged and equals
qemu-img's result, `qemu-img check` is clean, `info` names the same backing file and format,
and the overlay holds what qemu-img's holds (same map). Unsafe rebase changes the header only.
qemu-img's refusals, one line each, files unchanged. A rebase failed at every write or sync
(the fault-injection hook) leaves the guest content unchanged and at most leaks.
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


def chain(d: Path, kind: str) -> tuple[Path, list[str]]:
    """Builds a chain in `d`; returns the top image and rebase targets (name, format)."""
    b = ImageBuilder(d)
    opts: dict[str, Any] = {"extl2": {"extended_l2": "on"}, "c512": {"cluster_size": 512}}.get(
        kind, {}
    )
    b.create("b1.qcow2", "8M", **opts)
    c = "-c " if kind == "compressed" else ""
    b.io("b1.qcow2", f"write {c}-P 1 0 4M", f"write {c}-P 3 6M 1M", "write -z 5M 64k")
    b.create("b2.qcow2", "8M", **opts)
    b.io("b2.qcow2", "write -P 1 0 2M", "write -P 2 2M 1M", "write -P 3 6M 512k")
    b.create("b2.raw", "6M", fmt="raw")
    b.io("b2.raw", "write -P 1 0 1M", "write -P 4 5M 1M", fmt="raw")
    b.create("mid.qcow2", backing="b1.qcow2", **opts)
    b.io("mid.qcow2", "write -P 7 3M 512k")
    b.create("top.qcow2", backing="mid.qcow2", **opts)
    b.io("top.qcow2", "write -P 9 1M 64k", "write -z 6M 64k", "write -P 8 7M 4k")
    return b.path("top.qcow2"), ["b2.qcow2:qcow2", "b1.qcow2:qcow2", "b2.raw:raw", ":"]


def qcowrs_cli(
    *args: str | os.PathLike[str], cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "qcowrs", *map(os.fspath, args)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False, cwd=cwd)


def info(p: Path) -> dict[str, Any]:
    return dict(json.loads(qemu_img("info", "--output=json", p).stdout))


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def chains(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for kind in ("plain", "compressed", "extl2", "c512"):
        d = tmp_path_factory.mktemp(f"rb-{kind}")
        out[kind] = chain(d, kind)[0].parent
    return out


TARGETS = ["b2.qcow2:qcow2", "b1.qcow2:qcow2", "b2.raw:raw", ":"]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("kind", ["plain", "compressed", "extl2", "c512"])
def test_safe_rebase_equals_qemu(
    chains: dict[str, Path], tmp_path: Path, kind: str, target: str
) -> None:
    name, fmt = target.split(":")
    ours = copy_dir(chains[kind], tmp_path / "o")
    theirs = copy_dir(chains[kind], tmp_path / "q")
    before = raw_sha256(ours / "top.qcow2")
    args = ["-b", name] + (["-F", fmt] if fmt else [])
    r = qcowrs_cli("rebase", *args, "top.qcow2", cwd=ours)
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    qemu_img("rebase", *args, "top.qcow2", cwd=theirs)
    assert raw_sha256(ours / "top.qcow2") == before
    assert raw_sha256(theirs / "top.qcow2") == before
    c = qemu_img("check", ours / "top.qcow2", check=False)
    assert c.returncode == 0, c.stdout
    keys = ["backing-filename", "backing-filename-format", "full-backing-filename", "virtual-size"]
    mine, qemus = info(ours / "top.qcow2"), info(theirs / "top.qcow2")
    assert {k: mine[k] for k in keys if k in mine} == {
        k: (str(v).replace(str(theirs), str(ours)) if isinstance(v, str) else v)
        for k, v in qemus.items()
        if k in keys
    }

    def own(p: Path) -> list[tuple[int, int, bool, bool]]:
        m = json.loads(qemu_img("map", "--output=json", p).stdout)
        return [(e["start"], e["length"], e["data"], e["zero"]) for e in m if e["depth"] == 0]

    # The overlay holds no more than qemu-img's (qemu-img copies in larger runs with small
    # clusters; qcowrs copies exactly the clusters that differ).
    def held(p: Path) -> int:
        return sum(n for _, n, data, _ in own(p) if data)

    assert held(ours / "top.qcow2") <= held(theirs / "top.qcow2")


def test_unsafe_rebase_changes_only_the_header(chains: dict[str, Path], tmp_path: Path) -> None:
    ours = copy_dir(chains["plain"], tmp_path / "o")
    theirs = copy_dir(chains["plain"], tmp_path / "q")
    for d, run in ((ours, qcowrs_cli), (theirs, None)):
        args = ["rebase", "-u", "-b", "nothere.qcow2", "-F", "qcow2", "top.qcow2"]
        if run is None:
            qemu_img(*args, cwd=d)
        else:
            assert run(*args, cwd=d).returncode == 0
    # The header cluster as qemu-img writes it (backing name and format), byte for byte.
    assert (ours / "top.qcow2").read_bytes()[:65536] == (theirs / "top.qcow2").read_bytes()[:65536]
    # The clusters are untouched: everything past the header cluster is byte-identical.
    assert (ours / "top.qcow2").read_bytes()[65536:] == (theirs / "top.qcow2").read_bytes()[65536:]
    # And back onto the real base, unsafe: the original guest content.
    assert (
        qcowrs_cli(
            "rebase", "-u", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2", cwd=ours
        ).returncode
        == 0
    )
    assert raw_sha256(ours / "top.qcow2") == raw_sha256(chains["plain"] / "top.qcow2")
    assert qemu_img("check", ours / "top.qcow2", check=False).returncode == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["-b", "b2.qcow2"],
            "Could not change the backing file to 'b2.qcow2': backing format must be specified",
        ),
        ([], "Must specify backing file (-b) or use unsafe mode (-u)"),
        (["-b", "nothere.qcow2", "-F", "qcow2"], "Could not open new backing file 'nothere.qcow2'"),
    ],
)
def test_refusals(chains: dict[str, Path], tmp_path: Path, args: list[str], message: str) -> None:
    d = copy_dir(chains["plain"], tmp_path / "o")
    before = (d / "top.qcow2").read_bytes()
    r = qcowrs_cli("rebase", *args, "top.qcow2", cwd=d)
    assert r.returncode == 1
    assert len(r.stderr.splitlines()) == 1
    assert message in r.stderr
    assert (d / "top.qcow2").read_bytes() == before
    assert qemu_img("rebase", *args, "top.qcow2", cwd=d, check=False).returncode == 1


def test_api_and_progress(chains: dict[str, Path], tmp_path: Path, qcowrs_mod: Any) -> None:
    d = copy_dir(chains["plain"], tmp_path / "o")
    before = raw_sha256(d / "top.qcow2")
    calls: list[tuple[int, int]] = []
    qcowrs_mod.rebase(d / "top.qcow2", None, progress=lambda a, b: calls.append((a, b)))
    assert raw_sha256(d / "top.qcow2") == before
    assert "backing-filename" not in info(d / "top.qcow2")
    assert calls
    assert calls[-1][0] == calls[-1][1] > 0


def test_interrupted_rebase(
    chains: dict[str, Path], tmp_path: Path, qcowrs_mod: Any, fault_hook: Any
) -> None:
    src = chains["c512"]
    before = raw_sha256(src / "top.qcow2")
    ref = copy_dir(src, tmp_path / "ref")
    n0 = fault_hook._io_ops()
    qcowrs_mod.rebase(ref / "top.qcow2", "b2.qcow2", "qcow2")
    total = fault_hook._io_ops() - n0
    assert 0 < total < 20000
    failures = []
    ks = sorted(
        {round(i * (total - 1) / 59) for i in range(60)} | set(range(min(total, 10))) | {total - 1}
    )
    for k in ks:
        d = copy_dir(src, tmp_path / f"k{k}")
        fault_hook._fail_after_ops(k)
        try:
            qcowrs_mod.rebase(d / "top.qcow2", "b2.qcow2", "qcow2")
            failures.append(f"k={k}: no error")
        except qcowrs_mod.QcowError:
            pass
        finally:
            fault_hook._fail_after_ops(None)
        with qcowrs_mod.QcowFile.open(d / "top.qcow2", rebuild=True):
            pass
        r = qemu_img("check", "--output=json", d / "top.qcow2", check=False)
        if json.loads(r.stdout).get("corruptions", 0) or r.returncode not in (0, 3):
            failures.append(f"k={k}: {r.stdout[:200]}")
        if raw_sha256(d / "top.qcow2") != before:
            failures.append(f"k={k}: the guest content changed")
        shutil.rmtree(d)
    assert not failures, "\n".join(failures)
