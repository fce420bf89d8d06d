"""Persistent dirty bitmaps: writes through qcowrs are recorded in every enabled bitmap (what
QEMU itself reads back through qemu-nbd), disabled bitmaps are left alone, and a writer that
dies before closing leaves its bitmaps flagged in-use (inconsistent), never silently stale."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import qcowrs
from conftest import qemu_img, qemu_io, requires_qemu

pytestmark = [
    requires_qemu,
    pytest.mark.skipif(shutil.which("qemu-nbd") is None, reason="qemu-nbd not installed"),
]

MiB = 1 << 20


def dirty_ranges(image: Path, bitmap: str, tmp: Path) -> list[tuple[int, int]]:
    """The dirty ranges of `bitmap` as QEMU reports them (qemu-nbd -B, then qemu-img map with
    x-dirty-bitmap, where dirty areas appear as data=false)."""
    sock = tmp / f"nbd-{bitmap}.sock"
    srv = subprocess.Popen(
        ["qemu-nbd", "-r", "-B", bitmap, "-f", "qcow2", "-k", str(sock), str(image)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert srv.poll() is None, srv.stderr.read() if srv.stderr else ""
            assert time.monotonic() < deadline, "qemu-nbd did not start"
            time.sleep(0.02)
        opts = (
            f"driver=nbd,server.type=unix,server.path={sock},"
            f"x-dirty-bitmap=qemu:dirty-bitmap:{bitmap}"
        )
        out = subprocess.run(
            ["qemu-img", "map", "--output=json", "--image-opts", opts],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    finally:
        srv.terminate()
        srv.wait(10)
        if srv.stderr is not None:
            srv.stderr.close()
    return [(e["start"], e["length"]) for e in json.loads(out) if not e["data"]]


def bitmap_flags(image: Path) -> dict[str, list[str]]:
    info = json.loads(qemu_img("info", "--output=json", str(image)).stdout)
    bms = info["format-specific"]["data"].get("bitmaps", [])
    return {b["name"]: b["flags"] for b in bms}


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "bm.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(p), "64M")
    qemu_io(p, "write -P 1 0 1M")
    qemu_img("bitmap", "--add", str(p), "on")
    qemu_img("bitmap", "--add", "--disable", str(p), "off")
    qemu_io(p, "write -P 2 8M 64k")  # recorded by QEMU in "on" only
    return p


def test_writes_are_recorded_as_qemu_reads_them(image: Path, tmp_path: Path) -> None:
    assert dirty_ranges(image, "on", tmp_path) == [(8 * MiB, 64 << 10)]
    with qcowrs.QcowFile.open(image, mode="r+b") as f:
        f.seek(40 * MiB)
        f.write(b"z" * 100_000)  # two 64 KiB granules
        f.write_zeroes(44 * MiB + 5, 10)
        f.discard(50 * MiB, MiB)
        assert "in-use" in bitmap_flags_shared(image)["on"]
    assert dirty_ranges(image, "on", tmp_path) == [
        (8 * MiB, 64 << 10),
        (40 * MiB, 128 << 10),
        (44 * MiB, 64 << 10),
        (50 * MiB, MiB),
    ]
    assert dirty_ranges(image, "off", tmp_path) == []
    assert bitmap_flags(image) == {"on": ["auto"], "off": []}
    check = subprocess.run(["qemu-img", "check", str(image)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def bitmap_flags_shared(image: Path) -> dict[str, list[str]]:
    info = json.loads(qemu_img("info", "-U", "--output=json", str(image)).stdout)
    return {b["name"]: b["flags"] for b in info["format-specific"]["data"]["bitmaps"]}


def test_writer_killed_before_close_leaves_bitmap_in_use(image: Path) -> None:
    script = (
        "import qcowrs, sys, time\n"
        "f = qcowrs.QcowFile.open(sys.argv[1], mode='r+b')\n"
        "f.seek(30 << 20); f.write(b'k' * 70000); f.flush()\n"
        "print('WRITTEN', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, os.fspath(image)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "WRITTEN"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
    # The bitmap may miss the write, so it must say it cannot be trusted.
    assert "in-use" in bitmap_flags(image)["on"]
    assert bitmap_flags(image)["off"] == []
