"""``qcowrs.bitmap`` / ``qcowrs bitmap`` against ``qemu-img bitmap``: the same actions on twins
of one image leave the same bitmaps (``qemu-img info``) with the same dirty ranges (through
``qemu-nbd -B``); bitmaps QEMU made are read exactly by ``dirty_ranges()``; refusals carry
qemu-img's messages and exit codes; every action killed at every write or sync leaves the old
or the new state, and ``qemu-img check`` finds at most leaks."""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
import qcowrs
from conftest import qemu_img, qemu_io, requires_qemu
from qcowrs.cli._main import main
from test_bitmaps import dirty_ranges as nbd_dirty_ranges

pytestmark = [
    requires_qemu,
    pytest.mark.skipif(shutil.which("qemu-nbd") is None, reason="qemu-nbd not installed"),
]

KiB = 1 << 10
MiB = 1 << 20


def fmt_data(image: Path) -> dict[str, Any]:
    """``qcowrs.info``'s format-specific data."""
    info = qcowrs.info(image)
    assert isinstance(info, dict)
    data: dict[str, Any] = info["format-specific"]["data"]
    return data


def info_bitmaps(image: Path) -> list[dict[str, Any]]:
    info = json.loads(qemu_img("info", "--output=json", str(image)).stdout)
    bitmaps: list[dict[str, Any]] = info["format-specific"]["data"].get("bitmaps", [])
    return bitmaps


def our_ranges(image: Path) -> dict[str, list[tuple[int, int]]]:
    with qcowrs.QcowFile.open(image) as f:
        return {b.name: f.dirty_ranges(b.name) for b in f.bitmaps() if not b.in_use}


