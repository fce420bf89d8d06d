"""`QcowFile.map()` against `qemu-img map`: the JSON entries must be equal (keys, key order,
values), with `--start-offset`/`--max-length` windows, and `format_map_human` must print what
`qemu-img map` prints, line by line (file names as qemu-img prints them).

Images are made by qemu-img/qemu-io: plain, compressed, 3-deep chains with zero clusters,
sparse raw backing files, extended L2 subclusters, external data files, 512 B and 2 MiB
clusters, overlays larger and smaller than their backing files, snapshots, metadata
preallocation, an empty 4 TiB disk. Plus the bounds: an empty 2^61-byte disk and L2 tables
shared by every L1 entry.
"""

from __future__ import annotations

import json
import os
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import qcowrs
from conftest import ImageBuilder, qemu_img, qemu_io, requires_qemu
from qcowrs._map import MapFormatError, format_map_human

pytestmark = requires_qemu

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

KEYS = ["start", "length", "depth", "present", "zero", "data", "compressed"]


def qemu_map_json(image: str, *args: str) -> list[dict[str, object]]:
    out = qemu_img("map", "-U", "--output=json", *args, image).stdout
    result: list[dict[str, object]] = json.loads(out)
    return result


def ours(
    image: str, start: int = 0, length: int | None = None, **kw: bool
) -> list[dict[str, object]]:
    with qcowrs.QcowFile.open(image) as f:
        return [dict(e) for e in f.map(start, length, **kw)]


def window_args(start: int, length: int | None) -> list[str]:
    args = [f"--start-offset={start}"]
    if length is not None:
        args.append(f"--max-length={length}")
    return args


# -- scenarios: each builds an image and returns the path to map ------------------------------


def plain(b: ImageBuilder) -> Path:
    b.create("plain.qcow2", "64M")
    return b.io(
        "plain.qcow2",
        "write -P 1 0 128k",
        "write -P 2 1M 64k",
        "write -z 2M 64k",
        "write -P 3 3M 192k",
        "write -z 3136k 64k",  # over data, no unmap: a preallocated zero cluster (offset kept)
        "discard 3200k 64k",
        "write -P 4 5000 100",
        "write -P 5 65532k 4k",
    )


def compressed(b: ImageBuilder) -> Path:
    plain(b)
    return b.convert("plain.qcow2", "compressed.qcow2", compress=True)


def compressed_overlay(b: ImageBuilder) -> Path:
    compressed(b)
    b.create("cov.qcow2", backing="compressed.qcow2")
    return b.io("cov.qcow2", "write -P 7 1M 64k", "write -z 0 64k")


def chain3(b: ImageBuilder) -> Path:
    b.create("base.qcow2", "16M")
    b.io("base.qcow2", "write -P 1 0 1M", "write -P 1 4M 64k", "write -P 1 8M 2M")
    b.create("mid.qcow2", backing="base.qcow2")
    b.io(
        "mid.qcow2",
        "write -P 2 64k 64k",
        "write -z 4M 64k",
        "write -P 2 9M 128k",
        "write -z 12M 1M",
    )
    b.create("top.qcow2", backing="mid.qcow2")
    return b.io(
        "top.qcow2",
        "write -P 3 128k 64k",
        "write -z 0 64k",
        "write -z 64k 64k",
        "write -P 3 9M 64k",
        "write -z 9M 64k",  # data then zero without unmap: zero with an offset, over mid's data
        "write -P 3 15M 4k",
    )


def raw_backing(b: ImageBuilder) -> Path:
    raw = b.path("sparse.raw")
    with open(raw, "wb") as fh:
        fh.truncate(8 * MiB)
        fh.seek(1 * MiB)
        fh.write(b"hello")
        fh.seek(2 * MiB + 12345)
        fh.write(os.urandom(200 * KiB))
        fh.seek(8 * MiB - 4096)
        fh.write(b"end")
    b.create("rawov.qcow2", "12M", backing="sparse.raw", backing_fmt="raw")
    return b.io("rawov.qcow2", "write -P 3 64k 64k", "write -z 2560k 64k", "write -P 3 10M 64k")


