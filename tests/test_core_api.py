"""The API the core reshape added (issue 7): default modes, positional and thread-safe I/O
(`pread`/`preadinto`/`pwrite`), parallel reads of one handle, the error classes of every Rust
error variant, and opening an overlay without (or with another) backing file. QEMU is the
oracle for every byte."""

from __future__ import annotations

import errno
import io
import random
import threading
from pathlib import Path

import pytest
import qcowrs
from conftest import (
    ImageBuilder,
    assert_qemu_clean,
    file_sha256,
    qemu_img,
    qemu_io,
    raw_bytes,
    requires_qemu,
)

pytestmark = requires_qemu


# -- modes ----------------------------------------------------------------------------------


def test_default_mode_is_read_only(valid_copy: Path) -> None:
    before = file_sha256(valid_copy)
    with qcowrs.QcowFile.open(valid_copy) as f:
        assert f.mode == "rb"
        assert not f.writable()
        with pytest.raises(qcowrs.ReadOnlyImage) as exc:
            f.write(b"x")
        assert exc.value.errno == errno.EBADF
        # Also what io.RawIOBase users catch for a write to a file not opened for writing.
        assert isinstance(exc.value, io.UnsupportedOperation)
        for call in (lambda: f.write_zeroes(0, 65536), lambda: f.discard(0, 65536)):
            with pytest.raises(qcowrs.ReadOnlyImage):
                call()
        with pytest.raises(qcowrs.ReadOnlyImage):
            f.truncate(8 << 20)
        with pytest.raises(qcowrs.ReadOnlyImage):
            f.pwrite(b"y", 0)
    assert file_sha256(valid_copy) == before


def test_rebuild_defaults_to_read_write_and_rb_plus_is_accepted(valid_copy: Path) -> None:
    with qcowrs.QcowFile.open(valid_copy, rebuild=True) as f:
        assert f.mode == "r+b"
        f.pwrite(b"rebuild-mode", 4096)
    with qcowrs.QcowFile.open(valid_copy, mode="rb+") as f:
        assert f.mode == "r+b"
        assert f.writable()
        f.pwrite(b"rb+", 8192)
    data = raw_bytes(valid_copy)
    assert data[4096:4108] == b"rebuild-mode"
    assert data[8192:8195] == b"rb+"
    assert_qemu_clean(valid_copy)
    with pytest.raises(ValueError, match="mode"):
        qcowrs.QcowFile.open(valid_copy, mode="w")
    with pytest.raises(ValueError, match="rebuild"):
        qcowrs.QcowFile.open(valid_copy, mode="rb", rebuild=True)


# -- positional I/O -------------------------------------------------------------------------


def test_pread_preadinto_leave_the_position_alone(valid_image: Path) -> None:
    want = raw_bytes(valid_image)
    with qcowrs.QcowFile.open(valid_image) as f:
        f.seek(12345)
        assert f.pread(4096, 1 << 20) == want[1 << 20 : (1 << 20) + 4096]
        assert f.pread(100, 0) == want[:100]
        buf = bytearray(70000)
        assert f.preadinto(memoryview(buf)[10:], 3 << 20) == 69990
        assert bytes(buf[10:]) == want[3 << 20 : (3 << 20) + 69990]
        # Short only at the end of the disk.
        assert f.pread(100, f.virtual_size - 10) == want[-10:]
        assert f.pread(100, f.virtual_size + 5) == b""
        assert f.tell() == 12345
        with pytest.raises(ValueError, match="non-negative"):
            f.pread(10, -1)


def test_pwrite_is_positional_and_qemu_reads_it(valid_copy: Path) -> None:
    with qcowrs.QcowFile.open(valid_copy, mode="r+b") as f:
        f.seek(777)
        assert f.pwrite(b"A" * 5000, 2 << 20) == 5000
        assert f.pwrite(memoryview(b"--B--")[2:3], 3 << 20) == 1
        assert f.tell() == 777
    data = raw_bytes(valid_copy)
    assert data[2 << 20 : (2 << 20) + 5000] == b"A" * 5000
    assert data[3 << 20 : (3 << 20) + 2] == b"B\xcd"
    assert_qemu_clean(valid_copy)


@pytest.fixture(scope="module")
def compressed_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """A zlib-compressed image (qemu-img convert -c) of 8 MiB of compressible data."""
    b = ImageBuilder(tmp_path_factory.mktemp("parallel"))
    rng = random.Random(11)
    raw = bytes(rng.choices(b"abcdefghijklmnop", k=8 << 20))
    b.path("src.raw").write_bytes(raw)
    img = b.convert("src.raw", "z.qcow2", src_fmt="raw", compress=True)
    return img, raw