def assert_clean(image: Path) -> None:
    r = qemu_img("check", str(image), check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def set_in_use(image: Path, name: str) -> None:
    """Flags the bitmap ``name`` in use on disk (what a writer that died leaves)."""
    with open(image, "r+b") as f:
        head = f.read(4096)
        off = struct.unpack(">I", head[100:104])[0]
        while True:
            kind, length = struct.unpack(">II", head[off : off + 8])
            assert kind != 0, "no bitmaps extension"
            if kind == 0x23852875:
                n, _, size, at = struct.unpack(">IIQQ", head[off + 8 : off + 32])
                break
            off += 8 + (length + 7) // 8 * 8
        f.seek(at)
        d = f.read(size)
        o = 0
        for _ in range(n):
            ns, extra = struct.unpack(">HI", d[o + 18 : o + 24])
            if d[o + 24 + extra : o + 24 + extra + ns] == name.encode():
                flags = struct.unpack(">I", d[o + 12 : o + 16])[0]
                f.seek(at + o + 12)
                f.write(struct.pack(">I", flags | 1))
            o += (24 + extra + ns + 7) // 8 * 8


def new_image(path: Path, size: str = "64M", **opts: str) -> Path:
    o = ",".join(f"{k}={v}" for k, v in opts.items())
    qemu_img("create", "-q", "-f", "qcow2", *(["-o", o] if o else []), str(path), size)
    qemu_io(path, "write -P 1 0 1M")
    return path


def both(a: Path, b: Path, *argv: str) -> None:
    """``qcowrs bitmap ARGV A`` and ``qemu-img bitmap ARGV B`` (the bitmap name last)."""
    *opts, name = argv
    assert main(["bitmap", *opts, str(a), name]) == 0
    qemu_img("bitmap", *opts, str(b), name)


# (cluster size, the steps: qemu-img bitmap arguments, or ("io", qemu-io command) on both)
SCENARIOS: dict[str, tuple[str, list[tuple[str, ...]]]] = {
    "64k": (
        "64k",
        [
            ("--add", "a"),
            ("--add", "-g", "4096", "b"),
            ("--add", "-g", "2M", "c"),
            ("io", "write -P 3 3M 100k"),
            ("io", "write -P 4 40M 3"),
            ("--disable", "b"),
            ("io", "write -P 5 20M 1M"),
            ("--add", "-g", "512", "m"),
            ("--merge", "b", "m"),
            ("--merge", "c", "a"),
            ("--clear", "c"),
            ("--add", "--disable", "gone"),
            ("--remove", "gone"),
            ("io", "write -P 6 63M 1M"),
            ("--enable", "b"),
            ("io", "write -P 7 10M 4k"),
        ],
    ),
    "512b": (
        "512",
        [
            ("--add", "a"),
            ("--add", "-g", "512", "fine"),
            ("io", "write -P 3 5M 7k"),
            ("io", "write -P 4 60M 513"),
            ("--disable", "fine"),
            ("--add", "-g", "64k", "coarse"),
            ("--merge", "fine", "coarse"),
            ("--clear", "a"),
        ],
    ),
}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_side_by_side_with_qemu_img(tmp_path: Path, scenario: str) -> None:
    cluster, steps = SCENARIOS[scenario]
    ours = new_image(tmp_path / "ours.qcow2", cluster_size=cluster)
    theirs = tmp_path / "theirs.qcow2"
    shutil.copyfile(ours, theirs)
    for step in steps:
        if step[0] == "io":
            qemu_io(ours, step[1])
            qemu_io(theirs, step[1])
        else:
            both(ours, theirs, *step)
        assert info_bitmaps(ours) == info_bitmaps(theirs), step
    assert_clean(ours)
    names = [b["name"] for b in info_bitmaps(ours)]
    mine = our_ranges(ours)
    assert sorted(mine) == sorted(names)
    for name in names:
        expected = nbd_dirty_ranges(theirs, name, tmp_path)
        assert nbd_dirty_ranges(ours, name, tmp_path) == expected, name
        assert mine[name] == expected, name
        assert our_ranges(theirs)[name] == expected, name
    # Our qcowrs info lists them as qemu-img does.
    assert fmt_data(ours)["bitmaps"] == info_bitmaps(ours)


@pytest.mark.parametrize(
    ("cluster", "granularities"),
    [("64k", ["512", "64k", "2M"]), ("512", ["512", "4k"]), ("2M", ["64k"])],
)
def test_qemu_made_bitmaps_read_exactly(
    tmp_path: Path, cluster: str, granularities: list[str]
) -> None:
    img = new_image(tmp_path / "q.qcow2", "100M", cluster_size=cluster)
    for g in granularities:
        qemu_img("bitmap", "--add", "-g", g, str(img), f"g{g}")
    writes = ["0 1", "1M 100k", "7M 3M", "33M 512", "99M 1M", "50M 65537", "70M 4k"]
    qemu_io(img, *(f"write -P 9 {w}" for w in writes))
    mine = our_ranges(img)
    with qcowrs.QcowFile.open(img) as f:
        got = [(b.name, b.granularity, b.enabled, b.in_use, b.persistent) for b in f.bitmaps()]
    assert got == [(f"g{g}", qcowrs_size(g), True, False, True) for g in granularities]
    for g in granularities:
        assert mine[f"g{g}"] == nbd_dirty_ranges(img, f"g{g}", tmp_path), g


def qcowrs_size(text: str) -> int:
    from qcowrs.cli._common import parse_size

    return parse_size(text)


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = main(argv)
    err = capsys.readouterr().err
    return rc, err


# (setup, argv without the image and the bitmap name, bitmap name)
REFUSALS: list[tuple[str, list[str], str]] = [
    ("", ["--add"], "a"),
    ("", ["--remove"], "nope"),
    ("", ["--clear"], "nope"),
    ("", ["--enable"], "nope"),
    ("", ["--disable"], "nope"),
    ("", ["--merge", "nope"], "a"),
    ("", ["--merge", "a"], "nope"),
    ("", ["--add", "-g", "1000"], "x"),
    ("", ["--add", "-g", "256"], "x"),
    ("", ["--add", "-g", "4G"], "x"),
    ("", ["--add", "-g", "abc"], "x"),
    ("", ["--add"], ""),
    ("", ["--add"], "n" * 1024),
    ("", ["--clear", "-g", "4096"], "a"),
    ("", [], "a"),
    ("", ["--add", "--add"], "twice"),
    ("inuse", ["--clear"], "a"),
    ("inuse", ["--enable"], "a"),
    ("inuse", ["--disable"], "a"),
    ("inuse", ["--merge", "b"], "a"),
    ("inuse", ["--merge", "a"], "b"),
    ("big", ["--add", "-g", "512"], "x"),
    ("v2", ["--add"], "x"),
    ("v2", ["--remove"], "x"),
]


@pytest.mark.parametrize(("setup", "argv", "name"), REFUSALS)
def test_refusals_as_qemu_img(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], setup: str, argv: list[str], name: str
) -> None:
    if setup == "big":
        ours = tmp_path / "ours.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", str(ours), "4T")
    elif setup == "v2":
        ours = new_image(tmp_path / "ours.qcow2", compat="0.10")
    else:
        ours = new_image(tmp_path / "ours.qcow2")
        qemu_img("bitmap", "--add", str(ours), "a")
        qemu_img("bitmap", "--add", str(ours), "b")
        if setup == "inuse":
            set_in_use(ours, "a")
    theirs = tmp_path / "theirs.qcow2"
    shutil.copyfile(ours, theirs)
    before = ours.read_bytes()
    r = qemu_img("bitmap", *argv, str(theirs), name, check=False)
    rc, err = run_cli(["bitmap", *argv, str(ours), name], capsys)
    assert (rc, len(err.splitlines())) == (r.returncode, 1), err
    assert r.returncode == 1
    want = r.stderr.splitlines()[0].removeprefix("qemu-img: ")
    got = err.strip().removeprefix("qcowrs: ")
    # QEMU names its node ('#block123'), qcowrs the file.

    want = re.sub(r"'#block\d+'", f"'{theirs}'", want).replace(str(theirs), "IMG")
    assert got.replace(str(ours), "IMG") == want
    if argv[:2] != ["--add", "--add"]:
        assert ours.read_bytes() == before  # refused before any write
    assert info_bitmaps(ours) == info_bitmaps(theirs)


