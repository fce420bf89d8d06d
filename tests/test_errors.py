"""Malformed inputs: the exception hierarchy, one patched header field per case, truncated,
empty and random files, the corrupt bit, and read-only opens that must not change a byte.

Every malformed input is opened in a child process (conftest.probe), so a crash, an abort or a
hang fails the one test instead of taking the session down, and every case checks that the file
is byte-identical afterwards.

Note: qemu 10 itself is more lenient than qcowrs's contract in places: it opens images whose
L1 table, refcount table or snapshot table lie past the end of the file (reading zeros there),
and rejects a misaligned snapshots_offset even when nb_snapshots is 0.
"""

from __future__ import annotations

import errno
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    HEADER_FIELDS,
    exc_is,
    file_sha256,
    peek,
    poke_field,
    probe,
    qcowrs_sha256,
    qemu_check,
    raw_bytes,
    raw_sha256,
    requires_qemu,
)

ERROR_NAMES = (
    "InvalidMagic",
    "UnsupportedVersion",
    "UnsupportedFeature",
    "InvalidClusterSize",
    "InvalidOffset",
    "InvalidRefcountTableSize",
    "InvalidClusterIndex",
    "CorruptImage",
    "RefcountRebuildRequired",
)


# --------------------------------------------------------------------------------------------
# The hierarchy


def test_qcow_error_is_an_oserror(qcowrs_mod: Any) -> None:
    assert issubclass(qcowrs_mod.QcowError, OSError)
    assert qcowrs_mod.QcowError is qcowrs_mod._errors.QcowError


@pytest.mark.parametrize("name", ERROR_NAMES)
def test_error_subclasses(qcowrs_mod: Any, name: str) -> None:
    cls = getattr(qcowrs_mod, name)
    assert cls is getattr(qcowrs_mod._errors, name)
    assert issubclass(cls, qcowrs_mod.QcowError)
    assert issubclass(cls, OSError)
    assert cls is not qcowrs_mod.QcowError


def test_missing_file_is_a_qcow_error_with_errno(qcowrs_mod: Any, tmp_path: Path) -> None:
    missing = tmp_path / "does-not-exist.qcow2"
    with pytest.raises(qcowrs_mod.QcowError) as ei:
        qcowrs_mod.QcowFile.open(missing, mode="rb")
    assert ei.value.errno == errno.ENOENT
    assert not missing.exists()


@pytest.mark.parametrize(
    "kwargs",
    [{"mode": "w"}, {"mode": "rw"}, {"mode": "rb", "rebuild": True}],
    ids=["mode_w", "mode_rw", "rebuild_needs_rw"],
)
@requires_qemu
def test_bad_open_arguments(qcowrs_mod: Any, valid_image: Path, kwargs: dict[str, Any]) -> None:
    before = file_sha256(valid_image)
    with pytest.raises(ValueError):  # noqa: PT011 - the contract names only the class
        qcowrs_mod.QcowFile.open(valid_image, **kwargs)
    assert file_sha256(valid_image) == before


# --------------------------------------------------------------------------------------------
# One patched header field per case


@dataclass(frozen=True)
class Defect:
    id: str
    patches: dict[str, int]
    errors: tuple[str, ...]  # acceptable qcowrs exception classes
    words: tuple[str, ...]  # the message must contain one of these
    header_only: bool = False  # QcowHeader.read must reject it too
    extra: dict[str, Any] = field(default_factory=dict)


FILE_LEN = 0x160000  # valid_image's length; tables at 0x10000 (reftable) and 0x30000 (L1)
FAR = 0x10000000  # cluster aligned, far past the end of the file