def raw_backing_unaligned(b: ImageBuilder) -> Path:
    b.path("small.raw").write_bytes(os.urandom(1000))
    with open(b.path("small2.raw"), "wb") as fh:
        fh.write(os.urandom(5000))
        fh.truncate(10000)
    b.create("small2.qcow2", "1M", backing="small2.raw", backing_fmt="raw")
    b.create("smallov.qcow2", "1M", backing="small.raw", backing_fmt="raw")
    return b.path("smallov.qcow2")


def raw_backing_unaligned_2(b: ImageBuilder) -> Path:
    raw_backing_unaligned(b)
    return b.path("small2.qcow2")


def extended_l2(b: ImageBuilder) -> Path:
    b.create("xbase.qcow2", "4M", extended_l2="on")
    b.io("xbase.qcow2", "write -P 1 0 64k", "write -P 1 1M 32k")
    b.create("xtop.qcow2", backing="xbase.qcow2", extended_l2="on")
    return b.io(
        "xtop.qcow2",
        "write -P 2 4k 2k",
        "write -P 2 10k 4k",
        "write -z 32k 4k",
        "write -P 2 1M 2k",
        "write -z 2M 64k",
        "write -P 2 3M 6k",
        "write -z 3076k 2k",
    )


def extended_l2_alone(b: ImageBuilder) -> Path:
    b.create("xalone.qcow2", "4M", extended_l2="on", cluster_size="128k")
    return b.io(
        "xalone.qcow2",
        "write -P 2 4k 4k",
        "write -z 32k 4k",
        "write -P 2 300k 20k",
        "write -z 1M 256k",
    )


def data_file(b: ImageBuilder) -> Path:
    # An absolute data file name: QEMU resolves a relative one against its working directory.
    b.create("df.qcow2", "8M", data_file=str(b.path("df.data")))
    return b.io("df.qcow2", "write -P 1 64k 128k", "write -z 1M 64k", "write -P 1 7M 1M")


def data_file_raw(b: ImageBuilder) -> Path:
    b.create("dfr.qcow2", "8M", data_file=str(b.path("dfr.data")), data_file_raw="on")
    return b.io("dfr.qcow2", "write -P 1 64k 128k", "write -z 1M 64k")


def cluster_512(b: ImageBuilder) -> Path:
    # 512 B clusters: an L2 table maps 32 KiB, so runs cross many tables.
    b.create("c512.qcow2", "4M", cluster_size=512)
    return b.io(
        "c512.qcow2",
        "write -P 1 0 100k",
        "write -z 200k 40k",
        "write -P 2 1000k 33k",
        "write -P 3 300k 512",
    )


def cluster_2m(b: ImageBuilder) -> Path:
    b.create("c2m.qcow2", "3G", cluster_size="2M")
    return b.io(
        "c2m.qcow2", "write -P 1 0 3M", "write -z 1G 4M", "write -P 2 2G 2M", "write -P 3 3070M 2M"
    )


def overlay_larger(b: ImageBuilder) -> Path:
    chain3(b)
    b.create("larger.qcow2", "24M", backing="top.qcow2")
    return b.io("larger.qcow2", "write -P 4 20M 64k", "write -P 4 1M 64k")


def overlay_smaller(b: ImageBuilder) -> Path:
    chain3(b)
    b.create("smaller.qcow2", "9M", backing="top.qcow2")
    return b.io("smaller.qcow2", "write -P 4 64k 4k")


def mixed_sizes(b: ImageBuilder) -> Path:
    # base 16M < mid 20M (past base: zeros at mid's depth) > top 18M.
    chain3(b)
    b.create("m20.qcow2", "20M", backing="base.qcow2")
    b.io("m20.qcow2", "write -P 5 17M 64k")
    b.create("t18.qcow2", "18M", backing="m20.qcow2")
    return b.io("t18.qcow2", "write -P 6 0 4k")


def snapshots(b: ImageBuilder) -> Path:
    b.create("snap.qcow2", "8M")
    b.io("snap.qcow2", "write -P 1 0 1M", "write -P 1 4M 64k")
    qemu_img("snapshot", "-c", "s1", b.path("snap.qcow2"))
    b.io("snap.qcow2", "write -P 2 512k 64k", "discard 4M 64k", "write -P 2 6M 64k")
    qemu_img("snapshot", "-c", "s2", b.path("snap.qcow2"))
    return b.io("snap.qcow2", "write -P 3 0 4k")