def test_remove_in_use_and_last(tmp_path: Path) -> None:
    ours = new_image(tmp_path / "ours.qcow2")
    qemu_img("bitmap", "--add", str(ours), "a")
    qemu_io(ours, "write 2M 64k")
    set_in_use(ours, "a")
    theirs = tmp_path / "theirs.qcow2"
    shutil.copyfile(ours, theirs)
    with qcowrs.QcowFile.open(ours) as f:
        assert [(b.name, b.in_use) for b in f.bitmaps()] == [("a", True)]
        with pytest.raises(ValueError, match="Bitmap 'a' is inconsistent and cannot be used"):
            f.dirty_ranges("a")
        with pytest.raises(ValueError, match="Dirty bitmap 'x' not found"):
            f.dirty_ranges("x")
    qcowrs.bitmap(ours, "remove", "a")
    qemu_img("bitmap", "--remove", str(theirs), "a")
    assert info_bitmaps(ours) == info_bitmaps(theirs) == []
    # The last bitmap gone, the extension goes too (as QEMU's): a plain header again.
    assert fmt_data(ours) == fmt_data(theirs)
    assert_clean(ours)
    qcowrs.bitmap(ours, "add", "again", granularity=1 << 20)
    assert info_bitmaps(ours) == [{"flags": ["auto"], "name": "again", "granularity": 1 << 20}]
    assert_clean(ours)


