"""Hostile and damaged images (issue 8): every generator of `hostile.py` is opened, read, mapped,
checked, compared with itself (plain and strict), repaired and written, each operation in a
child process with a 2 GiB address-space limit and a 20 s timeout. For every one:

* no signal, no PanicException, no hang, peak RSS under 512 MiB;
* every exception is a `qcowrs.QcowError`;
* read-only operations leave the file byte-identical;
* a repair either refuses (a QcowError, the file unchanged) or leaves `qemu-img check` clean,
  every 64 KiB piece of the active disk that read before reads the same after, and the file
  no larger than before plus what the repair must add;
* a write to a valid image keeps `qemu-img check` clean.
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
from conftest import file_sha256, parse_header, requires_qemu
from hostile import GENERATORS, Case

pytestmark = requires_qemu

TIMEOUT = 20
AS_LIMIT = 2 << 30
RSS_LIMIT_KIB = 512 << 10
PIECE = 64 << 10
# Read at most this much of each disk: its start and its allocated ranges.
READ_BUDGET = 96 << 20

CHILD = r"""
import hashlib, json, resource, sys, traceback
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[3]), int(sys.argv[3])))
out = {"ok": True}

def note_exc(stage, e):
    out["ok"] = False
    out["stage"] = stage
    out["exc"] = type(e).__name__
    out["qcow_error"] = isinstance(e, qcowrs.QcowError)
    out["msg"] = str(e)[:500]
    out["tb"] = traceback.format_exc()[-2000:]

