"""QcowFile as an io.RawIOBase: the standard library's file machinery works on it, and every
byte it returns equals the same slice of `qemu-img convert -O raw`.
"""

from __future__ import annotations

import hashlib
import io
import random
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import ImageBuilder, file_sha256, qemu_img, raw_bytes, requires_qemu

pytestmark = requires_qemu

CLUSTER = 4096
SIZE = 3 * 1024 * 1024 + 512  # not a multiple of the cluster size


@dataclass
class Img:
    path: Path
    raw: bytes
    file_sha256: str


@pytest.fixture(scope="module")
def img(tmp_path_factory: pytest.TempPathFactory) -> Img:
    b = ImageBuilder(tmp_path_factory.mktemp("io"))
    p = b.create("io.qcow2", SIZE, cluster_size=CLUSTER)
    b.io(
        "io.qcow2",
        "write -P 0x11 0 100",
        "write -P 0x22 4000 200",  # crosses the first cluster boundary
        "write -P 0x33 20479 40963",
        "write -c -P 0x44 65536 8192",  # two compressed clusters
        "write -z 81920 4096",
        "write -P 0x55 1048575 2",
        f"write -P 0x66 {SIZE - 5000} 5000",  # up to the last byte, partial last cluster
    )
    raw = raw_bytes(p)
    assert len(raw) == SIZE
    return Img(p, raw, file_sha256(p))


@pytest.fixture
def f(img: Img, qcowrs_mod: Any) -> Iterator[Any]:
    fh = qcowrs_mod.QcowFile.open(img.path, mode="rb")
    yield fh
    fh.close()
    assert file_sha256(img.path) == img.file_sha256, "a read-only open modified the image"


def test_is_a_raw_io_base(f: Any) -> None:
    assert isinstance(f, io.RawIOBase)
    assert isinstance(f, io.IOBase)
    assert f.readable()
    assert f.seekable()
    assert not f.writable()
    assert not f.closed
    assert f.tell() == 0
    assert f.virtual_size == SIZE
    assert f.cluster_size == CLUSTER


@pytest.mark.parametrize("as_path", [True, False], ids=["pathlib", "str"])
def test_open_accepts_str_and_pathlike(img: Img, qcowrs_mod: Any, as_path: bool) -> None:
    target = img.path if as_path else str(img.path)
    with qcowrs_mod.QcowFile.open(target, mode="rb") as fh:
        assert fh.read(100) == img.raw[:100]


def test_copyfileobj(f: Any, img: Img) -> None:
    out = io.BytesIO()
    shutil.copyfileobj(f, out, 256 * 1024 + 3)
    assert out.getvalue() == img.raw
    assert f.tell() == SIZE


def test_buffered_reader(f: Any, img: Img) -> None:
    br = io.BufferedReader(f, buffer_size=10_000)
    assert br.read(3) == img.raw[:3]
    assert br.peek(1)[:1] == img.raw[3:4]
    assert br.read(70_000) == img.raw[3:70_003]
    assert br.seek(-10, io.SEEK_END) == SIZE - 10
    assert br.read() == img.raw[-10:]
    assert br.seek(4095) == 4095
    assert br.read(50) == img.raw[4095:4145]
    br.seek(0)
    assert br.read() == img.raw
    br.detach()


def test_buffered_reader_read1_and_readinto(f: Any, img: Img) -> None:
    br = io.BufferedReader(f, buffer_size=8192)
    br.seek(12_345)
    chunk = br.read1(100)
    assert 0 < len(chunk) <= 100
    assert chunk == img.raw[12_345 : 12_345 + len(chunk)]
    buf = bytearray(50_000)
    pos = 12_345 + len(chunk)
    n = br.readinto(buf)
    assert n == 50_000
    assert bytes(buf) == img.raw[pos : pos + n]
    br.detach()


def test_hashlib_file_digest(f: Any, img: Img) -> None:
    assert hashlib.file_digest(f, "sha256").hexdigest() == hashlib.sha256(img.raw).hexdigest()


