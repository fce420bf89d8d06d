"""qcow version 1 images, read-only: images made and written by QEMU (``qemu-img create -f
qcow``, ``qemu-io -f qcow``, ``qemu-img convert -O qcow [-c]``, with raw, qcow2 and qcow
backing files, and as the base of a qcow2 overlay) read byte-identical to ``qemu-img convert
-f qcow -O raw``, convert to a qcow2 image ``qemu-img compare`` finds equal and ``qemu-img
check`` finds clean, are described as ``qemu-img info`` describes them, and damaged ones are
refused with a ``QcowError`` naming the field, never modified."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest
import qcowrs
from conftest import file_sha256, qemu_img, qemu_info, qemu_io, qemu_map, raw_sha256, requires_qemu
from qcowrs.cli import main

pytestmark = requires_qemu

MiB = 1 << 20


def _write(path: Path, fmt: str, *cmds: str) -> None:
    qemu_io(path, *cmds, fmt=fmt)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    """name -> (path, format as QEMU names it)."""
    d = tmp_path_factory.mktemp("qcow1")
    out: dict[str, tuple[Path, str]] = {}
    # Several sizes, one not a multiple of the cluster size (nor of a sector: QEMU rounds up).
    for name, size in (("empty", 4 * MiB), ("odd", 1_000_000), ("sized", 5 * MiB + 4096 + 512)):
        p = d / f"{name}.qcow"
        qemu_img("create", "-q", "-f", "qcow", p, str(size))
        out[name] = (p, "qcow")
    vs = qemu_info(out["odd"][0])["virtual-size"]
    _write(out["odd"][0], "qcow", "write -P 0x11 0 64k", f"write -P 0x22 {vs - 512} 512")
    _write(
        out["sized"][0],
        "qcow",
        "write -P 0x33 4k 12k",
        "write -P 0x44 3M 1M",
        f"write -P 0x55 {5 * MiB} 4608",
        "write -z 3200k 64k",
    )
    # Converted into from a patterned qcow2 image, with and without compression.
    src = d / "src.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", src, "6M")
    _write(src, "qcow2", "write -P 0x61 0 1M", "write -P 0x62 2M 4k", "write -P 0x63 5M 100k")
    _write(src, "qcow2", "write -P 0x00 1M 4k")
    rnd = d / "rnd.raw"
    rnd.write_bytes(hashlib.sha256(b"x").digest() * (65536 // 32))
    _write(src, "qcow2", "write -s " + str(rnd) + " 4M 64k")
    for name, extra in (("converted", []), ("compressed", ["-c"])):
        p = d / f"{name}.qcow"
        # qemu-img 10 writes every compressed cluster, then fails (exit 1, no message) on the
        # zero-length compressed write convert ends with, which the qcow driver refuses: the
        # image is complete (compared below).
        qemu_img("convert", "-q", *extra, "-f", "qcow2", "-O", "qcow", src, p, check=not extra)
        qemu_img("compare", "-f", "qcow2", "-F", "qcow", src, p)
        out[name] = (p, "qcow")
    assert any(e["compressed"] for e in qemu_map(out["compressed"][0]))
    # Backing files: raw, qcow2 and qcow under a qcow image.
    base_raw = d / "base.raw"
    qemu_img("create", "-q", "-f", "raw", base_raw, "3M")
    _write(base_raw, "raw", "write -P 0x71 0 3M")
    for name, base, bfmt in (
        ("over_raw", base_raw, "raw"),
        ("over_qcow2", src, "qcow2"),
        ("over_qcow", out["compressed"][0], "qcow"),
    ):
        p = d / f"{name}.qcow"
        qemu_img("create", "-q", "-f", "qcow", "-b", base.name, "-F", bfmt, p, "4M")
        _write(p, "qcow", "write -P 0x81 1k 2k", "write -P 0x82 2M 8k")
        out[name] = (p, "qcow")
    # A qcow2 overlay over a qcow base.
    ov = d / "overlay.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "over_qcow.qcow", "-F", "qcow", ov, "6M")
    _write(ov, "qcow2", "write -P 0x91 4k 4k", "write -P 0x92 5M 64k")
    out["qcow2_over_qcow"] = (ov, "qcow2")
    return out


NAMES = [
    "empty",
    "odd",
    "sized",
    "converted",
    "compressed",
    "over_raw",
    "over_qcow2",
    "over_qcow",
    "qcow2_over_qcow",
]


def _chain_hashes(img: Path) -> dict[str, str]:
    return {p.name: file_sha256(p) for p in img.parent.iterdir() if p.is_file()}


@pytest.mark.parametrize("name", NAMES)
def test_convert_to_raw_matches_qemu(images: dict[str, tuple[Path, str]], name: str) -> None:
    img, fmt = images[name]
    before = _chain_hashes(img)
    dst = img.parent / f"out-{name}.raw"
    qcowrs.convert(img, dst, "raw")
    assert file_sha256(dst) == raw_sha256(img, fmt)
    dst.unlink()
    assert _chain_hashes(img) == before


@pytest.mark.parametrize("name", ["odd", "compressed", "over_qcow2", "over_qcow"])
def test_convert_to_qcow2_compares_equal(images: dict[str, tuple[Path, str]], name: str) -> None:
    img, fmt = images[name]
    dst = img.parent / f"out-{name}.qcow2"
    # The CLI, with the format given and probed.
    assert main(["convert", "-f", "qcow", "-O", "qcow2", str(img), str(dst)]) == 0
    qemu_img("compare", "-f", fmt, "-F", "qcow2", img, dst)
    check = json.loads(qemu_img("check", "--output=json", dst).stdout)
    assert check.get("corruptions", 0) == 0
    assert check.get("leaks", 0) == 0
    dst.unlink()
    assert main(["convert", "-O", "qcow2", "-c", str(img), str(dst)]) == 0
    qemu_img("compare", "-f", fmt, "-F", "qcow2", img, dst)
    dst.unlink()


def test_qcow2_overlay_over_qcow_base(images: dict[str, tuple[Path, str]]) -> None:
    img, _ = images["qcow2_over_qcow"]
    with qcowrs.QcowFile.open(img, "rb") as f:
        data = f.read()
        got = [{k: v for k, v in e.items()} for e in f.map()]
    assert hashlib.sha256(data).hexdigest() == raw_sha256(img, "qcow2")
    assert got == qemu_map(img)
    # compare (ours) sees what qemu-img compare sees.
    assert qcowrs.compare(img, images["over_qcow"][0]).identical is False


_INFO_KEYS = [
    "virtual-size",
    "filename",
    "cluster-size",
    "format",
    "encrypted",
    "backing-filename",
    "full-backing-filename",
    "dirty-flag",
]


def _pick(d: dict[str, Any]) -> dict[str, Any]:
    return {k: d.get(k) for k in _INFO_KEYS}


@pytest.mark.parametrize("name", ["odd", "sized", "compressed", "over_raw", "over_qcow"])
def test_info_matches_qemu(images: dict[str, tuple[Path, str]], name: str) -> None:
    img, _ = images[name]
    mine = qcowrs.info(img)
    assert isinstance(mine, dict)
    theirs = qemu_info(img)
    mine["filename"] = theirs["filename"] = str(img)
    assert _pick(mine) == _pick(theirs)
    assert list(mine) == [k for k in theirs if k in mine]
    chain = qcowrs.info(images["qcow2_over_qcow"][0], backing_chain=True)
    assert isinstance(chain, list)
    assert [c["format"] for c in chain] == ["qcow2", "qcow", "qcow"]


def test_info_cli_human(
    images: dict[str, tuple[Path, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    img, _ = images["over_raw"]
    assert main(["info", str(img)]) == 0
    out = capsys.readouterr().out
    assert "file format: qcow\n" in out
    assert "cluster_size: 512\n" in out
    assert "backing file: base.raw" in out


def test_encrypted_is_refused_and_described(tmp_path: Path) -> None:
    p = tmp_path / "enc.qcow"
    qemu_img(
        "create", "-q", "-f", "qcow", "--object", "secret,id=s0,data=abc",
        "-o", "encrypt.format=aes,encrypt.key-secret=s0", p, "1M",
    )  # fmt: skip
    h = file_sha256(p)
    info = qcowrs.info(p)
    assert isinstance(info, dict)
    assert info["encrypted"] is True
    assert info["format"] == "qcow"
    with pytest.raises(qcowrs.UnsupportedFeature, match="crypt_method"):
        qcowrs.convert(p, tmp_path / "out.raw", "raw")
    assert file_sha256(p) == h


def test_qcowfile_open_points_to_convert(images: dict[str, tuple[Path, str]]) -> None:
    img, _ = images["odd"]
    with pytest.raises(qcowrs.UnsupportedVersion, match="convert"):
        qcowrs.QcowFile.open(img, "rb")


# --------------------------------------------------------------------------------------------
# Damaged images.


def _l2_entries(p: Path) -> list[tuple[int, int]]:
    """(file offset, value) of every non-zero L2 entry."""
    b = p.read_bytes()
    size, cb, l2b = struct.unpack_from(">QBB", b, 24)
    (l1_off,) = struct.unpack_from(">Q", b, 40)
    n = -(-size // ((1 << cb) << l2b))
    out = []
    for i in range(n):
        (l2,) = struct.unpack_from(">Q", b, l1_off + 8 * i)
        if l2:
            for j in range(1 << l2b):
                (e,) = struct.unpack_from(">Q", b, l2 + 8 * j)
                if e:
                    out.append((l2 + 8 * j, e))
    return out


def _damage(src: Path, dst: Path, how: str) -> None:
    b = bytearray(src.read_bytes())
    if how == "truncated_header":
        del b[40:]
    elif how == "truncated_l1":
        del b[60:]
    elif how == "l1_past_eof":
        struct.pack_into(">Q", b, 40, 1 << 40)
    elif how == "cluster_bits_30":
        b[32] = 30
    elif how == "l2_bits_14":
        b[33] = 14
    elif how == "size_huge":
        struct.pack_into(">Q", b, 24, (1 << 62))
    elif how == "crypt_method":
        struct.pack_into(">I", b, 36, 1)
    elif how == "compressed_past_eof":
        at, _ = next((at, e) for at, e in _l2_entries(src) if e >> 63)
        cb = b[32]
        struct.pack_into(">Q", b, at, 1 << 63 | ((1 << cb) - 1) << (63 - cb) | (len(b) - 10))
    elif how == "data_past_eof":
        at, _ = next((at, e) for at, e in _l2_entries(src) if not e >> 63)
        struct.pack_into(">Q", b, at, 1 << 40)
    elif how == "backing_name_too_long":
        struct.pack_into(">QI", b, 8, 48, 1024)
    dst.write_bytes(bytes(b))


DAMAGE = {
    "truncated_header": "truncated",
    "truncated_l1": "l1_table_offset",
    "l1_past_eof": "l1_table_offset",
    "cluster_bits_30": "cluster_bits",
    "l2_bits_14": "l2_bits",
    "size_huge": "'size'",
    "crypt_method": "crypt_method",
    "compressed_past_eof": "compressed cluster",
    "data_past_eof": "past the end of the file",
    "backing_name_too_long": "backing_file_size",
}


@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_damaged_images_are_refused(
    images: dict[str, tuple[Path, str]], tmp_path: Path, how: str
) -> None:
    src = images["compressed" if how == "compressed_past_eof" else "converted"][0]
    bad = tmp_path / "bad.qcow"
    _damage(src, bad, how)
    h = file_sha256(bad)
    with pytest.raises(qcowrs.QcowError, match=DAMAGE[how]):
        qcowrs.convert(bad, tmp_path / "out.raw", "raw", source_format="qcow")
    # The CLI turns it into one line and exit code 1, never a traceback.
    assert main(["convert", "-O", "raw", str(bad), str(tmp_path / "out2.raw")]) == 1
    assert file_sha256(bad) == h
    assert os.path.getsize(bad) == len(bad.read_bytes())
