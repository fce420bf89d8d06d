"""Crafted hostile and damaged images, one named generator each (issue 8).

Every generator builds one image in a directory (with qemu-img/qemu-io, then patches bytes) and
returns a `Case`: the image, and any operation beyond the standard ones (`test_hostile.py`
runs every read-only operation, a check, a repair and a write on each). The names say what is
wrong; the docstrings say what used to go wrong.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from conftest import (
    QEMU_IO,
    Refcounts,
    parse_header,
    peek,
    poke,
    poke_field,
    qemu_img,
    qemu_io,
    run,
)

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30


@dataclass
class Case:
    """A built image and what to do with it besides the standard operations."""

    image: Path
    extra_ops: list[list[str]] = field(default_factory=list)
    # The image is valid (QEMU-clean): the standard write must then keep it so.
    valid: bool = False


GENERATORS: dict[str, Callable[[Path], Case]] = {}


def generator(fn: Callable[[Path], Case]) -> Callable[[Path], Case]:
    GENERATORS[fn.__name__.removeprefix("gen_")] = fn
    return fn


# --------------------------------------------------------------------------------------------
# Building blocks


def make(
    d: Path, name: str = "img.qcow2", size: str = "64M", data: bool = True, **opts: object
) -> Path:
    """`qemu-img create` (options as `-o k=v`) and, with `data`, 1 MiB of 0xab at 0 and 64 KiB
    of 0xcd at 3 MiB."""
    p = d / name
    args = ["create", "-q", "-f", "qcow2"]
    if opts:
        args += ["-o", ",".join(f"{k}={v}" for k, v in opts.items())]
    # Relative names (a data file) are stored as given and made beside the image.
    qemu_img(*args, name, size, cwd=d)
    if data:
        qio(p, "write -P 0xab 0 1M", "write -P 0xcd 3M 64k")
    return p


def qio(p: Path, *cmds: str) -> None:
    """qemu-io in the image's directory (QEMU resolves a relative data file name from the
    working directory)."""
    argv: list[str] = [QEMU_IO or "qemu-io", "-f", "qcow2"]
    for c in cmds:
        argv += ["-c", c]
    run([*argv, p.name], cwd=p.parent)


def hdr(p: Path) -> dict[str, int]:
    return parse_header(p)


def l1_entry(p: Path, i: int = 0) -> int:
    return peek(p, hdr(p)["l1_table_offset"] + 8 * i, ">Q")


def l2_offset(p: Path, i: int = 0) -> int:
    return l1_entry(p, i) & 0x00FF_FFFF_FFFF_FE00


def set_l2(p: Path, index: int, value: int, l1_index: int = 0) -> None:
    poke(p, l2_offset(p, l1_index) + 8 * index, ">Q", value)


def header_field(p: Path, name: str, value: int) -> Path:
    poke_field(p, name, value)
    return p


def simple(patch: Callable[[Path], object], **make_opts: object) -> Callable[[Path], Case]:
    """A generator: the default image, then `patch`."""

    def build(d: Path) -> Case:
        p = make(d, **make_opts)  # type: ignore[arg-type]
        patch(p)
        return Case(p)

    return build


def register(name: str, build: Callable[[Path], Case]) -> None:
    GENERATORS[name] = build


def field_case(name: str, field_name: str, value: int, **make_opts: object) -> None:
    register(name, simple(lambda p: header_field(p, field_name, value), **make_opts))


def bitmaps_ext(p: Path) -> tuple[int, int, int]:
    """(nb_bitmaps, directory size, directory offset) from the bitmaps header extension."""
    h = hdr(p)
    with open(p, "rb") as fh:
        cluster0 = fh.read(h["cluster_size"])
    off = h["header_length"]
    while off + 8 <= len(cluster0):
        kind, length = struct.unpack_from(">II", cluster0, off)
        if kind == 0:
            break
        if kind == 0x23852875:
            nb, _, size, offset = struct.unpack_from(">IIQQ", cluster0, off + 8)
            return nb, size, offset
        off += 8 + (length + 7) // 8 * 8
    raise AssertionError("no bitmaps extension")


def with_bitmap(d: Path, granularity: int | None = None) -> tuple[Path, int, int]:
    """An image with one persistent, enabled bitmap; returns (image, directory offset, table
    offset)."""
    p = make(d)
    args = ["bitmap", "--add", p, "b0"]
    if granularity is not None:
        args[2:2] = ["-g", str(granularity)]
    qemu_img(*args)
    _, _, dir_off = bitmaps_ext(p)
    table = peek(p, dir_off, ">Q")
    return p, dir_off, table


# --------------------------------------------------------------------------------------------
# Header fields

field_case("magic_bad", "magic", 0x51464900)
field_case("version_4", "version", 4)
field_case("version_1", "version", 1)
field_case("cluster_bits_8", "cluster_bits", 8)
field_case("cluster_bits_22", "cluster_bits", 22)
field_case("crypt_method_luks", "crypt_method", 2)
field_case("crypt_method_aes", "crypt_method", 1)
field_case("incompat_unknown_bit", "incompatible_features", 1 << 40)
field_case("refcount_order_7", "refcount_order", 7)
field_case("header_length_huge", "header_length", 0xFFFF_FFF8)
field_case("header_length_unaligned", "header_length", 113)
field_case("compression_type_2", "compression_type", 2)
field_case("compression_bit_without_type", "incompatible_features", 1 << 3)
field_case("data_file_bit_without_name", "incompatible_features", 1 << 2)
field_case("backing_offset_past_cluster0", "backing_file_offset", 1 << 20)
field_case("virtual_size_2_63", "size", 1 << 63)
field_case("l1_size_huge", "l1_size", 0x7FFF_FFFF)
field_case("l1_offset_unaligned", "l1_table_offset", 0x30200)
field_case("l1_offset_zero", "l1_table_offset", 0)
field_case("l1_past_eof", "l1_table_offset", 0x1000_0000)
field_case("reftable_offset_unaligned", "refcount_table_offset", 0x10200)
field_case("reftable_past_eof", "refcount_table_offset", 0x1000_0000)
field_case("reftable_clusters_zero", "refcount_table_clusters", 0)
field_case("reftable_clusters_0x9001", "refcount_table_clusters", 0x9001)
field_case("reftable_clusters_max", "refcount_table_clusters", 0xFFFF_FFFF)
field_case("nb_snapshots_huge", "nb_snapshots", 0xFFFF_FFFF)
field_case("snapshots_offset_unaligned", "snapshots_offset", 0x200)


@generator
def gen_extended_l2_small_clusters(d: Path) -> Case:
    p = make(d, cluster_size=4096)
    poke_field(p, "incompatible_features", 1 << 4)
    return Case(p)


@generator
def gen_backing_size_1024(d: Path) -> Case:
    p = make(d)
    poke_field(p, "backing_file_offset", 0x200)
    poke_field(p, "backing_file_size", 1024)
    return Case(p)


@generator
def gen_snapshot_table_at_zero_65536(d: Path) -> Case:
    """qemu-img check fails ("too much extra metadata"); qcowrs.check used to raise."""
    p = make(d)
    poke_field(p, "nb_snapshots", 65536)
    poke_field(p, "snapshots_offset", 0)
    return Case(p)


@generator
def gen_file_cut_after_header(d: Path) -> Case:
    """The L1 table and the refcount structure lie past the end of the file."""
    p = make(d)
    os.truncate(p, 512)
    return Case(p)


@generator
def gen_header_extensions_262130(d: Path) -> Case:
    """A 2 MiB cluster 0 full of tiny unknown extensions (was quadratic: 27 s per open)."""
    p = make(d, cluster_size=2 * MiB, data=False)
    h = hdr(p)
    ext = struct.pack(">II", 0x12345678, 0)
    n = (2 * MiB - h["header_length"] - 8) // 8
    with open(p, "r+b") as fh:
        fh.seek(h["header_length"])
        # Distinct types, each once (a repeated type is refused).
        fh.write(b"".join(struct.pack(">II", 0x10000000 + i, 0) for i in range(n)))
        fh.write(bytes(8))
    del ext
    return Case(p)


@generator
def gen_header_extension_twice(d: Path) -> Case:
    p = make(d)
    h = hdr(p)
    with open(p, "r+b") as fh:
        fh.seek(h["header_length"])
        fh.write(struct.pack(">II", 0x0BADF00D, 0) * 2 + bytes(8))
    return Case(p)


@generator
def gen_header_extension_overrun(d: Path) -> Case:
    p = make(d)
    h = hdr(p)
    with open(p, "r+b") as fh:
        fh.seek(h["header_length"])
        fh.write(struct.pack(">II", 0x0BADF00D, 0xFFFF_FFF0))
    return Case(p)


@generator
def gen_crypto_ext_2_40(d: Path) -> Case:
    """An unencrypted image with a crypto header extension covering 2^40 bytes past the end
    (a repair used to grow the file to 64 GiB)."""
    p = make(d)
    h = hdr(p)
    with open(p, "r+b") as fh:
        fh.seek(h["header_length"])
        fh.write(struct.pack(">IIQQ", 0x0537BE77, 16, 0x10_0000_0000, 1 << 40) + bytes(8))
    return Case(p)


# --------------------------------------------------------------------------------------------
# L1 and L2 tables


register(
    "l1_entry_reserved_bits",
    simple(lambda p: poke(p, hdr(p)["l1_table_offset"], ">Q", l1_entry(p) | 0x7F00_0000_0000_0000)),
)
register(
    "l1_entry_misaligned",
    simple(lambda p: poke(p, hdr(p)["l1_table_offset"], ">Q", l1_entry(p) | 0x200)),
)
register(
    "l1_entry_past_eof",
    simple(lambda p: poke(p, hdr(p)["l1_table_offset"], ">Q", (1 << 63) | 0x10_0000_0000)),
)
register(
    "l2_entry_reserved_bits",
    simple(lambda p: set_l2(p, 0, peek(p, l2_offset(p), ">Q") | 0x3F00_0000_0000_0000)),
)
register("l2_entry_misaligned", simple(lambda p: set_l2(p, 0, peek(p, l2_offset(p), ">Q") | 0x200)))
register("l2_points_at_header", simple(lambda p: set_l2(p, 0, (1 << 63) | 0x200)))
register("l2_points_at_l1", simple(lambda p: set_l2(p, 0, (1 << 63) | hdr(p)["l1_table_offset"])))
register(
    "l2_points_at_reftable",
    simple(lambda p: set_l2(p, 0, (1 << 63) | hdr(p)["refcount_table_offset"])),
)
register("l2_cross_link", simple(lambda p: set_l2(p, 1, peek(p, l2_offset(p), ">Q"))))


@generator
def gen_l2_entries_past_eof(d: Path) -> Case:
    """A 24 MiB image whose L2 entries point just past the end of the file (a repair used to
    grow it to 2 TiB)."""
    p = make(d, data=False)
    qemu_io(p, "write -P 0x5a 0 24M")
    size = p.stat().st_size
    cs = 65536
    for i in range(0, 384, 3):
        set_l2(p, i, (1 << 63) | ((size + cs - 1) // cs * cs + i * cs))
    return Case(p)


@generator
def gen_l1_entries_share_l2(d: Path) -> Case:
    """16384 L1 entries sharing one L2 table of alternating data and zero entries: 134 M
    ranges from a 448 KiB file (allocated_ranges used to abort the process)."""
    p = make(d, size="8T", data=False, cluster_size=65536)
    qemu_io(p, "write -P 0x11 0 64k")
    h = hdr(p)
    l2 = l2_offset(p)
    data = peek(p, l2, ">Q")
    table = b"".join(struct.pack(">Q", data if i % 2 == 0 else 1) for i in range(8192))
    with open(p, "r+b") as fh:
        fh.seek(l2)
        fh.write(table)
        fh.seek(h["l1_table_offset"])
        fh.write(struct.pack(">Q", (1 << 63) | l2) * min(16384, h["l1_size"]))
    return Case(p)


@generator
def gen_compressed_past_eof(d: Path) -> Case:
    p = make(d, data=False)
    qemu_io(p, "write -c -P 0x22 0 64k")
    set_l2(p, 0, (1 << 62) | (3 << 54) | 0x10_0000_0000)
    return Case(p)


@generator
def gen_compressed_garbage(d: Path) -> Case:
    p = make(d, data=False)
    qemu_io(p, "write -c -P 0x22 0 64k")
    e = peek(p, l2_offset(p), ">Q")
    poke(p, e & ((1 << 54) - 1), ">Q", 0xFFFF_FFFF_FFFF_FFFF)
    return Case(p)


@generator
def gen_compressed_max_size(d: Path) -> Case:
    """A compressed entry claiming the largest size the descriptor allows."""
    p = make(d, data=False)
    qemu_io(p, "write -c -P 0x22 0 64k")
    e = peek(p, l2_offset(p), ">Q")
    set_l2(p, 0, e | (0xFF << 54))
    return Case(p)


@generator
def gen_compressed_zstd_garbage(d: Path) -> Case:
    p = make(d, data=False, compression_type="zstd")
    qemu_io(p, "write -c -P 0x22 0 64k")
    e = peek(p, l2_offset(p), ">Q")
    poke(p, e & ((1 << 54) - 1), ">Q", 0x28B52FFD_FFFF_FFFF)
    return Case(p)


def _ext_l2(d: Path) -> Path:
    return make(d, extended_l2="on")


@generator
def gen_extended_l2_alloc_and_zero(d: Path) -> Case:
    p = _ext_l2(d)
    poke(p, l2_offset(p) + 8, ">Q", 0x0000_0001_0000_0001)
    return Case(p)


@generator
def gen_extended_l2_compressed_with_bitmap(d: Path) -> Case:
    """A compressed entry with a non-zero subcluster bitmap: the walker skipped it and a
    rebuild used to overwrite its data."""
    p = make(d, data=False, extended_l2="on")
    qemu_io(p, "write -c -P 0x22 0 64k", "write -P 0x33 1M 64k")
    poke(p, l2_offset(p) + 8, ">Q", 1)
    Refcounts(p).set(0, 0)  # stale refcounts: the next repair rebuilds
    return Case(p)


@generator
def gen_extended_l2_unallocated_with_alloc_bits(d: Path) -> Case:
    p = _ext_l2(d)
    poke(p, l2_offset(p) + 16 * 100 + 8, ">Q", 0xFF)
    return Case(p)


# --------------------------------------------------------------------------------------------
# Refcount structure


def _reftable_entry(p: Path, value: int) -> None:
    poke(p, hdr(p)["refcount_table_offset"], ">Q", value)


register(
    "reftable_entry_reserved_bits",
    simple(lambda p: _reftable_entry(p, peek(p, hdr(p)["refcount_table_offset"], ">Q") | 1)),
)
register("reftable_entry_misaligned", simple(lambda p: _reftable_entry(p, 0x20200)))
register("refblock_past_eof", simple(lambda p: _reftable_entry(p, 0x10_0000_0000)))
register("refblock_is_header", simple(lambda p: _reftable_entry(p, 0)))
register("refblock_is_l2", simple(lambda p: _reftable_entry(p, l2_offset(p))))
register("cluster0_refcount_zero", simple(lambda p: Refcounts(p).set(0, 0)))


@generator
def gen_dirty_lazy_stale(d: Path) -> Case:
    p = make(d, lazy_refcounts="on")
    Refcounts(p).set(5, 0)
    poke_field(p, "incompatible_features", 1)
    return Case(p)


@generator
def gen_l2_is_reftable_1bit(d: Path) -> Case:
    """A 1-bit-refcount image whose L2 table is the refcount table: a repair used to write into
    the overlapping metadata and change guest data."""
    p = make(d, refcount_bits=1)
    h = hdr(p)
    poke(p, h["l1_table_offset"], ">Q", (1 << 63) | h["refcount_table_offset"])
    return Case(p)


@generator
def gen_first_write_2mib_1bit(d: Path) -> Case:
    """A valid 42 MiB image with 2 MiB clusters and 1-bit refcounts: the first write used to
    decode each refblock into a 128 MiB vector."""
    p = make(d, size="42M", data=False, cluster_size=2 * MiB, refcount_bits=1)
    qemu_io(p, "write -P 0x44 0 4M")
    return Case(p, valid=True)


@generator
def gen_truncate_wrap_2mib_1bit(d: Path) -> Case:
    """A valid 2 MiB-cluster, 1-bit-refcount image whose last refblock marks its last cluster
    used; truncate() near 2^57 used to wrap an offset to 0 and write the L1 over the header."""
    p = make(d, size="64M", data=False, cluster_size=2 * MiB, refcount_bits=1)
    qemu_io(p, "write -P 0x44 0 4M")
    rc = Refcounts(p)
    # The refcount of the last cluster refblock 0 covers (past the end of the file, where
    # refcounts are not checked).
    rc.set(rc.rb_entries - 1, 1)
    return Case(p, extra_ops=[["truncate", str((1 << 57) - 2 * MiB)]])


# --------------------------------------------------------------------------------------------
# Snapshot table


def _with_snapshot(d: Path, n: int = 1) -> Path:
    p = make(d)
    for i in range(n):
        qemu_img("snapshot", "-c", f"s{i}", p)
    return p


@generator
def gen_snapshot_extra_2000(d: Path) -> Case:
    p = _with_snapshot(d)
    poke(p, hdr(p)["snapshots_offset"] + 36, ">I", 2000)
    return Case(p)


@generator
def gen_snapshot_bad_count(d: Path) -> Case:
    p = _with_snapshot(d, 2)
    poke_field(p, "nb_snapshots", 9)
    return Case(p)


@generator
def gen_snapshot_id_name_65535(d: Path) -> Case:
    """A snapshot entry with a 65535-byte id and name: the walk was incomplete, and a rebuild
    used to append its structure where the entry reads and drop the snapshot's refcounts."""
    p = _with_snapshot(d)
    so = hdr(p)["snapshots_offset"]
    poke(p, so + 12, ">H", 0xFFFF)
    poke(p, so + 14, ">H", 0xFFFF)
    Refcounts(p).set(0, 0)
    return Case(p)