def empty_4t(b: ImageBuilder) -> Path:
    return b.create("empty4t.qcow2", "4T")


def sparse_4t(b: ImageBuilder) -> Path:
    b.create("sparse4t.qcow2", "4T")
    return b.io("sparse4t.qcow2", "write -P 1 0 64k", "write -P 1 2T 64k", "write -P 1 4095G 1M")


def prealloc_metadata(b: ImageBuilder) -> Path:
    # Data clusters that are holes in the file read "zero" + "data" (QEMU asks the file).
    b.create("pmeta.qcow2", "4M", preallocation="metadata")
    return b.io("pmeta.qcow2", "write -P 1 64k 64k", "write -P 1 1M 8k")


def prealloc_falloc(b: ImageBuilder) -> Path:
    return b.create("pfalloc.qcow2", "4M", preallocation="falloc")


def compat_v2(b: ImageBuilder) -> Path:
    # qcow2 v2: no zero flag (zero writes allocate or deallocate).
    b.create("v2base.qcow2", "8M", compat="0.10")
    b.io("v2base.qcow2", "write -P 1 0 2M")
    b.create("v2.qcow2", backing="v2base.qcow2", compat="0.10")
    return b.io("v2.qcow2", "write -P 2 1M 64k", "write -z 1536k 64k", "write -P 2 6M 64k")


def data_file_over_backing(b: ImageBuilder) -> Path:
    chain3(b)
    b.create("dfb.qcow2", backing="top.qcow2", data_file=str(b.path("dfb.data")))
    return b.io("dfb.qcow2", "write -P 9 8M 2M", "write -z 1M 64k")


SCENARIOS: dict[str, Callable[[ImageBuilder], Path]] = {
    f.__name__: f
    for f in (
        plain,
        compressed,
        compressed_overlay,
        chain3,
        raw_backing,
        raw_backing_unaligned,
        raw_backing_unaligned_2,
        extended_l2,
        extended_l2_alone,
        data_file,
        data_file_raw,
        cluster_512,
        cluster_2m,
        overlay_larger,
        overlay_smaller,
        mixed_sizes,
        snapshots,
        empty_4t,
        sparse_4t,
        prealloc_metadata,
        prealloc_falloc,
        compat_v2,
        data_file_over_backing,
    )
}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    out = {}
    for name, make in SCENARIOS.items():
        out[name] = str(make(ImageBuilder(tmp_path_factory.mktemp(name))))
    return out


@pytest.mark.parametrize("name", SCENARIOS)
def test_json_equals_qemu_img(images: dict[str, str], name: str) -> None:
    image = images[name]
    expected = qemu_map_json(image)
    got = ours(image)
    assert got == expected
    for e in got:
        keys = list(e)
        assert keys == [*KEYS, "offset"] if "offset" in e else keys == KEYS