def test_readinto_bytearray(f: Any, img: Img) -> None:
    buf = bytearray(10_000)
    f.seek(4090)
    assert f.readinto(buf) == 10_000
    assert buf == img.raw[4090:14_090]
    assert f.tell() == 14_090


def test_readinto_memoryview_slice_touches_only_the_slice(f: Any, img: Img) -> None:
    buf = bytearray(b"\xee" * 9000)
    view = memoryview(buf)
    f.seek(20_000)
    assert f.readinto(view[1000:8001]) == 7001
    assert buf[:1000] == b"\xee" * 1000
    assert buf[1000:8001] == img.raw[20_000:27_001]
    assert buf[8001:] == b"\xee" * 999
    assert f.tell() == 27_001


def test_readinto_other_writable_buffers(f: Any, img: Img) -> None:
    import array

    arr = array.array("B", bytes(5000))
    f.seek(65_000)
    assert f.readinto(arr) == 5000
    assert arr.tobytes() == img.raw[65_000:70_000]
    words = memoryview(bytearray(4096)).cast("I")  # a non-byte format, 1024 items
    f.seek(0)
    n = f.readinto(words)
    assert n == 4096
    assert words.tobytes() == img.raw[:4096]


def test_readinto_read_only_buffer_is_rejected(f: Any) -> None:
    target = bytes(100)
    with pytest.raises((TypeError, ValueError, BufferError)):
        f.readinto(target)
    assert target == bytes(100)


def test_readinto_empty_buffer(f: Any) -> None:
    f.seek(100)
    assert f.readinto(bytearray()) == 0
    assert f.tell() == 100


def test_seek_whence(f: Any, img: Img) -> None:
    assert f.seek(1000) == 1000
    assert f.seek(1000, io.SEEK_SET) == 1000
    assert f.tell() == 1000
    assert f.seek(24, io.SEEK_CUR) == 1024
    assert f.seek(-24, io.SEEK_CUR) == 1000
    assert f.read(8) == img.raw[1000:1008]
    assert f.seek(0, io.SEEK_END) == SIZE
    assert f.seek(-4097, io.SEEK_END) == SIZE - 4097
    assert f.read(4097) == img.raw[-4097:]
    assert f.tell() == SIZE
    assert f.seek(0) == 0
    assert f.read(1) == img.raw[:1]


def test_negative_seek_is_rejected(f: Any) -> None:
    f.seek(10)
    with pytest.raises((ValueError, OSError)):
        f.seek(-1)
    with pytest.raises((ValueError, OSError)):
        f.seek(-11, io.SEEK_CUR)
    with pytest.raises((ValueError, OSError)):
        f.seek(-SIZE - 1, io.SEEK_END)
    assert f.tell() == 10


def test_bad_whence_is_rejected(f: Any) -> None:
    with pytest.raises((ValueError, OSError)):
        f.seek(0, 7)


def test_reads_at_odd_offsets_cross_clusters(f: Any, img: Img) -> None:
    rng = random.Random(42)
    cases = [
        (0, SIZE),
        (1, SIZE - 1),
        (CLUSTER - 1, 2),
        (CLUSTER - 1, CLUSTER + 2),
        (65_535, 8194),
        (81_919, 4098),
        (SIZE - CLUSTER - 1, CLUSTER + 1),
        (SIZE - 600, 600),
    ]
    cases += [(rng.randrange(SIZE), rng.randrange(1, 3 * CLUSTER)) for _ in range(200)]
    for off, n in cases:
        f.seek(off)
        got = f.read(n)
        assert got == img.raw[off : off + n], f"read({n}) at {off:#x}"


def test_read_all_and_read_minus_one(f: Any, img: Img) -> None:
    assert f.read() == img.raw
    f.seek(3_000_001)
    assert f.read(-1) == img.raw[3_000_001:]
    f.seek(77)
    assert f.readall() == img.raw[77:]


def test_read_zero(f: Any) -> None:
    f.seek(5)
    assert f.read(0) == b""
    assert f.tell() == 5