DEFECTS = [
    Defect("bad_magic", {"magic": 0x514649FA}, ("InvalidMagic",), ("magic",), True),
    Defect("zero_magic", {"magic": 0}, ("InvalidMagic",), ("magic",), True),
    Defect("version_1", {"version": 1}, ("UnsupportedVersion",), ("version",), True),
    Defect("version_4", {"version": 4}, ("UnsupportedVersion",), ("version",), True),
    Defect("cluster_bits_8", {"cluster_bits": 8}, ("InvalidClusterSize",), ("cluster_bits",), True),
    Defect(
        "cluster_bits_22", {"cluster_bits": 22}, ("InvalidClusterSize",), ("cluster_bits",), True
    ),
    Defect(
        "l1_table_offset_unaligned",
        {"l1_table_offset": 0x30200},
        ("InvalidOffset",),
        ("l1_table_offset",),
    ),
    Defect(
        "l1_table_offset_past_eof",
        {"l1_table_offset": FAR},
        ("InvalidOffset",),
        ("l1_table_offset",),
    ),
    Defect(
        "refcount_table_offset_unaligned",
        {"refcount_table_offset": 0x10200},
        ("InvalidOffset",),
        ("refcount_table_offset",),
    ),
    Defect(
        "refcount_table_offset_past_eof",
        {"refcount_table_offset": FAR},
        ("InvalidOffset",),
        ("refcount_table_offset",),
    ),
    Defect(
        "snapshots_offset_unaligned",
        {"snapshots_offset": 0x200},
        ("InvalidOffset",),
        ("snapshots_offset",),
    ),
    Defect(
        "l1_size_zero",
        {"l1_size": 0},
        ("CorruptImage", "InvalidOffset"),
        ("l1_size", "l1_table_offset"),
    ),
    Defect(
        "l1_size_too_small_for_size",
        {"size": 1 << 40},
        ("CorruptImage", "InvalidOffset"),
        ("l1_size", "l1_table_offset"),
    ),
    Defect(
        "l1_table_past_eof",
        {"l1_size": 0x40000},
        ("CorruptImage", "InvalidOffset"),
        ("l1_size", "l1_table_offset"),
    ),
    Defect(
        "l1_size_huge",
        {"l1_size": 0xFFFFFFFF},
        ("CorruptImage", "InvalidOffset"),
        ("l1_size", "l1_table_offset"),
    ),
    Defect(
        "refcount_table_clusters_0",
        {"refcount_table_clusters": 0},
        ("InvalidRefcountTableSize",),
        ("refcount_table_clusters",),
    ),
    Defect(
        "refcount_table_clusters_huge",
        {"refcount_table_clusters": 0xFFFFFFFF},
        ("InvalidRefcountTableSize", "InvalidOffset"),
        ("refcount_table",),
    ),
    Defect("refcount_order_7", {"refcount_order": 7}, ("CorruptImage",), ("refcount_order",)),
    Defect(
        "incompatible_bit_40",
        {"incompatible_features": 1 << 40},
        ("UnsupportedFeature",),
        ("incompatible_features",),
    ),
    Defect(
        "incompatible_bit_5",
        {"incompatible_features": 1 << 5},
        ("UnsupportedFeature",),
        ("incompatible_features",),
    ),
    Defect("crypt_method_aes", {"crypt_method": 1}, ("UnsupportedFeature",), ("crypt_method",)),
    Defect("crypt_method_luks", {"crypt_method": 2}, ("UnsupportedFeature",), ("crypt_method",)),
]


def assert_rejected(
    result: dict[str, Any], errors: tuple[str, ...], words: tuple[str, ...] = ()
) -> None:
    assert not result["ok"], f"expected {errors}, but the open succeeded: {result}"
    assert exc_is(result, *errors), (
        f"expected one of {errors}, got {result['exc']}: {result['msg']}\n{result.get('tb')}"
    )
    if words:
        assert any(w in result["msg"] for w in words), (
            f"message {result['msg']!r} names none of {words}"
        )


@requires_qemu
@pytest.mark.parametrize("mode", ["rb", "r+b"])
@pytest.mark.parametrize("defect", DEFECTS, ids=[d.id for d in DEFECTS])
def test_malformed_header(qcowrs_mod: Any, valid_copy: Path, defect: Defect, mode: str) -> None:
    for name, value in defect.patches.items():
        poke_field(valid_copy, name, value)
    before = file_sha256(valid_copy)
    assert_rejected(probe(valid_copy, mode=mode), defect.errors, defect.words)
    if defect.header_only and mode == "rb":
        assert_rejected(probe(valid_copy, action="header"), defect.errors, defect.words)
    assert file_sha256(valid_copy) == before, "a failed open modified the file"


@requires_qemu
def test_snapshot_table_past_eof_still_opens(
    qcowrs_mod: Any, valid_image: Path, valid_copy: Path
) -> None:
    """Issue 8: an image whose only damage is its snapshot table opens and reads its active
    disk, as QEMU's does (this was an InvalidOffset on open before); check reports the
    damage with qemu-img's exit code."""
    poke_field(valid_copy, "snapshots_offset", FAR)
    poke_field(valid_copy, "nb_snapshots", 1)
    before = file_sha256(valid_copy)
    want = raw_bytes(valid_image)
    for mode in ("rb", "r+b"):
        with qcowrs_mod.QcowFile.open(valid_copy, mode=mode) as f:
            assert f.read() == want
    assert file_sha256(valid_copy) == before
    qrc, _, _ = qemu_check(valid_copy)
    assert qcowrs_mod.check(valid_copy).exit_code == qrc
    assert file_sha256(valid_copy) == before


