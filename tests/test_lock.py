"""Image locking: qcowrs takes QEMU's OFD byte locks, so QEMU and qcowrs refuse to write an
image the other one has open (as two QEMU processes do), and read-only users without -U are
kept out while a writer is active."""

from __future__ import annotations

import errno
import subprocess
from pathlib import Path

import pytest
import qcowrs
from conftest import held_by_qemu_io, qemu_img, requires_qemu

pytestmark = requires_qemu


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "lock.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(p), "16M")
    return p


def _qemu_io(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-io", *args], capture_output=True, text=True, check=False)


def test_qemu_writer_keeps_qcowrs_out(image: Path) -> None:
    with held_by_qemu_io(image):
        with pytest.raises(qcowrs.QcowError) as info:
            qcowrs.QcowFile.open(image, mode="r+b")
        err = info.value
        assert err.errno == errno.EAGAIN
        assert "in use" in str(err)
        with pytest.raises(qcowrs.QcowError, match="in use"):
            qcowrs.QcowFile.open(image, mode="rb")
        with pytest.raises(qcowrs.QcowError, match="in use"):
            qcowrs.check(image, repair="all")
    # Once QEMU is gone the image opens again.
    qcowrs.QcowFile.open(image, mode="r+b").close()


def test_qcowrs_writer_keeps_qemu_out(image: Path) -> None:
    with qcowrs.QcowFile.open(image, mode="r+b") as f:
        f.write(b"x" * 4096)
        r = _qemu_io("-c", "write -P 1 0 512", str(image))
        assert r.returncode != 0
        assert "lock" in (r.stderr + r.stdout)
        info = subprocess.run(["qemu-img", "info", str(image)], capture_output=True, text=True)
        assert info.returncode != 0, "qemu-img info (no -U) must not read an image being written"
        shared = subprocess.run(
            ["qemu-img", "info", "-U", str(image)], capture_output=True, text=True
        )
        assert shared.returncode == 0, shared.stderr
    assert _qemu_io("-c", "write -P 1 0 512", str(image)).returncode == 0


def test_two_qcowrs_writers_conflict_but_readers_share(image: Path) -> None:
    with qcowrs.QcowFile.open(image, mode="r+b"):
        with pytest.raises(qcowrs.QcowError, match="in use"):
            qcowrs.QcowFile.open(image, mode="r+b")
    with qcowrs.QcowFile.open(image, mode="rb") as a, qcowrs.QcowFile.open(image, mode="rb") as b:
        assert a.read(16) == b.read(16)
        with pytest.raises(qcowrs.QcowError, match="in use"):
            qcowrs.QcowFile.open(image, mode="r+b")


def test_open_image_checks_and_rebuilds_through_its_own_handle(image: Path) -> None:
    with qcowrs.QcowFile.open(image, mode="r+b") as f:
        f.write(b"y" * 70000)
        assert f.check().is_clean
        r = f.rebuild_refcounts()
        assert r.rebuilt
        assert r.is_clean
        f.seek(0)
        assert f.read(70000) == b"y" * 70000
    out = subprocess.run(["qemu-img", "check", str(image)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