try:
    import qcowrs
    path, op = sys.argv[1], sys.argv[2]
    args = sys.argv[4:]
    PIECE = 64 << 10
    BUDGET = int(args[0]) if op == "read" else 0
    if op == "read":
        with qcowrs.QcowFile.open(path) as f:
            size = f.virtual_size
            out["size"] = size
            try:
                ranges = f.allocated_ranges()
                out["ranges"] = len(ranges)
            except Exception as e:
                ranges = []
                out["ranges_exc"] = type(e).__name__
                out["ranges_qcow_error"] = isinstance(e, qcowrs.QcowError)
            spans = [(0, min(size, BUDGET // 2))] + [(s, n) for s, n, _ in ranges]
            pieces, errors, done = {}, {}, 0
            buf = bytearray(PIECE)
            for start, n in spans:
                off = start // PIECE * PIECE
                while off < start + n and done < BUDGET and off < size:
                    if str(off) in pieces or str(off) in errors:
                        off += PIECE
                        continue
                    try:
                        got = f.preadinto(buf, off)
                        pieces[str(off)] = hashlib.sha256(buf[:got]).hexdigest()
                    except Exception as e:
                        errors[str(off)] = type(e).__name__
                        if not isinstance(e, qcowrs.QcowError):
                            raise
                    off += PIECE
                    done += PIECE
            out["pieces"] = pieces
            out["read_errors"] = len(errors)
            out["header"] = f.header.to_dict()["version"]
    elif op == "compare":
        r = qcowrs.compare(path, path, strict=args[0] == "strict")
        out["identical"] = r.identical
    elif op == "check":
        r = qcowrs.check(path)
        out["report"] = r.to_dict()
        out["exit"] = r.exit_code
    elif op == "repair":
        r = qcowrs.check(path, repair="all")
        out["report"] = r.to_dict()
        out["exit"] = r.exit_code
        out["dropped"] = [d.message for d in r.dropped]
    elif op == "write":
        with qcowrs.QcowFile.open(path, mode="r+b") as f:
            f.pwrite(b"\x5a" * 4096, 0)
            f.pwrite(b"\xa5" * 4096, f.virtual_size // 2 // 4096 * 4096)
            f.write_zeroes(0, min(f.virtual_size, 1 << 20) // 512 * 512)
    elif op == "write-close":
        with qcowrs.QcowFile.open(path, mode="r+b") as f:
            f.pwrite(b"\x5a" * 65536, 0)
    elif op == "zeroes-close":
        with qcowrs.QcowFile.open(path, mode="r+b") as f:
            f.write_zeroes(0, f.virtual_size)
    elif op == "readall":
        with qcowrs.QcowFile.open(path) as f:
            out["len"] = len(f.read())
    elif op == "truncate":
        with qcowrs.QcowFile.open(path, mode="r+b") as f:
            f.truncate(int(args[0]))
    else:
        raise SystemExit(f"unknown op {op}")
except BaseException as e:
    note_exc(sys.argv[2], e)
out["maxrss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
sys.stdout.write("\n@@HOSTILE@@" + json.dumps(out))
"""


def run_op(image: Path, op: str, *args: str, rss_limit_kib: int = RSS_LIMIT_KIB) -> dict[str, Any]:
    """Runs one operation in a child; fails the test on a crash, a hang or too much memory."""
    argv = [sys.executable, "-c", CHILD, os.fspath(image), op, str(AS_LIMIT), *args]
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{op} of {image.name} hung (> {TIMEOUT} s)")
    marker = p.stdout.rfind("@@HOSTILE@@")
    crashed = f"{op} of {image.name} crashed (exit {p.returncode})\n{p.stdout[-1500:]}"
    assert p.returncode == 0, f"{crashed}\n{p.stderr[-3000:]}"
    assert marker >= 0, f"{crashed}\n{p.stderr[-3000:]}"
    assert "PanicException" not in p.stderr, p.stderr[-3000:]
    assert "panicked" not in p.stderr, p.stderr[-3000:]
    out: dict[str, Any] = json.loads(p.stdout[marker + len("@@HOSTILE@@") :])
    assert out["maxrss_kib"] < rss_limit_kib, f"{op} of {image.name}: {out['maxrss_kib']} KiB RSS"
    if not out["ok"]:
        assert out["qcow_error"], (
            f"{op} of {image.name} raised {out['exc']}: {out['msg']}\n{out['tb']}"
        )
        assert "PanicException" not in out["exc"]
    if "ranges_exc" in out:
        assert out["ranges_qcow_error"], (
            f"allocated_ranges of {image.name} raised {out['ranges_exc']}"
        )
    return out


def qemu_check_rc(image: Path) -> int | None:
    """`qemu-img check`'s exit code on the image alone (never its backing file, which may be
    the hostile part), or None if QEMU itself hangs on it."""
    spec = {
        "driver": "qcow2",
        "backing": None,
        "file": {"driver": "file", "filename": os.fspath(image)},
    }
    try:
        p = subprocess.run(
            ["qemu-img", "check", "-U", "json:" + json.dumps(spec)],
            capture_output=True,
            timeout=60,
            check=False,
            cwd=image.parent,  # QEMU resolves a relative data file name from here
        )
    except subprocess.TimeoutExpired:
        return None
    return p.returncode


def repair_allowance(image: Path) -> int:
    """What a repair may add to a file: a new refcount structure, L1 table and snapshot table
    (a few clusters each), and the refblocks the file needs."""
    try:
        cs = parse_header(image)["cluster_size"]
    except Exception:
        cs = 64 << 10
    cs = min(max(cs, 512), 2 << 20)
    size = image.stat().st_size
    return 48 * cs + size // 64


def copy_case(case: Case, name: str) -> Path:
    dst = case.image.with_name(f"{name}-{case.image.name}")
    shutil.copyfile(case.image, dst)
    return dst


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_hostile_image(name: str, tmp_path: Path) -> None:
    case = GENERATORS[name](tmp_path)
    img = case.image
    before = file_sha256(img)
    size_before = img.stat().st_size

    read = run_op(img, "read", str(READ_BUDGET))
    check = run_op(img, "check")
    compared = [run_op(img, "compare", mode) for mode in ("plain", "strict")]
    assert file_sha256(img) == before, "a read-only operation changed the file"
    if case.valid:
        assert read["ok"], read
        assert check["ok"], check
        assert check["exit"] == 0, check
        assert all(c["ok"] and c["identical"] for c in compared), compared

    # A repair: refused cleanly, or clean and nothing readable lost.
    rep = copy_case(case, "repair")
    rep_before = file_sha256(rep)
    fixed = run_op(rep, "repair")
    if not fixed["ok"]:
        assert file_sha256(rep) == rep_before, f"a refused repair changed the file: {fixed}"
    else:
        rc = qemu_check_rc(rep)
        # None: QEMU itself cannot check the image (it hangs on a FIFO data file).
        assert rc in (0, None), f"qemu-img check exits {rc} after the repair: {fixed}"
        assert fixed["exit"] == 0, fixed
        grown = rep.stat().st_size - size_before
        assert grown <= repair_allowance(img), f"the repair grew the file by {grown} bytes"
        after = run_op(rep, "read", str(READ_BUDGET))
        if read["ok"]:
            assert after["ok"], f"the repaired image does not open: {after}"
        lost = {
            off: h
            for off, h in read.get("pieces", {}).items()
            if after.get("pieces", {}).get(off) != h
        }
        assert not lost, f"the repair changed {len(lost)} readable pieces, e.g. {list(lost)[:4]}"

    # A write (refused cleanly on damaged images).
    wr = copy_case(case, "write")
    wrote = run_op(wr, "write")
    if case.valid:
        assert wrote["ok"], wrote
        assert qemu_check_rc(wr) in (0, None), "a write broke a valid image"
    for op in case.extra_ops:
        tgt = copy_case(case, op[0])
        tgt_before = file_sha256(tgt)
        limit = 4 * RSS_LIMIT_KIB if op[0] == "readall" else RSS_LIMIT_KIB  # read() returns it all
        done = run_op(tgt, *op, rss_limit_kib=limit)
        if not done["ok"]:
            assert file_sha256(tgt) == tgt_before, f"a refused {op} changed the file: {done}"
            continue
        if op[0] == "readall":
            assert done["len"] == read["size"]
        if case.valid:
            assert qemu_check_rc(tgt) in (0, 3, None), f"{op} broke a valid image"
        if op[0] in ("write-close", "zeroes-close"):
            # Nothing but what was written changed (no bitmap set bits in guest data or the
            # L1 table), as qcowrs and QEMU read it.
            now = run_op(tgt, "read", str(READ_BUDGET))
            assert now["ok"], now
            zero = hashlib.sha256(bytes(PIECE)).hexdigest()
            ones = hashlib.sha256(b"\x5a" * PIECE).hexdigest()
            for off, h in read.get("pieces", {}).items():
                want = zero if op[0] == "zeroes-close" else (ones if off == "0" else h)
                assert now["pieces"].get(off) == want, f"{op} changed guest bytes at {off}"


def test_enough_generators() -> None:
    assert len(GENERATORS) >= 60