register(
    "snapshot_l1_unaligned",
    lambda d: Case(
        _patched(
            _with_snapshot(d),
            lambda p: poke(
                p,
                hdr(p)["snapshots_offset"],
                ">Q",
                peek(p, hdr(p)["snapshots_offset"], ">Q") + 0x200,
            ),
        )
    ),
)
register(
    "snapshot_l1_huge",
    lambda d: Case(
        _patched(
            _with_snapshot(d), lambda p: poke(p, hdr(p)["snapshots_offset"] + 8, ">I", 0x7FFF_FFFF)
        )
    ),
)
register(
    "snapshot_table_over_l1",
    lambda d: Case(
        _patched(
            _with_snapshot(d),
            lambda p: poke_field(p, "snapshots_offset", hdr(p)["l1_table_offset"]),
        )
    ),
)


def _patched(p: Path, patch: Callable[[Path], object]) -> Path:
    patch(p)
    return p


@generator
def gen_snapshots_4000_share_l2(d: Path) -> Case:
    """4000 snapshots whose L1 tables share one full L2 table (check used to take 20 s and the
    first write 60 s)."""
    p = make(d, size="512M", data=False)
    qemu_io(p, "write -P 0x66 0 512M")
    qemu_img("snapshot", "-c", "s0", p)
    h = hdr(p)
    so = h["snapshots_offset"]
    with open(p, "rb") as fh:
        fh.seek(so)
        entry = bytearray(fh.read(4096))
    id_len, name_len = struct.unpack_from(">HH", entry, 12)
    extra = struct.unpack_from(">I", entry, 36)[0]
    size = (40 + extra + id_len + name_len + 7) // 8 * 8
    # The file may end right after the entry (QEMU does not pad it): pad to the 8-byte size.
    entry = entry[:size].ljust(size, b"\0")
    n = 4000
    end = p.stat().st_size
    table_at = (end + 65535) // 65536 * 65536
    with open(p, "r+b") as fh:
        fh.seek(table_at)
        fh.write(bytes(entry) * n)
    poke_field(p, "nb_snapshots", n)
    poke_field(p, "snapshots_offset", table_at)
    return Case(p)


