"""The FUSE export (`qcowrs mount`): the guest disk as one raw file over a regular file.

Each test mounts in a background process (`python -m qcowrs mount ...`), waits until the
mountpoint has the virtual size, runs ordinary clients on it (sha256sum, mkfs.ext4, e2fsck,
debugfs, fallocate, dd), unmounts with `fusermount3 -u` (or a signal) and checks that the
process exited 0 and that QEMU finds the image clean with the expected contents.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    ImageBuilder,
    file_sha256,
    merge,
    qemu_img,
    qemu_info,
    qemu_io,
    qemu_map,
    raw_bytes,
    raw_sha256,
    run,
)

FUSERMOUNT = shutil.which("fusermount3")
HAVE_FUSE = os.path.exists("/dev/fuse") and FUSERMOUNT is not None
E2FS = all(shutil.which(t) for t in ("mkfs.ext4", "e2fsck", "debugfs"))

pytestmark = pytest.mark.skipif(
    not HAVE_FUSE, reason="FUSE unavailable: /dev/fuse or fusermount3 (package fuse3) missing"
)
requires_e2fs = pytest.mark.skipif(not E2FS, reason="e2fsprogs (mkfs.ext4/e2fsck/debugfs) missing")

MOUNT_TIMEOUT = 20.0
MiB = 1 << 20


def _is_mounted(mountpoint: Path) -> bool:
    return os.stat(mountpoint).st_dev != os.stat(mountpoint.parent).st_dev


def _start(image: Path, mountpoint: Path, size: int, *, rw: bool) -> subprocess.Popen[bytes]:
    """Starts `qcowrs mount` in the background; returns once the disk is served."""
    mountpoint.touch()
    argv = [sys.executable, "-m", "qcowrs", "mount", *(["--rw"] if rw else []), image, mountpoint]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while not (_is_mounted(mountpoint) and os.stat(mountpoint).st_size == size):
        if proc.poll() is not None:
            _, err = proc.communicate()
            raise AssertionError(f"qcowrs mount exited {proc.returncode}: {err.decode()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("qcowrs mount did not serve the disk in time")
        time.sleep(0.05)
    return proc


def _finish(proc: subprocess.Popen[bytes]) -> None:
    """Waits for the mount process to end; it must exit 0 with nothing on stderr."""
    _, err = proc.communicate(timeout=MOUNT_TIMEOUT)
    assert proc.returncode == 0, err.decode()
    assert err == b""


def _unmount(mountpoint: Path, proc: subprocess.Popen[bytes]) -> None:
    run([FUSERMOUNT or "fusermount3", "-u", mountpoint])
    _finish(proc)
    assert not _is_mounted(mountpoint)


@contextlib.contextmanager
def mounted(image: Path, *, rw: bool = False) -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    """The image mounted over `<image>.mnt`; unmounted (and the exit checked) at the end unless
    the test did it; on a failure the mount is detached and the process killed."""
    mountpoint = image.with_suffix(".mnt")
    size = int(qemu_info(image)["virtual-size"])
    proc = _start(image, mountpoint, size, rw=rw)
    try:
        yield mountpoint, proc
    except BaseException:
        subprocess.run([FUSERMOUNT or "fusermount3", "-u", "-z", mountpoint], check=False)
        proc.kill()
        proc.wait()
        raise
    if proc.poll() is None:
        _unmount(mountpoint, proc)


def _sha256_of(path: Path) -> str:
    return run(["sha256sum", path]).stdout.split()[0]


def _assert_clean(image: Path) -> None:
    out = qemu_img("check", image, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "No errors were found" in out.stdout


# --- read-only mounts of images QEMU wrote ---------------------------------------------------


def _compressed(b: ImageBuilder) -> Path:
    b.create("plain.qcow2", "16M")
    b.io("plain.qcow2", "write -P 0x11 0 3M", "write -P 0x22 5M 64k", "write -P 0x33 15M 1M")
    return b.convert("plain.qcow2", "compressed.qcow2", compress=True)


def _overlay(b: ImageBuilder) -> Path:
    b.create("base.qcow2", "16M")
    b.io("base.qcow2", "write -P 0x44 0 8M")
    b.create("overlay.qcow2", backing="base.qcow2")
    return b.io("overlay.qcow2", "write -P 0x55 1M 4k", "write -z 2M 64k", "write -P 0x66 12M 1M")


def _extended_l2(b: ImageBuilder) -> Path:
    b.create("ext.qcow2", "16M", extended_l2="on", cluster_size="65536")
    return b.io(
        "ext.qcow2",
        "write -P 0x77 0 2k",
        "write -P 0x78 6k 2k",
        "write -P 0x79 1M 100k",
        "write -z 1081344 8k",
    )


@pytest.mark.parametrize("make", [_compressed, _overlay, _extended_l2])
def test_read_only_mount_reads_as_qemu(builder: ImageBuilder, make: object) -> None:
    image = make(builder)  # type: ignore[operator]
    expected = raw_sha256(image)
    before = file_sha256(image)
    with mounted(image) as (mnt, _):
        assert _sha256_of(mnt) == expected
        with pytest.raises(OSError, match=r"Read-only|Permission|not permitted") as e:
            open(mnt, "r+b").close()
        assert e.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
        # The export holds QEMU's shared read lock: readers are let in, writers are not.
        qemu_img("info", image)
        writer = qemu_io(image, "write 0 512", check=False)
        assert writer.returncode != 0
        assert "lock" in writer.stderr
    assert file_sha256(image) == before


def _seek_extents(f: int, size: int) -> list[tuple[int, int]]:
    """The data extents a sparse-aware reader finds with SEEK_DATA / SEEK_HOLE."""
    out: list[tuple[int, int]] = []
    at = 0
    while at < size:
        try:
            start = os.lseek(f, at, os.SEEK_DATA)
        except OSError as e:
            if e.errno != errno.ENXIO:  # ENXIO: no data after `at`
                raise
            break
        end = os.lseek(f, start, os.SEEK_HOLE)
        assert start < end <= size
        out.append((start, end))
        at = end
    return out


@pytest.mark.parametrize("make", [_compressed, _overlay, _extended_l2])
def test_seek_data_and_hole_follow_qemu_map(builder: ImageBuilder, make: object) -> None:
    """SEEK_DATA/SEEK_HOLE answer from the image's map: the data extents are qemu-img map's
    (data, through the backing chain; zero clusters are holes); `cp --sparse=always` then
    copies the disk exactly and as sparse."""
    image = make(builder)  # type: ignore[operator]
    size = int(qemu_info(image)["virtual-size"])
    want = merge([(e["start"], e["start"] + e["length"]) for e in qemu_map(image) if e["data"]])
    with mounted(image) as (mnt, _):
        f = os.open(mnt, os.O_RDONLY)
        try:
            assert _seek_extents(f, size) == want
            end_in_data = bool(want) and want[-1][1] == size
            assert os.lseek(f, size - 1, os.SEEK_HOLE) == (size if end_in_data else size - 1)
            with pytest.raises(OSError, match="No such device or address"):
                os.lseek(f, size, os.SEEK_DATA)
        finally:
            os.close(f)
        copy = builder.path("copy.raw")
        run(["cp", "--sparse=always", mnt, copy])
    assert file_sha256(copy) == raw_sha256(image)
    assert copy.stat().st_blocks * 512 <= sum(b - a for a, b in want) + 64 * 1024


def test_parallel_reads(builder: ImageBuilder) -> None:
    """Readers on several threads at once (the export serves on several threads too)."""
    from concurrent.futures import ThreadPoolExecutor

    builder.create("par.qcow2", "32M")
    image = builder.io("par.qcow2", *(f"write -P {i + 1} {i}M 1M" for i in range(0, 32, 2)))
    expected = raw_bytes(image)
    with mounted(image) as (mnt, _):
        fd = os.open(mnt, os.O_RDONLY)
        try:
            with ThreadPoolExecutor(8) as pool:
                chunks = list(pool.map(lambda i: os.pread(fd, MiB, i * MiB), range(32)))
        finally:
            os.close(fd)
    assert b"".join(chunks) == expected


def test_read_only_mount_refuses_writers_of_the_mountpoint(builder: ImageBuilder) -> None:
    image = builder.create("ro.qcow2", "4M")
    with mounted(image) as (mnt, _):
        out = subprocess.run(
            ["dd", "if=/dev/zero", f"of={mnt}", "bs=4k", "count=1", "conv=notrunc"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert out.returncode != 0
        assert "Read-only file system" in out.stderr or "Permission denied" in out.stderr


# --- read-write mounts -------------------------------------------------------------------------


@requires_e2fs
def test_rw_mount_mkfs_ext4_debugfs(builder: ImageBuilder, tmp_path: Path) -> None:
    image = builder.path("fs.qcow2")
    run([sys.executable, "-m", "qcowrs", "create", "-q", "-f", "qcow2", image, "64M"])
    payload = hashlib.sha256(b"qcowrs").digest() * 9000 + os.urandom(40000)
    src = tmp_path / "x.bin"
    src.write_bytes(payload)
    with mounted(image, rw=True) as (mnt, _):
        run(["mkfs.ext4", "-q", "-F", mnt])
        run(["e2fsck", "-fn", mnt])
        out = run(["debugfs", "-w", "-R", f"write {src} x.bin", mnt])
        assert "Allocated inode" in out.stdout
        # Written and read back through the export, before the unmount.
        cat = subprocess.run(["debugfs", "-R", "cat x.bin", mnt], capture_output=True, check=True)
        assert cat.stdout == payload
        # The writer holds QEMU's write lock: qemu-img refuses the image meanwhile.
        assert qemu_img("check", image, check=False).returncode != 0
    _assert_clean(image)
    raw = tmp_path / "fs.raw"
    qemu_img("convert", "-O", "raw", image, raw)
    run(["e2fsck", "-fn", raw])
    cat = subprocess.run(["debugfs", "-R", "cat x.bin", raw], capture_output=True, check=True)
    assert cat.stdout == payload


def test_rw_mount_fallocate_and_writes(builder: ImageBuilder) -> None:
    image = builder.create("holes.qcow2", "8M")
    qemu_io(image, "write -P 0xab 0 8M")
    with mounted(image, rw=True) as (mnt, _):
        run(["fallocate", "-p", "-o", "0", "-l", str(MiB), mnt])
        # Unaligned: partial clusters are zeroed, whole ones discarded.
        run(["fallocate", "-p", "-o", str(2 * MiB + 4096), "-l", str(200 * 1024), mnt])
        run(["fallocate", "-z", "-o", str(4 * MiB), "-l", str(MiB), mnt])
        with open(mnt, "r+b") as f:
            assert f.read(MiB) == bytes(MiB)
            f.seek(6 * MiB + 100)
            f.write(b"\x5a" * 70000)
            f.flush()
            os.fsync(f.fileno())
            f.seek(6 * MiB)
            assert f.read(100) == b"\xab" * 100
    _assert_clean(image)
    expected = bytearray(b"\xab" * (8 * MiB))
    expected[0:MiB] = bytes(MiB)
    expected[2 * MiB + 4096 : 2 * MiB + 4096 + 200 * 1024] = bytes(200 * 1024)
    expected[4 * MiB : 5 * MiB] = bytes(MiB)
    expected[6 * MiB + 100 : 6 * MiB + 100 + 70000] = b"\x5a" * 70000
    assert raw_bytes(image) == bytes(expected)
    first = qemu_map(image)[0]
    assert first["start"] == 0
    assert first["length"] >= MiB
    assert first["zero"]
    assert not first["data"]


def test_rw_mount_of_an_overlay_punches_to_zeros(builder: ImageBuilder) -> None:
    builder.create("b.qcow2", "4M")
    qemu_io(builder.path("b.qcow2"), "write -P 0x44 0 4M")
    image = builder.create("o.qcow2", backing="b.qcow2", compat="0.10")
    with mounted(image, rw=True) as (mnt, _):
        run(["fallocate", "-p", "-o", str(MiB), "-l", str(MiB), mnt])
    _assert_clean(image)
    data = raw_bytes(image)
    assert data[MiB : 2 * MiB] == bytes(MiB)
    assert data[:MiB] == b"\x44" * MiB
    assert data[2 * MiB :] == b"\x44" * (2 * MiB)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_ends_the_export_cleanly(builder: ImageBuilder, sig: signal.Signals) -> None:
    image = builder.create("sig.qcow2", "4M")
    mountpoint = image.with_suffix(".mnt")
    proc = _start(image, mountpoint, 4 * MiB, rw=True)
    try:
        with open(mountpoint, "r+b") as f:
            f.seek(MiB)
            f.write(b"\xc3" * 300000)
        proc.send_signal(sig)
        _finish(proc)
    finally:
        if proc.poll() is None:
            subprocess.run([FUSERMOUNT or "fusermount3", "-u", "-z", mountpoint], check=False)
            proc.kill()
            proc.wait()
    assert not _is_mounted(mountpoint)
    _assert_clean(image)
    assert raw_bytes(image)[MiB : MiB + 300000] == b"\xc3" * 300000
    # The locks are gone with the process: QEMU opens the image for writing.
    qemu_io(image, "write -P 1 0 512")


# --- refusals ------------------------------------------------------------------------------------


def test_mountpoint_must_be_a_regular_file(builder: ImageBuilder, tmp_path: Path) -> None:
    image = builder.create("d.qcow2", "1M")
    out = run([sys.executable, "-m", "qcowrs", "mount", image, tmp_path], check=False)
    assert out.returncode == 1
    assert "not a regular file" in out.stderr


def test_locked_image_is_refused(builder: ImageBuilder) -> None:
    image = builder.create("locked.qcow2", "4M")
    with mounted(image, rw=True) as (_, _proc):
        other = image.with_name("other.mnt")
        other.touch()
        out = run([sys.executable, "-m", "qcowrs", "mount", image, other], check=False)
        assert out.returncode == 1
        assert "lock" in out.stderr


def test_background_mount_is_not_supported(builder: ImageBuilder) -> None:
    import qcowrs

    image = builder.create("bg.qcow2", "1M")
    with pytest.raises(NotImplementedError, match="foreground"):
        qcowrs.mount(image, image.with_suffix(".mnt"), foreground=False)
