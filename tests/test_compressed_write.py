"""Compressed writes (`QcowFile.pwrite(data, offset, compressed=True)`), checked by QEMU: the
image reads back through qemu-img exactly, `qemu-img check` is clean, `qemu-img map` shows the
clusters compressed, the file is about as small as `qemu-img convert -c` makes it, and QEMU's
own writes over the compressed clusters (copy-on-write) keep it clean."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from conftest import assert_qemu_clean, qemu_img, qemu_io, qemu_map, raw_bytes, requires_qemu

pytestmark = requires_qemu

MiB = 1 << 20


def mixed_data(size: int, seed: int) -> bytes:
    """Half text-like (compressible), a quarter random, a quarter zeros, in 16 KiB pieces."""
    rng = random.Random(seed)
    out = bytearray()
    words = [b"qcow2 ", b"cluster ", b"refcount ", b"snapshot ", b"\n"]
    while len(out) < size:
        kind = rng.randrange(4)
        if kind < 2:
            piece = b"".join(rng.choice(words) for _ in range(4000))[: 16 << 10]
        elif kind == 2:
            piece = rng.randbytes(16 << 10)
        else:
            piece = bytes(16 << 10)
        out += piece
    return bytes(out[:size])


CASES = [
    ("cluster_size=65536", 8 * MiB),
    ("cluster_size=65536,compression_type=zstd", 8 * MiB),
    ("cluster_size=512,refcount_bits=4", 1 * MiB),
    ("cluster_size=2M", 8 * MiB),
    ("cluster_size=65536,extended_l2=on", 4 * MiB),
    ("cluster_size=65536,compat=0.10", 4 * MiB),
]


@pytest.mark.parametrize(("opts", "size"), CASES, ids=[c[0] for c in CASES])
def test_compressed_image_reads_back_in_qemu(
    tmp_path: Path, qcowrs_mod: Any, opts: str, size: int
) -> None:
    data = mixed_data(size - 1536, seed=len(opts))  # a partial last cluster
    src = tmp_path / "src.raw"
    src.write_bytes(data)
    img = tmp_path / "ours.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, str(img), str(len(data)))
    with qcowrs_mod.QcowFile.open(img, mode="r+b") as f:
        cs = f.cluster_size
        chunk = 64 * cs if cs < MiB else cs
        for off in range(0, len(data), chunk):
            piece = data[off : off + chunk]
            assert f.pwrite(piece, off, compressed=True) == len(piece)
    assert_qemu_clean(img, opts)
    assert raw_bytes(img) == data
    assert any(e["compressed"] for e in qemu_map(img))
    # About as small as qemu-img's own compressed convert of the same data.
    theirs = tmp_path / "theirs.qcow2"
    qemu_img("convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o", opts, str(src), str(theirs))
    ours_size, their_size = img.stat().st_size, theirs.stat().st_size
    assert ours_size <= their_size * 1.1 + 3 * cs, (ours_size, their_size)
    # QEMU writes over the compressed clusters (copy-on-write) and the image stays clean.
    qemu_io(img, "write -P 0x5a 1000 3000", f"write -P 0x5b {cs} {cs}", "discard 0 4096")
    assert_qemu_clean(img, f"{opts} after QEMU's writes")


def test_misaligned_compressed_write_is_refused(tmp_path: Path, qcowrs_mod: Any) -> None:
    img = tmp_path / "x.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "1M")
    before = img.read_bytes()
    with qcowrs_mod.QcowFile.open(img, mode="r+b") as f:
        with pytest.raises(qcowrs_mod.QcowError, match="whole cluster"):
            f.pwrite(b"x" * 65536, 4096, compressed=True)
        with pytest.raises(qcowrs_mod.QcowError, match="whole cluster"):
            f.pwrite(b"x" * 1000, 0, compressed=True)
    assert img.read_bytes() == before


def test_compressed_overwrite_frees_the_old_clusters(tmp_path: Path, qcowrs_mod: Any) -> None:
    img = tmp_path / "x.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "4M")
    a, b = mixed_data(4 * MiB, 1), mixed_data(4 * MiB, 2)
    with qcowrs_mod.QcowFile.open(img, mode="r+b") as f:
        f.pwrite(a, 0, compressed=True)
        f.pwrite(b, 0, compressed=True)
        f.pwrite(b[:MiB], 0)
    assert_qemu_clean(img)
    assert raw_bytes(img) == b