# --------------------------------------------------------------------------------------------
# Persistent bitmaps


@generator
def gen_bitmap_table_on_guest_data(d: Path) -> Case:
    """A bitmap table entry pointing at a guest data cluster (refcounts say it is shared, so
    QEMU calls it clean); closing after a write used to set bits in the guest data."""
    p, _, table = with_bitmap(d)
    entry = peek(p, l2_offset(p), ">Q")
    data = entry & 0x00FF_FFFF_FFFF_FE00
    poke(p, table, ">Q", data)
    # Shared: refcount 2 and no OFLAG_COPIED on the guest's entry (QEMU-clean).
    Refcounts(p).set(data // 65536, 2)
    set_l2(p, 0, entry & ~(1 << 63))
    return Case(p, extra_ops=[["write-close"]])


@generator
def gen_bitmap_table_on_l1(d: Path) -> Case:
    """A bitmap table placed on the L1 table: write_zeroes over the disk used to fill L1[0] with
    ones."""
    p, dir_off, _ = with_bitmap(d)
    poke(p, dir_off, ">Q", hdr(p)["l1_table_offset"])
    return Case(p, extra_ops=[["zeroes-close"]])


@generator
def gen_bitmap_granularity_0(d: Path) -> Case:
    """A bitmap of granularity 2^0: write_zeroes over the disk used to allocate 64 KiB per table
    entry without bound."""
    p, dir_off, _ = with_bitmap(d)
    poke(p, dir_off + 17, ">B", 0)
    return Case(p, extra_ops=[["zeroes-close"]])


@generator
def gen_bitmap_directory_past_eof(d: Path) -> Case:
    p, _, _ = with_bitmap(d)
    h = hdr(p)
    with open(p, "rb") as fh:
        c0 = bytearray(fh.read(h["cluster_size"]))
    off = c0.find(struct.pack(">I", 0x23852875))
    struct.pack_into(">Q", c0, off + 8 + 16, 0x10_0000_0000)
    with open(p, "r+b") as fh:
        fh.write(c0)
    return Case(p)


@generator
def gen_bitmap_table_size_huge(d: Path) -> Case:
    p, dir_off, _ = with_bitmap(d)
    poke(p, dir_off + 8, ">I", 0xFFFF_FFFF)
    return Case(p, extra_ops=[["write-close"]])


# --------------------------------------------------------------------------------------------
# Files around the image: backing files, data files


def _overlay(d: Path, backing: str, fmt: str = "qcow2", name: str = "img.qcow2") -> Path:
    p = d / name
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", fmt, p, "64M")
    return p


@generator
def gen_backing_fifo(d: Path) -> Case:
    """A backing file that is a FIFO: every open used to block forever."""
    os.mkfifo(d / "fifo")
    return Case(_overlay(d, "fifo", "raw"))


@generator
def gen_backing_directory(d: Path) -> Case:
    (d / "dir").mkdir()
    return Case(_overlay(d, "dir", "raw"))


@generator
def gen_backing_dev_zero(d: Path) -> Case:
    return Case(_overlay(d, "/dev/zero", "raw"))


@generator
def gen_backing_proc_file(d: Path) -> Case:
    return Case(_overlay(d, "/proc/self/status", "raw"))


@generator
def gen_backing_symlink_loop(d: Path) -> Case:
    os.symlink("loop2", d / "loop1")
    os.symlink("loop1", d / "loop2")
    return Case(_overlay(d, "loop1", "qcow2"))


@generator
def gen_backing_self(d: Path) -> Case:
    return Case(_overlay(d, "img.qcow2"))


@generator
def gen_backing_loop_two(d: Path) -> Case:
    _overlay(d, "b.qcow2", name="a.qcow2")
    _overlay(d, "a.qcow2", name="b.qcow2")
    return Case(d / "a.qcow2")


@generator
def gen_backing_self_32mib_l1(d: Path) -> Case:
    """An image backed by itself with a 32 MiB L1 table: 31 nested opens used to exhaust
    memory."""
    p = d / "img.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "img.qcow2", "-F", "qcow2", p, "1P")
    return Case(p)


@generator
def gen_chain_100_deep(d: Path) -> Case:
    """A valid 100-deep backing chain (used to be refused as deeper than 32 images)."""
    qemu_img("create", "-q", "-f", "qcow2", d / "c0.qcow2", "16M")
    qemu_io(d / "c0.qcow2", "write -P 0x01 0 64k")
    for i in range(1, 100):
        qemu_img(
            "create", "-q", "-f", "qcow2", "-b", f"c{i - 1}.qcow2", "-F", "qcow2", d / f"c{i}.qcow2"
        )
    qemu_io(d / "c99.qcow2", "write -P 0x63 1M 64k")
    return Case(d / "c99.qcow2", valid=True)


@generator
def gen_data_file_fifo(d: Path) -> Case:
    p = make(d, data=False, data_file="data.raw")
    (d / "data.raw").unlink()
    os.mkfifo(d / "data.raw")
    return Case(p)


@generator
def gen_data_file_is_the_image(d: Path) -> Case:
    """An external data file that is the image itself: a rebuild used to overwrite guest
    data."""
    p = make(d, data=False, data_file="data.raw")
    qio(p, "write -P 0x77 0 128k")
    h = hdr(p)
    with open(p, "rb") as fh:
        c0 = bytearray(fh.read(h["cluster_size"]))
    i = c0.find(b"data.raw")
    c0[i : i + 8] = b"img.qco2"
    with open(p, "r+b") as fh:
        fh.write(c0)
    os.rename(p, d / "img.qco2")
    Refcounts(d / "img.qco2").set(0, 0)
    return Case(d / "img.qco2")


@generator
def gen_compressed_in_data_file_image(d: Path) -> Case:
    """A compressed entry in an image with an external data file: a rebuild used to overwrite
    the compressed data, which the walker skipped."""
    p = make(d, data=False, data_file="data.raw")
    qio(p, "write -P 0x77 0 128k")
    rc = Refcounts(p)
    size = p.stat().st_size
    cs = 65536
    at = (size + cs - 1) // cs * cs
    with open(p, "r+b") as fh:
        fh.seek(at)
        fh.write(os.urandom(cs))
    set_l2(p, 2, (1 << 62) | (15 << 54) | at)
    rc.set(0, 0)
    return Case(p)


# --------------------------------------------------------------------------------------------
# Valid images that are merely large


@generator
def gen_empty_1500mib_read_all(d: Path) -> Case:
    """A valid empty 1500 MiB disk: read() of it used to raise PanicException."""
    p = make(d, size="1500M", data=False)
    return Case(p, extra_ops=[["readall"]], valid=True)


@generator
def gen_disk_2_61(d: Path) -> Case:
    """A valid 2^61-byte disk (convert used to end in a traceback)."""
    p = make(d, size=str(1 << 61), data=False, cluster_size=2 * MiB)
    return Case(p, valid=True)


@generator
def gen_valid_baseline(d: Path) -> Case:
    """A valid image: every operation must work."""
    return Case(make(d), valid=True)


# --------------------------------------------------------------------------------------------
# Inputs the fuzzers found (fuzz/RESULTS.md): each runs through every operation above.

FUZZ_INPUTS = Path(__file__).parent / "data"


def _fuzz_case(src: Path) -> Callable[[Path], Case]:
    def build(d: Path) -> Case:
        p = d / "img.qcow2"
        p.write_bytes(src.read_bytes())
        return Case(p)

    build.__doc__ = f"fuzzer input {src.name} (fuzz/RESULTS.md)"
    return build


for _src in sorted(FUZZ_INPUTS.glob("fuzz-*.qcow2")):
    GENERATORS[_src.stem] = _fuzz_case(_src)