def test_reads_past_the_end(f: Any, img: Img) -> None:
    f.seek(SIZE - 5)
    assert f.read(100) == img.raw[-5:]
    assert f.read(100) == b""
    assert f.read() == b""
    assert f.readinto(bytearray(10)) == 0
    assert f.seek(SIZE + 12_345) == SIZE + 12_345  # seeking past the end is allowed
    assert f.read(10) == b""
    assert f.readinto(bytearray(10)) == 0
    assert f.tell() == SIZE + 12_345
    f.seek(0)
    assert len(f.read(SIZE + 1000)) == SIZE


def test_iteration_by_lines(f: Any, img: Img) -> None:
    br = io.BufferedReader(f)
    assert b"".join(br) == img.raw  # IOBase iteration = readline() until b""
    br.detach()


def test_with_closes(img: Img, qcowrs_mod: Any) -> None:
    with qcowrs_mod.QcowFile.open(img.path, mode="rb") as fh:
        assert not fh.closed
        assert fh.read(4) == img.raw[:4]
    assert fh.closed
    fh.close()  # idempotent
    assert fh.closed


@pytest.mark.parametrize(
    "op",
    [
        lambda fh: fh.read(1),
        lambda fh: fh.read(),
        lambda fh: fh.readinto(bytearray(1)),
        lambda fh: fh.seek(0),
        lambda fh: fh.tell(),
        lambda fh: fh.readable(),
        lambda fh: fh.seekable(),
        lambda fh: fh.allocated_ranges(),
    ],
    ids=["read", "readall", "readinto", "seek", "tell", "readable", "seekable", "allocated_ranges"],
)
def test_operations_on_a_closed_file_raise_value_error(img: Img, qcowrs_mod: Any, op: Any) -> None:
    fh = qcowrs_mod.QcowFile.open(img.path, mode="rb")
    fh.close()
    with pytest.raises(ValueError):  # noqa: PT011 - io's "I/O operation on closed file"
        op(fh)


def test_close_after_exception_in_with(img: Img, qcowrs_mod: Any) -> None:
    with pytest.raises(RuntimeError), qcowrs_mod.QcowFile.open(img.path, mode="rb") as fh:
        raise RuntimeError("boom")
    assert fh.closed


def test_two_handles_are_independent(img: Img, qcowrs_mod: Any) -> None:
    with (
        qcowrs_mod.QcowFile.open(img.path, mode="rb") as a,
        qcowrs_mod.QcowFile.open(img.path, mode="rb") as b,
    ):
        a.seek(4000)
        b.seek(20_000)
        assert a.read(300) == img.raw[4000:4300]
        assert b.read(300) == img.raw[20_000:20_300]
        assert a.tell() == 4300
        assert b.tell() == 20_300


def test_parallel_readers_on_separate_handles(img: Img, qcowrs_mod: Any) -> None:
    """Reads release the GIL; several threads reading at once must each get the right bytes."""
    from concurrent.futures import ThreadPoolExecutor

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        buf = bytearray(70_000)
        with qcowrs_mod.QcowFile.open(img.path, mode="rb") as fh:
            for _ in range(40):
                off = rng.randrange(SIZE)
                fh.seek(off)
                n = fh.readinto(buf)
                assert buf[:n] == img.raw[off : off + len(buf)]

    with ThreadPoolExecutor(4) as pool:
        for fut in [pool.submit(worker, s) for s in range(8)]:
            fut.result()


@pytest.mark.skipif(
    not Path("/proc/sys/vm/overcommit_memory").exists()
    or Path("/proc/sys/vm/overcommit_memory").read_text().strip() != "0",
    reason="needs the kernel's heuristic overcommit to refuse a 1 PiB allocation",
)
def test_reading_a_huge_disk_whole_raises_memory_error(tmp_path: Path, qcowrs_mod: Any) -> None:
    """f.read() of a 1 PiB disk fails like any too-large allocation, without crashing."""
    p = tmp_path / "huge.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(p), "1P")
    with qcowrs_mod.QcowFile.open(p, mode="rb") as f:
        with pytest.raises(MemoryError):
            f.read()
        f.seek((1 << 50) - 10)
        assert f.read() == bytes(10)
