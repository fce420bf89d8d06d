"""The three damaged images of issue 8, where `qcowrs.check()` used to raise and QEMU's own
repair fails: a snapshot table at offset 0 claiming 65536 snapshots, a file cut after its
512-byte header (L1 table and refcount structure past the end), an L1 table pointed past the end
of the file. Each image comes from its generator in `hostile.py`.

* `check` reports with qemu-img's exit code and counts (Python and CLI);
* `check(repair="all")`, `qcowrs check -r all` and `open(rebuild=True)` leave each image
  `qemu-img check` clean, with the active disk reading exactly as it read before (through QEMU
  where QEMU can read the damaged image, else through qcowrs), and list what they dropped;
* QEMU's own `check -r all` does not get there (the reason qcowrs goes further).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    assert_qemu_clean,
    qcowrs_sha256,
    qemu_check,
    raw_bytes,
    raw_sha256,
    requires_qemu,
)
from hostile import GENERATORS

pytestmark = requires_qemu

DAMAGED = ["snapshot_table_at_zero_65536", "file_cut_after_header", "l1_past_eof"]
COUNTS = ("check-errors", "corruptions", "leaks")


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "qcowrs", *(str(a) for a in args)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def readable_content(img: Path) -> str:
    """sha256 of the active disk before the repair: QEMU's view if QEMU can open the image,
    else qcowrs' own (which reads an image whose only damage is its snapshot table)."""
    rc, _, _ = qemu_check(img)
    try:
        return raw_sha256(img)
    except AssertionError:
        assert rc == 1, "qemu-img check opens the image but qemu-img convert does not"
        return qcowrs_sha256(img)


@pytest.fixture(params=DAMAGED)
def damaged(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    return GENERATORS[request.param](tmp_path).image


def test_check_reports_like_qemu(damaged: Path, qcowrs_mod: Any) -> None:
    qrc, qjson, _ = qemu_check(damaged)
    r = qcowrs_mod.check(damaged)
    assert r.exit_code == qrc, (r.to_dict(), qrc, qjson)
    ours = r.to_dict()
    for k in COUNTS:
        if k in qjson:
            assert ours.get(k, 0) == qjson[k], (k, ours, qjson)
    if qrc == 1:
        # QEMU fails the check outright; so does ours, with a check error that says why.
        assert r.check_errors >= 1
    assert r.problems, "a damaged image with no problem listed"

    p = cli("check", "--json", damaged)
    assert p.returncode == qrc, p.stderr
    assert "Traceback" not in p.stderr
    out = json.loads(p.stdout)
    for k in COUNTS:
        assert out.get(k, 0) == ours.get(k, 0), (k, out, ours)


def test_repair_leaves_clean_and_keeps_content(damaged: Path, qcowrs_mod: Any) -> None:
    before = readable_content(damaged)
    size = damaged.stat().st_size

    r = qcowrs_mod.check(damaged, repair="all")
    assert r.exit_code == 0, r.to_dict()
    assert r.dropped, "the repair changed structure but lists nothing it dropped"
    for p in r.dropped:
        assert p.kind
        assert p.message
    assert_qemu_clean(damaged, "after check(repair='all')")
    assert qcowrs_mod.check(damaged).is_clean
    assert raw_sha256(damaged) == before, "the repair changed the readable content"
    # A few clusters for a moved L1 table / new refcount structure, never more.
    assert damaged.stat().st_size <= max(size, 64 << 10) + 4 * (64 << 10)


def test_cli_repair_lists_what_it_dropped(damaged: Path) -> None:
    before = readable_content(damaged)
    p = cli("check", "-r", "all", damaged)
    assert p.returncode == 0, (p.stdout, p.stderr)
    assert "The repair dropped or changed:" in p.stdout, p.stdout
    assert "Traceback" not in p.stderr
    assert "No errors were found on the image." in p.stdout
    assert_qemu_clean(damaged, "after qcowrs check -r all")
    assert raw_sha256(damaged) == before


def test_open_rebuild_repairs(damaged: Path, qcowrs_mod: Any) -> None:
    try:
        before = raw_bytes(damaged)
    except AssertionError:
        with qcowrs_mod.QcowFile.open(damaged) as f:
            before = f.read()
    with qcowrs_mod.QcowFile.open(damaged, mode="r+b", rebuild=True) as f:
        f.pwrite(b"\x5a" * 4096, 0)
    assert_qemu_clean(damaged, "after open(rebuild=True) and a write")
    after = raw_bytes(damaged)
    assert len(after) == len(before)
    assert after[:4096] == b"\x5a" * 4096
    assert after[4096:] == before[4096:], "open(rebuild=True) changed the readable content"


def test_qemu_repair_does_not_get_there(damaged: Path, tmp_path: Path) -> None:
    """Why qcowrs goes further: after QEMU's `check -r all` the image is still not clean (or
    QEMU could not repair it at all)."""
    copy = tmp_path / "qemu-repair.qcow2"
    shutil.copyfile(damaged, copy)
    rrc, _, _ = qemu_check(copy, repair="all")
    rc, data, _ = qemu_check(copy)
    clean = rrc == 0 and rc == 0 and not data.get("corruptions") and not data.get("leaks")
    assert not clean, f"QEMU now repairs this image (exit {rrc}, then {rc}: {data})"
