"""`qcowrs check` / `qcowrs rebuild` on the command line, against `qemu-img check`.

  * exit codes: 0 clean, 2 corruptions, 3 leaks only, 1 when `-r leaks` meets an image that
    needs a refcount rebuild; each scenario is first confirmed to give that code with qemu-img;
  * `--json` prints qemu-img's JSON (same keys, same values; keys that are 0 left out,
    `check-errors` always present) plus "filename" and "format": "qcow2";
  * `rebuild` leaves an image qemu-img calls clean, with unchanged content;
  * `check` without -r never changes a byte of any corrupted image.

The images come from test_rebuild's bases and corruptions (the same poked images).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    assert_qemu_clean,
    content_digest,
    file_sha256,
    qemu_check,
    requires_qemu,
)
from test_rebuild import CASES, BaseImage, Case, base_cache, info_data, make_corrupt

pytestmark = requires_qemu

COMPARED_KEYS = (
    "check-errors",
    "corruptions",
    "leaks",
    "corruptions-fixed",
    "leaks-fixed",
    "total-clusters",
    "allocated-clusters",
    "image-end-offset",
    "fragmented-clusters",
    "compressed-clusters",
)

# (base, corruption, key) -> why qcowrs's --json value may differ from qemu-img's. A case where
# qemu-img cannot open the image at all (exit 1, no JSON) is handled by a generic rule below.
INTENDED_JSON_DIFFERENCES: dict[tuple[str, str, str], str] = {}


@pytest.fixture(scope="module")
def cli_bases(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], BaseImage]:
    return base_cache(tmp_path_factory.mktemp("cli-bases"))


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    from qcowrs.cli import main

    capsys.readouterr()
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def corrupt(
    cli_bases: Callable[[str], BaseImage], base: str, corruption: str, dst: Path
) -> tuple[BaseImage, Path]:
    b = cli_bases(base)
    return b, make_corrupt(b, corruption, dst)


# --------------------------------------------------------------------------------------------
# Exit codes


@pytest.mark.parametrize(
    ("base", "corruption", "code"),
    [
        ("v3", "as_built", 0),
        ("snapshots", "as_built", 0),
        ("v3", "data_zero", 2),  # refcount 0 of a referenced cluster (+ OFLAG_COPIED)
        ("snapshots", "shared_lowered", 2),  # 0 < refcount < references
        ("v3", "leak_cluster0", 3),
        ("v3", "orphans", 3),
        ("v2", "leak_cluster0", 3),
    ],
)
def test_check_exit_codes(
    cli_bases: Callable[[str], BaseImage],
    qcowrs_mod: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    base: str,
    corruption: str,
    code: int,
) -> None:
    _, img = corrupt(cli_bases, base, corruption, tmp_path / "img.qcow2")
    qrc, _, _ = qemu_check(img)
    assert qrc == code, f"scenario bug: qemu-img check exits {qrc}, not {code}"
    before = file_sha256(img)
    rc, out, _ = run_main(capsys, "check", str(img))
    assert rc == code
    assert out.strip(), "check printed nothing on stdout"
    assert file_sha256(img) == before


@pytest.mark.parametrize(
    ("base", "corruption"),
    [("v3", "cluster0_zero"), ("c512", "later_reftable_entry_zero"), ("lazy_abort", "as_built")],
)
def test_repair_leaks_needing_a_rebuild_exits_1(
    cli_bases: Callable[[str], BaseImage],
    qcowrs_mod: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    base: str,
    corruption: str,
) -> None:
    b, img = corrupt(cli_bases, base, corruption, tmp_path / "img.qcow2")
    scratch = tmp_path / "q.qcow2"
    shutil.copyfile(img, scratch)
    qrc, _, qerr = qemu_check(scratch, "leaks")
    assert qrc == 1, f"scenario bug: qemu-img check -r leaks exits {qrc}: {qerr}"
    assert "need to rebuild" in qerr
    rc, _, err = run_main(capsys, "check", str(img), "-r", "leaks")
    assert rc == 1
    assert "rebuild" in err.lower(), f"stderr does not say a rebuild is needed: {err!r}"
    assert content_digest(img) == b.digest


@pytest.mark.parametrize(
    ("base", "corruption", "repair"),
    [
        ("v3", "leak_cluster0", "leaks"),
        ("v3", "orphans", "leaks"),
        ("v3", "leak_data", "leaks"),  # the COPIED fix follows once the leak is gone
        ("snapshots", "shared_lowered", "all"),
        ("v3", "cluster0_zero", "all"),
        ("c512", "later_reftable_entry_zero", "all"),
    ],
)
def test_repair_exit_code_and_json_match_qemu(
    cli_bases: Callable[[str], BaseImage],
    qcowrs_mod: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    base: str,
    corruption: str,
    repair: str,
) -> None:
    b, img = corrupt(cli_bases, base, corruption, tmp_path / "img.qcow2")
    scratch = tmp_path / "q.qcow2"
    shutil.copyfile(img, scratch)
    qrc, q, qerr = qemu_check(scratch, repair)
    rebuilt = "Rebuilding refcount structure" in qerr
    rc, out, _ = run_main(capsys, "check", str(img), "-r", repair, "--json")
    assert rc == qrc
    got = json.loads(out)
    assert got["format"] == "qcow2"
    assert got["filename"] == str(img)
    want = {k: v for k, v in q.items() if k not in ("filename", "format")}
    got = {k: v for k, v in got.items() if k not in ("filename", "format")}
    if rebuilt:
        # placement of the new structure (image-end-offset) and the leak figures of the
        # post-rebuild pass depend on the allocator; everything else is QEMU's
        for k in ("image-end-offset", "leaks-fixed"):
            got.pop(k, None)
            want.pop(k, None)
        assert got.get("corruptions-fixed", 0) > 0
        got.pop("corruptions-fixed", None)
        want.pop("corruptions-fixed", None)
    assert got == want, f"qcowrs {got}\nqemu   {want}"
    assert_qemu_clean(img, f"after check -r {repair}")
    assert content_digest(img) == b.digest


# --------------------------------------------------------------------------------------------
# --json equals qemu-img's JSON, and check never writes, for every corrupted image


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_json_matches_qemu_and_file_untouched(
    case: Case,
    cli_bases: Callable[[str], BaseImage],
    qcowrs_mod: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, img = corrupt(cli_bases, case.base, case.corruption, tmp_path / "img.qcow2")
    qrc, q, _ = qemu_check(img)
    before = file_sha256(img)
    rc, out, _ = run_main(capsys, "check", str(img), "--json")
    assert file_sha256(img) == before, "check --json modified the file"
    report = qcowrs_mod.check(img)
    assert file_sha256(img) == before, "qcowrs.check(path) modified the file"

    got = json.loads(out)
    assert got.pop("format") == "qcow2"
    assert got.pop("filename") == str(img)
    assert got == report.to_dict(), "--json differs from CheckReport.to_dict()"
    assert "check-errors" in got
    assert all(v != 0 for k, v in got.items() if k != "check-errors"), f"zero-valued key: {got}"
    assert rc == report.exit_code

    if not q:  # qemu-img could not open it: qcowrs must still report it broken
        assert qrc == 1
        assert rc in (1, 2), got
        return
    want = {k: v for k, v in q.items() if k not in ("filename", "format")}
    assert set(got) - set(COMPARED_KEYS) == set(), f"unexpected keys {set(got)}"
    diffs = []
    for k in COMPARED_KEYS:
        if got.get(k) != want.get(k):
            reason = INTENDED_JSON_DIFFERENCES.get((case.base, case.corruption, k))
            if reason is None:
                diffs.append(f"{k}: qcowrs {got.get(k)} qemu {want.get(k)}")
    assert not diffs, f"{case.id}: " + "; ".join(diffs)
    assert rc == qrc


# --------------------------------------------------------------------------------------------
# rebuild


@pytest.mark.parametrize(
    ("base", "corruption"),
    [
        ("v3", "cluster0_zero"),
        ("v3", "as_built"),  # a clean image: rebuilding anyway keeps it clean
        ("snapshots", "refblock0_zeroed"),
        ("c512", "later_reftable_entry_zero"),
        ("lazy_abort", "as_built"),
        ("v2", "no_reftable"),
    ],
)
def test_rebuild_command(
    cli_bases: Callable[[str], BaseImage],
    qcowrs_mod: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    base: str,
    corruption: str,
) -> None:
    b, img = corrupt(cli_bases, base, corruption, tmp_path / "img.qcow2")
    rc, _, err = run_main(capsys, "rebuild", str(img))
    assert rc == 0, err
    assert_qemu_clean(img, "after qcowrs rebuild")
    assert content_digest(img) == b.digest
    assert info_data(img).get("lazy-refcounts") == b.info.get("lazy-refcounts")


def test_python_m_qcowrs_entry_point(
    cli_bases: Callable[[str], BaseImage], qcowrs_mod: Any, tmp_path: Path
) -> None:
    """The real command line in a child process: exit codes and JSON on stdout."""
    b, img = corrupt(cli_bases, "v3", "cluster0_zero", tmp_path / "img.qcow2")
    env = dict(os.environ)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "qcowrs", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env=env,
        )

    qrc, q, _ = qemu_check(img)
    p = cli("check", str(img), "--json")
    assert p.returncode == qrc == 2, p.stderr
    got = json.loads(p.stdout)
    assert got["corruptions"] == q["corruptions"]
    p = cli("check", str(img), "-r", "leaks")
    assert p.returncode == 1, p.stderr
    p = cli("rebuild", str(img))
    assert p.returncode == 0, p.stderr
    p = cli("check", str(img))
    assert p.returncode == 0, p.stdout + p.stderr
    assert_qemu_clean(img, "after python -m qcowrs rebuild")
    assert content_digest(img) == b.digest


def test_check_missing_file_exits_1(
    qcowrs_mod: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, _, err = run_main(capsys, "check", str(tmp_path / "nope.qcow2"))
    assert rc == 1
    assert err.strip()