@pytest.mark.parametrize("name", SCENARIOS)
def test_windows_equal_qemu_img(images: dict[str, str], name: str) -> None:
    image = images[name]
    with qcowrs.QcowFile.open(image) as f:
        size = f.virtual_size
    windows: list[tuple[int, int | None]] = [
        (size // 3 + 123, size // 4),
        (65536 + 512, 3 * 65536),
        (size - 1000, 5000),
        (size, None),
        (size + 4096, 10),
        (777, 0),
    ]
    for start, length in windows:
        assert ours(image, start, length) == qemu_map_json(image, *window_args(start, length)), (
            start,
            length,
        )


@pytest.mark.parametrize("name", SCENARIOS)
def test_human_equals_qemu_img(images: dict[str, str], name: str) -> None:
    image = images[name]
    proc = qemu_img("map", "-U", image, check=False)
    entries = ours(image, with_files=True)
    for e in entries:
        assert ("filename" in e) == ("offset" in e)
    if proc.returncode != 0:
        assert "File contains external, encrypted or compressed clusters." in proc.stderr
        with pytest.raises(MapFormatError, match="compressed clusters") as info:
            format_map_human(entries)  # type: ignore[arg-type]
        assert info.value.output.splitlines() == proc.stdout.splitlines()
        return
    assert format_map_human(entries).splitlines() == proc.stdout.splitlines()  # type: ignore[arg-type]


def test_human_windows_and_relative_names(images: dict[str, str]) -> None:
    # qemu-img run from the image's folder with a relative name: names print relative.
    image = Path(images["overlay_larger"])
    for args in ([], ["--start-offset=70000", "--max-length=9000000"]):
        proc = qemu_img("map", "-U", *args, image.name, cwd=image.parent)
        cwd = os.getcwd()
        os.chdir(image.parent)
        try:
            start = int(args[0].split("=")[1]) if args else 0
            length = int(args[1].split("=")[1]) if args else None
            text = format_map_human(ours(image.name, start, length, with_files=True))  # type: ignore[arg-type]
        finally:
            os.chdir(cwd)
        assert text.splitlines() == proc.stdout.splitlines()
        assert "top.qcow2" in text
        assert "base.qcow2" in text


def test_no_backing_file_is_backing_null(images: dict[str, str]) -> None:
    image = images["chain3"]
    spec = json.dumps(
        {"driver": "qcow2", "file": {"driver": "file", "filename": image}, "backing": None}
    )
    expected = qemu_map_json(f"json:{spec}")
    with qcowrs.QcowFile.open(image, backing=False) as f:
        assert f.map() == expected


def test_other_backing_file(images: dict[str, str]) -> None:
    # backing=PATH: the map follows that file (a raw one here).
    image = images["chain3"]
    raw = images["raw_backing"].replace("rawov.qcow2", "sparse.raw")
    spec = {
        "driver": "qcow2",
        "file": {"driver": "file", "filename": image},
        "backing": {"driver": "raw", "file": {"driver": "file", "filename": raw}},
    }
    expected = qemu_map_json(f"json:{json.dumps(spec)}")
    with qcowrs.QcowFile.open(image, backing=raw) as f:
        assert f.map() == expected


def test_arguments(images: dict[str, str]) -> None:
    with qcowrs.QcowFile.open(images["plain"]) as f:
        with pytest.raises(ValueError, match="start_offset"):
            f.map(-1)
        with pytest.raises(ValueError, match="max_length"):
            f.map(0, -5)
        assert f.map(max_length=4096) == f.map(0, 4096)
    with pytest.raises(ValueError, match="closed"):
        f.map()


def test_an_empty_2_61_byte_disk_is_one_entry_at_once(tmp_path: Path) -> None:
    # qemu-img itself takes minutes on this one; the answer is known.
    p = tmp_path / "huge.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", p, str(1 << 61))
    t = time.monotonic()
    with qcowrs.QcowFile.open(p) as f:
        got = f.map()
        window = f.map(1 << 60, 1 << 40)
    assert time.monotonic() - t < 5
    assert got == [
        {
            "start": 0,
            "length": 1 << 61,
            "depth": 0,
            "present": False,
            "zero": True,
            "data": False,
            "compressed": False,
        }
    ]
    assert window == [{**got[0], "start": 1 << 60, "length": 1 << 40}]


def test_shared_l2_tables_are_refused_quickly(tmp_path: Path) -> None:
    # 8 TiB: 16384 L1 entries all pointing at one L2 table of alternating data and zero
    # entries: qemu-img would print 134 M entries; the map refuses past what the file holds.
    p = tmp_path / "shared.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", p, "8T")
    qemu_io(p, "write -P 1 0 64k")
    raw = p.read_bytes()
    l1_size, l1_offset = struct.unpack(">IQ", raw[36:48])
    l2_offset = struct.unpack(">Q", raw[l1_offset : l1_offset + 8])[0] & 0x00FF_FFFF_FFFF_FE00
    data = struct.unpack(">Q", raw[l2_offset : l2_offset + 8])[0]
    table = b"".join(struct.pack(">Q", data if i % 2 == 0 else 1) for i in range(8192))
    with open(p, "r+b") as fh:
        fh.seek(l2_offset)
        fh.write(table)
        fh.seek(l1_offset)
        fh.write(struct.pack(">Q", l2_offset | 1 << 63) * l1_size)
    t = time.monotonic()
    with qcowrs.QcowFile.open(p) as f:
        with pytest.raises(qcowrs.CorruptImage, match="map entries"):
            f.map()
        part = f.map(0, 4 * 65536)
    assert time.monotonic() - t < 10
    assert part == qemu_map_json(str(p), "--max-length=262144")