def test_threads_reading_one_handle_see_the_right_bytes(
    compressed_image: tuple[Path, bytes],
) -> None:
    img, want = compressed_image
    errors: list[str] = []
    with qcowrs.QcowFile.open(img) as f:

        def reader(seed: int) -> None:
            rng = random.Random(seed)
            buf = bytearray(200_000)
            for _ in range(60):
                off = rng.randrange(0, len(want) - len(buf))
                n = rng.randrange(1, len(buf))
                got = f.preadinto(memoryview(buf)[:n], off)
                if bytes(buf[:got]) != want[off : off + n] or got != n:
                    errors.append(f"thread {seed}: bytes at {off:#x}+{n} differ")
                if f.pread(777, off) != want[off : off + 777]:
                    errors.append(f"thread {seed}: pread at {off:#x} differs")

        threads = [threading.Thread(target=reader, args=(s,)) for s in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []


def test_threads_writing_one_handle_serialise(tmp_path: Path) -> None:
    p = tmp_path / "w.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(p), "16M")
    chunks: dict[int, bytes] = {}
    with qcowrs.QcowFile.open(p, mode="r+b") as f:

        def writer(k: int) -> None:
            rng = random.Random(k)
            for i in range(40):
                off = (k * 40 + i) * 98_304 + rng.randrange(0, 5000)
                data = rng.randbytes(rng.randrange(1, 20000))
                f.pwrite(data, off)
                chunks[off] = data

        threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert_qemu_clean(p)
    data = raw_bytes(p)
    for off, chunk in chunks.items():
        assert data[off : off + len(chunk)] == chunk, f"write at {off:#x} lost"


# -- errors ---------------------------------------------------------------------------------

VARIANTS = [
    "InvalidMagic",
    "UnsupportedVersion",
    "UnsupportedFeature",
    "InvalidClusterSize",
    "InvalidOffset",
    "InvalidRefcountTableSize",
    "InvalidClusterIndex",
    "CorruptImage",
    "RefcountRebuildRequired",
    "ImageLocked",
    "ReadOnlyImage",
    "QcowError",
]


@pytest.mark.parametrize("name", VARIANTS)
def test_every_error_variant_maps_to_its_class(name: str) -> None:
    from qcowrs import _qcowrs

    cls = getattr(qcowrs, name)
    with pytest.raises(cls) as exc:
        _qcowrs._error_for_test(name)
    assert type(exc.value) is cls
    assert isinstance(exc.value, qcowrs.QcowError)
    assert isinstance(exc.value, OSError)
    want_errno = {"ImageLocked": errno.EAGAIN, "ReadOnlyImage": errno.EBADF, "QcowError": errno.EIO}
    if name in want_errno:
        assert exc.value.errno == want_errno[name]


def test_a_lock_conflict_is_image_locked(valid_copy: Path) -> None:
    with qcowrs.QcowFile.open(valid_copy, mode="r+b"):
        with pytest.raises(qcowrs.ImageLocked) as exc:
            qcowrs.QcowFile.open(valid_copy, mode="r+b")
        assert exc.value.errno == errno.EAGAIN
        with pytest.raises(qcowrs.ImageLocked):
            qcowrs.check(valid_copy, repair="leaks")


def test_offsets_in_errors_are_real(valid_copy: Path) -> None:
    # An L2 entry with a misaligned data offset: the error names the entry's own offset.
    l2_entry = 0x40000
    with valid_copy.open("r+b") as fh:
        fh.seek(l2_entry)
        fh.write((0x8000000000050200).to_bytes(8, "big"))
    with qcowrs.QcowFile.open(valid_copy) as f:
        with pytest.raises(qcowrs.CorruptImage, match="0x40000") as exc:
            f.pread(10, 0)
        assert "0x50200" in str(exc.value)
        with pytest.raises(qcowrs.CorruptImage, match="0x40000"):
            f.allocated_ranges()


# -- backing file choice --------------------------------------------------------------------


def test_overlay_without_its_backing_file(builder: ImageBuilder) -> None:
    builder.create("base.qcow2", "4M")
    builder.io("base.qcow2", "write -P 0x11 0 4M")
    ov = builder.create("ov.qcow2", backing="base.qcow2", backing_fmt="qcow2")
    builder.io("ov.qcow2", "write -P 0x22 1M 64k")
    other = builder.create("other.raw", "4M", fmt="raw")
    qemu_io(other, "write -P 0x33 0 4M", fmt="raw")
    whole = raw_bytes(ov)
    builder.path("base.qcow2").rename(builder.path("gone.qcow2"))
    with pytest.raises(qcowrs.QcowError) as exc:
        qcowrs.QcowFile.open(ov)
    assert exc.value.errno == errno.ENOENT
    with qcowrs.QcowFile.open(ov, backing=False) as f:
        assert f.allocated_ranges() == [(1 << 20, 65536, "data")]
        assert f.pread(65536, 1 << 20) == whole[1 << 20 : (1 << 20) + 65536]
        assert f.pread(4096, 0) == bytes(4096)  # what the backing file would supply
        assert f.check().is_clean
    with qcowrs.QcowFile.open(ov, backing=other) as f:
        assert f.pread(4096, 0) == b"\x33" * 4096
        assert f.pread(16, 1 << 20) == b"\x22" * 16
    with qcowrs.QcowFile.open(ov, backing=builder.path("gone.qcow2")) as f:
        assert f.pread(4 << 20, 0) == whole