@requires_qemu
@pytest.mark.parametrize("name", list(HEADER_FIELDS))
@pytest.mark.parametrize("fill", ["zeros", "ones", "top_bit"])
def test_header_field_sweep_never_crashes(
    qcowrs_mod: Any, valid_copy: Path, name: str, fill: str
) -> None:
    """Every field set to 0 / all ones / top bit only: a clean QcowError or a working image."""
    off, fmt = HEADER_FIELDS[name]
    bits = {">B": 8, ">I": 32, ">Q": 64}[fmt]
    value = {"zeros": 0, "ones": (1 << bits) - 1, "top_bit": 1 << (bits - 1)}[fill]
    unchanged = peek(valid_copy, off, fmt) == value
    poke_field(valid_copy, name, value)
    before = file_sha256(valid_copy)
    result = probe(valid_copy, action="read")
    if unchanged:  # still the valid image
        assert result["ok"], result
    if not result["ok"]:
        assert exc_is(result, "QcowError"), f"{result['exc']}: {result['msg']}\n{result['tb']}"
        assert result["msg"], "empty error message"
    assert file_sha256(valid_copy) == before


# --------------------------------------------------------------------------------------------
# The corrupt and dirty bits


@requires_qemu
def test_corrupt_bit_refuses_read_write(
    qcowrs_mod: Any, valid_image: Path, valid_copy: Path
) -> None:
    poke_field(valid_copy, "incompatible_features", 1 << 1)
    before = file_sha256(valid_copy)
    assert_rejected(probe(valid_copy, mode="r+b"), ("CorruptImage",), ("corrupt",))
    assert file_sha256(valid_copy) == before


@requires_qemu
def test_corrupt_bit_read_only_works(qcowrs_mod: Any, valid_image: Path, valid_copy: Path) -> None:
    poke_field(valid_copy, "incompatible_features", 1 << 1)
    before = file_sha256(valid_copy)
    result = probe(valid_copy, mode="rb", action="read")
    assert result["ok"], result
    assert result["sha256"] == raw_sha256(valid_image) == raw_sha256(valid_copy)
    assert qcowrs_sha256(valid_copy) == result["sha256"]
    assert file_sha256(valid_copy) == before


@requires_qemu
def test_dirty_bit_read_only_reads_and_keeps_the_bit(
    qcowrs_mod: Any, valid_image: Path, valid_copy: Path
) -> None:
    poke_field(valid_copy, "incompatible_features", 1 << 0)
    before = file_sha256(valid_copy)
    with qcowrs_mod.QcowFile.open(valid_copy, mode="rb") as f:
        assert f.header.incompatible_features & 1
        f.allocated_ranges()
    assert qcowrs_sha256(valid_copy) == raw_sha256(valid_image)
    assert file_sha256(valid_copy) == before


# --------------------------------------------------------------------------------------------
# Truncated, empty and random files


@dataclass(frozen=True)
class Cut:
    id: str
    length: int
    # "magic": InvalidMagic naming the magic; "header": InvalidOffset naming a header table
    # offset; "l1": the L1 table (and everything after it) is cut, InvalidOffset or
    # CorruptImage naming l1_size/l1_table_offset; "error": open, a full read or
    # allocated_ranges() raises some QcowError (qemu would read zeros past the end).
    expect: str


CUTS = [
    Cut("empty", 0, "magic"),
    Cut("three_bytes", 3, "magic"),
    Cut("mid_header", 50, "error"),
    Cut("inside_cluster_0", 0x8000, "header"),
    Cut("at_refcount_table", 0x10000, "header"),
    Cut("mid_refcount_table", 0x18000, "l1"),
    Cut("mid_refcount_block", 0x28000, "l1"),
    Cut("mid_l1_table", 0x30004, "l1"),
    Cut("mid_l2_table", 0x40100, "error"),
    Cut("mid_data", 0x100000, "error"),
    Cut("last_byte_missing", FILE_LEN - 1, "error"),
]


@requires_qemu
@pytest.mark.parametrize("cut", CUTS, ids=[c.id for c in CUTS])
def test_truncated_file(qcowrs_mod: Any, valid_copy: Path, cut: Cut) -> None:
    assert valid_copy.stat().st_size == FILE_LEN, "valid_image layout changed"
    os.truncate(valid_copy, cut.length)
    before = file_sha256(valid_copy)
    result = probe(valid_copy, mode="rb", action="read")
    if cut.expect == "magic":
        assert_rejected(result, ("InvalidMagic",), ("magic",))
    elif cut.expect == "header":
        assert_rejected(result, ("InvalidOffset",), ("_offset",))
    elif cut.expect == "l1":
        assert_rejected(result, ("InvalidOffset", "CorruptImage"), ("l1_size", "l1_table_offset"))
    else:
        assert_rejected(result, ("QcowError",))
    assert file_sha256(valid_copy) == before