def test_python_api(tmp_path: Path) -> None:
    img = new_image(tmp_path / "p.qcow2")
    qcowrs.bitmap(img, "add", "a", granularity=4096)
    qcowrs.bitmap(img, "add", "d")
    qcowrs.bitmap(img, "disable", "d")
    with pytest.raises(ValueError, match="action must be one of"):
        qcowrs.bitmap(img, "frobnicate", "a")
    with pytest.raises(ValueError, match="only and always with action='merge'"):
        qcowrs.bitmap(img, "merge", "a")
    with qcowrs.QcowFile.open(img, mode="r+b") as f:
        bms = f.bitmaps()
        assert [(b.name, b.granularity, b.enabled, b.in_use, b.persistent) for b in bms] == [
            ("a", 4096, True, False, True),
            ("d", 65536, False, False, True),
        ]
        assert isinstance(bms[0], qcowrs.Bitmap)
        f.pwrite(b"x" * 5000, 3 * MiB + 100)
        # The handle's own writes, before they reach the bitmap on disk at close.
        assert f.bitmaps()[0].in_use is False
        assert f.dirty_ranges("a") == [(3 * MiB, 8 * KiB)]
        assert f.dirty_ranges("d") == []
    assert our_ranges(img) == {"a": [(3 * MiB, 8 * KiB)], "d": []}
    assert nbd_dirty_ranges(img, "a", tmp_path) == [(3 * MiB, 8 * KiB)]


ACTIONS: list[tuple[str, dict[str, Any], str]] = [
    ("add", {"granularity": 512}, "new"),
    ("add", {}, "first"),
    ("remove", {}, "a"),
    ("remove", {}, "only"),
    ("clear", {}, "a"),
    ("enable", {}, "off"),
    ("disable", {}, "a"),
    ("merge", {"source": "a"}, "b"),
]


def state(image: Path) -> tuple[list[dict[str, Any]], dict[str, list[tuple[int, int]]]]:
    return info_bitmaps(image), our_ranges(image)


@pytest.mark.parametrize(("action", "kw", "name"), ACTIONS)
def test_interrupted_at_every_write(
    tmp_path: Path, fault_hook: Any, action: str, kw: dict[str, Any], name: str
) -> None:
    src = new_image(tmp_path / "src.qcow2", cluster_size="4k")
    if name == "only":
        qemu_img("bitmap", "--add", str(src), "only")
    elif name == "first":
        pass
    else:
        qemu_img("bitmap", "--add", str(src), "a")
        qemu_img("bitmap", "--add", "-g", "4096", str(src), "b")
        qemu_img("bitmap", "--add", "--disable", str(src), "off")
        qemu_io(src, "write 5M 64k", "write 20M 1M")
        qemu_img("bitmap", "--disable", str(src), "b")
        qemu_io(src, "write 30M 64k")
    old = state(src)
    ref = tmp_path / "ref.qcow2"
    shutil.copyfile(src, ref)
    before = fault_hook._io_ops()
    qcowrs.bitmap(ref, action, name, **kw)
    total = fault_hook._io_ops() - before
    new = state(ref)
    assert new != old
    assert 0 < total < 100
    failures = []
    for k in range(total):
        img = tmp_path / f"k{k}.qcow2"
        shutil.copyfile(src, img)
        fault_hook._fail_after_ops(k)
        try:
            qcowrs.bitmap(img, action, name, **kw)
            failures.append(f"k={k}: no error although operation {k + 1} failed")
        except qcowrs.QcowError:
            pass
        finally:
            fault_hook._fail_after_ops(None)
        r = qemu_img("check", "--output=json", str(img), check=False)
        report = json.loads(r.stdout)
        if report.get("corruptions", 0) or r.returncode not in (0, 3):
            failures.append(f"k={k}: {r.stdout[:200]}")
        got = state(img)
        if got not in (old, new):
            failures.append(f"k={k}: bitmaps are neither the old nor the new ones: {got}")
        img.unlink()
    assert not failures, "\n".join(failures)
