"""`qcowrs.QcowRawFile`, the seed's table-level view: whole pointer tables and refcount blocks
read and written in single calls, at every refcount width, checked against the bytes on disk
and against qemu-img."""

from __future__ import annotations

import errno
import json
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import qcowrs
from conftest import qemu_img, qemu_io, requires_qemu

pytestmark = requires_qemu


def decode(buf: bytes, bits: int) -> list[int]:
    """Independent decoding of a refblock: sub-byte widths LSB first, wider ones big endian."""
    if bits < 8:
        per = 8 // bits
        return [(b >> (j * bits)) & ((1 << bits) - 1) for b in buf for j in range(per)]
    w = bits // 8
    return [int.from_bytes(buf[i : i + w], "big") for i in range(0, len(buf), w)]


def header(p: Path) -> dict[str, int]:
    with p.open("rb") as f:
        h = f.read(104)
    return {
        "cluster_bits": struct.unpack_from(">I", h, 20)[0],
        "l1_size": struct.unpack_from(">I", h, 36)[0],
        "l1_table_offset": struct.unpack_from(">Q", h, 40)[0],
        "refcount_table_offset": struct.unpack_from(">Q", h, 48)[0],
        "refcount_table_clusters": struct.unpack_from(">I", h, 56)[0],
    }


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16, 32, 64])
def test_reads_match_the_bytes_on_disk(tmp_path: Path, bits: int) -> None:
    p = tmp_path / "r.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"refcount_bits={bits}", str(p), "8M")
    qemu_io(p, "write -P 1 0 1M", "write -P 2 5M 64k")
    h = header(p)
    cs = 1 << h["cluster_bits"]
    raw = qcowrs.QcowRawFile.open(str(p))
    assert raw.cluster_size == cs
    assert raw.refcount_bits == bits
    n = h["refcount_table_clusters"] * cs // 8
    reftable = raw.read_pointer_table(h["refcount_table_offset"], n)
    data = p.read_bytes()
    start = h["refcount_table_offset"]
    assert reftable == list(struct.unpack_from(f">{n}Q", data, start))
    l1 = raw.read_pointer_table(h["l1_table_offset"], h["l1_size"], 0x00FF_FFFF_FFFF_FE00)
    masked = struct.unpack_from(f">{h['l1_size']}Q", data, h["l1_table_offset"])
    assert l1 == [e & 0x00FF_FFFF_FFFF_FE00 for e in masked]
    block = raw.read_refcount_block(reftable[0])
    assert block == decode(data[reftable[0] : reftable[0] + cs], bits)
    used = (len(data) + cs - 1) // cs
    assert all(r == 1 for r in block[:used])
    assert all(r == 0 for r in block[used:])


@pytest.mark.parametrize("bits", [1, 16, 64])
def test_refcount_block_writes_are_seen_by_qemu(tmp_path: Path, bits: int) -> None:
    p = tmp_path / "w.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"refcount_bits={bits}", str(p), "8M")
    qemu_io(p, "write -P 1 0 1M")
    h = header(p)
    cs = 1 << h["cluster_bits"]
    with p.open("r+b") as f:  # room past the used clusters (refcounts past EOF are not checked)
        f.truncate((p.stat().st_size + cs - 1) // cs * cs + 8 * cs)
    raw = qcowrs.QcowRawFile.open(str(p), writable=True)
    refblock = raw.read_pointer_table(h["refcount_table_offset"], 1)[0]
    block = raw.read_refcount_block(refblock)
    used = sum(1 for r in block if r)
    # An orphan cluster with refcount 1 past the used ones: a leak for qemu-img.
    block[used + 3] = 1
    raw.write_refcount_block(refblock, block)
    assert raw.read_refcount_block(refblock) == block
    del raw
    out = subprocess.run(
        ["qemu-img", "check", "--output=json", str(p)], capture_output=True, text=True
    )
    assert out.returncode == 3, out.stdout
    assert json.loads(out.stdout)["leaks"] == 1


def test_pointer_table_write_sets_flags_on_non_zero_entries(tmp_path: Path) -> None:
    p = tmp_path / "t.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(p), "8M")
    qemu_io(p, "write -P 1 0 64k")
    h = header(p)
    copy = tmp_path / "copy.qcow2"
    shutil.copyfile(p, copy)
    raw = qcowrs.QcowRawFile.open(str(copy), writable=True)
    l1 = raw.read_pointer_table(h["l1_table_offset"], h["l1_size"], 0x00FF_FFFF_FFFF_FE00)
    raw.write_pointer_table(h["l1_table_offset"], l1, 1 << 63)
    assert raw.read_pointer_table(h["l1_table_offset"], h["l1_size"]) == [
        e | (1 << 63) if e else 0 for e in l1
    ]
    del raw
    # COPIED was already set on the one L2 table, so the file is unchanged.
    assert copy.read_bytes() == p.read_bytes()


def test_refusals(tmp_path: Path) -> None:
    p = tmp_path / "x.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "refcount_bits=2", str(p), "8M")
    h = header(p)
    before = p.read_bytes()
    ro = qcowrs.QcowRawFile.open(str(p))
    refblock = ro.read_pointer_table(h["refcount_table_offset"], 1)[0]
    # Issue 7: a write through a read-only handle is a QcowError (ReadOnlyImage, EBADF), no
    # longer a plain PermissionError.
    with pytest.raises(qcowrs.ReadOnlyImage) as exc:
        ro.write_refcount_block(refblock, [1])
    assert exc.value.errno == errno.EBADF
    del ro
    rw = qcowrs.QcowRawFile.open(str(p), writable=True)
    with pytest.raises(qcowrs.CorruptImage, match="overflow"):
        rw.write_refcount_block(refblock, [1, 4])  # 2-bit refcounts hold at most 3
    with pytest.raises(qcowrs.InvalidOffset, match="past the end"):
        rw.read_pointer_table(1 << 40, 8)
    del rw
    assert p.read_bytes() == before