@requires_qemu
def test_truncated_file_read_write_open(qcowrs_mod: Any, valid_copy: Path) -> None:
    os.truncate(valid_copy, 0x30004)
    before = file_sha256(valid_copy)
    assert_rejected(
        probe(valid_copy, mode="r+b"),
        ("InvalidOffset", "CorruptImage"),
        ("l1_size", "l1_table_offset"),
    )
    assert file_sha256(valid_copy) == before


@pytest.mark.parametrize("seed", range(4))
def test_random_bytes(qcowrs_mod: Any, tmp_path: Path, seed: int) -> None:
    p = tmp_path / "random.qcow2"
    data = random.Random(seed).randbytes(64 * 1024 * (seed + 1))
    if data[:4] == b"QFI\xfb":
        data = b"\0" + data[1:]
    p.write_bytes(data)
    for mode in ("rb", "r+b"):
        assert_rejected(probe(p, mode=mode), ("InvalidMagic",), ("magic",))
    assert_rejected(probe(p, action="header"), ("InvalidMagic",), ("magic",))
    assert p.read_bytes() == data


@pytest.mark.parametrize("seed", range(6))
def test_random_bytes_after_a_valid_magic(qcowrs_mod: Any, tmp_path: Path, seed: int) -> None:
    """Magic and version 2/3 followed by garbage: a QcowError or a readable image, no crash."""
    rng = random.Random(1000 + seed)
    data = bytearray(rng.randbytes(4096 * (seed + 1)))
    data[0:8] = b"QFI\xfb" + (2 + seed % 2).to_bytes(4, "big")
    if seed >= 3:  # plausible geometry so that parsing gets further
        data[20:24] = (9 + seed).to_bytes(4, "big")  # cluster_bits
        data[24:32] = (1 << 20).to_bytes(8, "big")  # size
        data[32:36] = bytes(4)  # crypt_method
    p = tmp_path / "garbage.qcow2"
    p.write_bytes(bytes(data))
    for mode in ("rb", "r+b"):
        result = probe(p, mode=mode, action="read")
        if not result["ok"]:
            assert exc_is(result, "QcowError"), f"{result['exc']}: {result['msg']}"
    assert p.read_bytes() == bytes(data)


def test_empty_file_in_process(qcowrs_mod: Any, tmp_path: Path) -> None:
    p = tmp_path / "empty.qcow2"
    p.write_bytes(b"")
    with pytest.raises(qcowrs_mod.InvalidMagic, match="magic"):
        qcowrs_mod.QcowFile.open(p, mode="rb")
    with pytest.raises(qcowrs_mod.InvalidMagic, match="magic"):
        qcowrs_mod.QcowHeader.read(p)
    assert p.read_bytes() == b""


@requires_qemu
def test_in_process_errors_are_catchable_as_oserror(qcowrs_mod: Any, valid_copy: Path) -> None:
    poke_field(valid_copy, "version", 4)
    before = file_sha256(valid_copy)
    for mode in ("rb", "r+b"):
        with pytest.raises(OSError, match="version") as ei:
            qcowrs_mod.QcowFile.open(valid_copy, mode=mode)
        assert isinstance(ei.value, qcowrs_mod.UnsupportedVersion)
        assert isinstance(ei.value, qcowrs_mod.QcowError)
    assert file_sha256(valid_copy) == before


# --------------------------------------------------------------------------------------------
# Read-only opens of valid images change nothing


@requires_qemu
@pytest.mark.parametrize(
    "opts",
    [{}, {"compat": "0.10"}, {"lazy_refcounts": "on"}, {"extended_l2": "on"}],
    ids=["v3", "v2", "lazy", "ext_l2"],
)
def test_read_only_open_leaves_file_identical(
    qcowrs_mod: Any, builder: Any, opts: dict[str, Any]
) -> None:
    p = builder.create("ro.qcow2", "2M", **opts)
    builder.io("ro.qcow2", "write -P 0x42 1000 70000", "write -z 1M 64K")
    before = file_sha256(p)
    st = p.stat()
    with qcowrs_mod.QcowFile.open(p, mode="rb") as f:
        f.read()
        f.seek(12345)
        f.read(1 << 16)
        f.allocated_ranges()
        _ = f.header, f.virtual_size, f.cluster_size
    qcowrs_mod.QcowHeader.read(p)
    assert file_sha256(p) == before
    assert p.stat().st_size == st.st_size
    assert p.stat().st_mtime_ns == st.st_mtime_ns


@requires_qemu
def test_write_on_a_read_only_handle_is_refused(qcowrs_mod: Any, valid_image: Path) -> None:
    before = file_sha256(valid_image)
    with qcowrs_mod.QcowFile.open(valid_image, mode="rb") as f:
        assert not f.writable()
        # io.UnsupportedOperation (what FileIO raises) and QcowError are both OSErrors.
        with pytest.raises(OSError):  # noqa: PT011
            f.write(b"x")
        assert f.tell() == 0
    assert file_sha256(valid_image) == before
