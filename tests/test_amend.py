"""`qcowrs amend` / `qcowrs.amend` against `qemu-img amend` on the same images.

Each option set runs on twins of the same image, one amended by qemu-img, one by qcowrs: the
guest content afterwards (active layer and every internal snapshot, `qemu-img convert`
sha256) equals qemu-img's result, `qemu-img check` is clean, and `qemu-img info --output=json`
agrees in the fields amend concerns (compat, refcount bits, lazy refcounts, data file, size,
snapshots). Images: v3 with plain and preallocated zero clusters, an overlay with zero
clusters over base data, v2 with internal snapshots, snapshots sharing zero clusters,
compressed, 512 B and 2 MiB clusters, extended L2, zstd, an external data file, lazy
refcounts left dirty, a persistent bitmap. qemu-img's refusals: same exit code, same
message, and the image byte-for-byte unchanged (qcowrs decides every refusal before writing;
QEMU applies some options before it refuses a later one). Then amend killed at every write
or sync (the fault-injection hook): the image opens (with rebuild) with the same guest
content, and `qemu-img check` finds at most leaks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    ImageBuilder,
    content_digest,
    file_sha256,
    qemu_img,
    requires_qemu,
)

pytestmark = requires_qemu

KINDS = [
    "zeros",
    "overlay",
    "v2snap",
    "v2bare",
    "snapzero",
    "compressed",
    "c512",
    "c2m",
    "extl2",
    "zstd",
    "zstd_plain",
    "datafile",
    "lazy",
    "bitmap",
]


def build(b: ImageBuilder, kind: str) -> Path:
    size = "16M"
    opts: dict[str, Any] = {
        "c512": {"cluster_size": 512},
        "c2m": {"cluster_size": "2M"},
        "extl2": {"extended_l2": "on"},
        "zstd": {"compression_type": "zstd"},
        "zstd_plain": {"compression_type": "zstd"},
        "datafile": {"data_file": str(b.path("img.data"))},
        "lazy": {"lazy_refcounts": "on"},
        "v2snap": {"compat": "0.10"},
        "v2bare": {"compat": "0.10"},
    }.get(kind, {})
    if kind == "overlay":
        b.create("base.qcow2", size)
        b.io("base.qcow2", "write -P 0x21 0 16M")
        p = b.create("img.qcow2", backing="base.qcow2")
    else:
        p = b.create("img.qcow2", size, **opts)
    c = "-c " if kind in ("compressed", "zstd") else ""
    b.io("img.qcow2", f"write {c}-P 0x11 0 2M", f"write {c}-P 0x12 9M 3M")
    if kind not in ("v2snap", "v2bare"):
        # Preallocated zero clusters (over data) and plain ones (over nothing / the base).
        b.io("img.qcow2", "write -z 1M 256k", "write -z 13M 512k")
    if kind in ("v2snap", "v2bare", "snapzero"):
        subprocess.run(["qemu-img", "snapshot", "-c", "s1", str(p)], check=True)
        b.io("img.qcow2", "write -P 0x13 4M 1M", "write -P 0x14 1M 64k")
        subprocess.run(["qemu-img", "snapshot", "-c", "s2", str(p)], check=True)
        b.io("img.qcow2", "write -P 0x15 6M 64k")
    if kind == "v2bare":
        strip_snapshot_extra_data(p)
    if kind == "lazy":
        # Killed with unflushed refcounts: the dirty bit stays set.
        argv = ["qemu-io", "-f", "qcow2", "-c", "write -P 0x16 5M 1M", "-c", "sigraise 9", str(p)]
        assert subprocess.run(argv, capture_output=True, check=False).returncode == -9
        assert info(p)["dirty-flag"] is True
    if kind == "bitmap":
        qemu_img("bitmap", "--add", p, "bm0")
        b.io("img.qcow2", "write -P 0x17 7M 64k")
    return p


def strip_snapshot_extra_data(p: Path) -> None:
    """Rewrites the snapshot table in place without extra data (old QEMU's v2 entries: no
    64-bit VM state size, no disk size), which v3 requires."""
    b = bytearray(p.read_bytes())
    nb = int.from_bytes(b[60:64], "big")
    off = int.from_bytes(b[64:72], "big")
    pos, out = off, bytearray()
    for _ in range(nb):
        id_len = int.from_bytes(b[pos + 12 : pos + 14], "big")
        name_len = int.from_bytes(b[pos + 14 : pos + 16], "big")
        extra = int.from_bytes(b[pos + 36 : pos + 40], "big")
        fixed = bytearray(b[pos : pos + 40])
        fixed[36:40] = (0).to_bytes(4, "big")
        names = b[pos + 40 + extra : pos + 40 + extra + id_len + name_len]
        entry = fixed + names
        entry += bytes(-len(entry) % 8)
        out += entry
        pos += (40 + extra + id_len + name_len + 7) // 8 * 8
    b[off : off + (pos - off)] = out + bytes(pos - off - len(out))
    p.write_bytes(bytes(b))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {k: build(ImageBuilder(tmp_path_factory.mktemp(f"am-{k}")), k) for k in KINDS}


def twin(src: Path, tmp: Path, name: str) -> Path:
    """A copy of the image and the files beside it; an external data file (named by its
    absolute path) is pointed at the copy's own (by qemu-img)."""
    d = tmp / name
    d.mkdir()
    for f in src.parent.iterdir():
        shutil.copyfile(f, d / f.name)
    if (d / "img.data").exists():
        qemu_img("amend", "-o", f"data_file={d / 'img.data'}", d / src.name)
    return d / src.name


def qcowrs_cli(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "qcowrs", *map(os.fspath, args)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def info(p: Path) -> dict[str, Any]:
    return dict(json.loads(qemu_img("info", "-U", "--output=json", p).stdout))


def amended_fields(p: Path) -> dict[str, Any]:
    i = info(p)
    data = dict(i.get("format-specific", {}).get("data", {}))
    if "data-file" in data:
        # Twins name their own data file: compare the names.
        data["data-file"] = Path(data["data-file"]).name
    snaps = [(s["name"], s["vm-state-size"], s.get("icount")) for s in i.get("snapshots", [])]
    return {
        "virtual-size": i["virtual-size"],
        "snapshots": snaps,
        **{
            k: data.get(k)
            for k in ("compat", "refcount-bits", "lazy-refcounts", "data-file", "data-file-raw")
        },
        "bitmaps": [b["name"] for b in data.get("bitmaps", [])],
    }


def assert_clean(p: Path) -> None:
    r = qemu_img("check", "--output=json", p, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


CASES: list[tuple[str, str]] = [
    ("zeros", "compat=0.10"),
    ("zeros", "refcount_bits=1"),
    ("zeros", "refcount_bits=64"),
    ("zeros", "lazy_refcounts=on"),
    ("zeros", "size=64M"),
    ("zeros", "size=8M"),
    ("zeros", "refcount_bits=8,lazy_refcounts=on,size=20M"),
    ("overlay", "compat=0.10"),
    ("overlay", "refcount_bits=2"),
    ("v2snap", "compat=1.1"),
    ("v2snap", "compat=1.1,refcount_bits=4"),
    ("v2snap", "compat=1.1,lazy_refcounts=on"),
    ("v2snap", "refcount_bits=16"),
    ("v2bare", "compat=1.1"),
    ("snapzero", "compat=0.10"),
    ("snapzero", "refcount_bits=2"),
    ("compressed", "compat=0.10"),
    ("compressed", "refcount_bits=32"),
    ("c512", "compat=0.10"),
    ("c512", "refcount_bits=8"),
    ("c2m", "compat=0.10"),
    ("extl2", "refcount_bits=8"),
    ("zstd_plain", "compat=0.10"),
    ("datafile", "data_file={dir}/other.data"),
    ("datafile", "refcount_bits=8"),
    ("lazy", "lazy_refcounts=off"),
    ("lazy", "compat=0.10"),
    ("bitmap", "refcount_bits=8"),
]


@pytest.mark.parametrize(("kind", "opts"), CASES, ids=[f"{k}-{o}" for k, o in CASES])
def test_amend_equals_qemu(images: dict[str, Path], tmp_path: Path, kind: str, opts: str) -> None:
    src = images[kind]
    ours, theirs = twin(src, tmp_path, "o"), twin(src, tmp_path, "q")
    if kind == "datafile":
        # amend renames only the reference: the file moves with it.
        for d in (ours.parent, theirs.parent):
            shutil.copyfile(d / "img.data", d / "other.data")
    before = content_digest(src) if kind != "lazy" else None
    qemu_img("amend", "-o", opts.format(dir=theirs.parent), theirs)
    r = qcowrs_cli("amend", "-o", opts.format(dir=ours.parent), ours)
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    assert r.stderr == ""
    assert_clean(ours)
    assert amended_fields(ours) == amended_fields(theirs)
    assert content_digest(ours) == content_digest(theirs)
    if before is not None and "size" not in opts:
        assert content_digest(ours) == before


@pytest.mark.parametrize("bits", [1, 8, 64])
def test_refcount_width_of_2m_clusters(images: dict[str, Path], tmp_path: Path, bits: int) -> None:
    """qemu-img 10.0 `amend -o refcount_bits=N` does not return on images with 1 or 2 MiB
    clusters (seen here: still running after 30 s on an empty 16 MiB image), so the oracle is
    QEMU's view of our result: check clean, the new width, the same guest content."""
    src = images["c2m"]
    p = twin(src, tmp_path, "o")
    r = qcowrs_cli("amend", "-o", f"refcount_bits={bits}", p)
    assert r.returncode == 0, r.stderr
    assert_clean(p)
    assert info(p)["format-specific"]["data"]["refcount-bits"] == bits
    assert content_digest(p) == content_digest(src)


def test_downgrade_layout_matches_qemu(images: dict[str, Path], tmp_path: Path) -> None:
    """compat=0.10 keeps preallocated zero clusters allocated (zeroed) and drops plain ones,
    as QEMU: the same `qemu-img map`."""
    ours, theirs = twin(images["zeros"], tmp_path, "o"), twin(images["zeros"], tmp_path, "q")
    qemu_img("amend", "-o", "compat=0.10", theirs)
    assert qcowrs_cli("amend", "-o", "compat=0.10", ours).returncode == 0

    def layout(p: Path) -> list[tuple[int, int, bool, bool]]:
        out = json.loads(qemu_img("map", "--output=json", p).stdout)
        return [(e["start"], e["length"], e["data"], e["zero"]) for e in out]

    assert layout(ours) == layout(theirs)
    assert info(ours)["format-specific"]["data"]["compat"] == "0.10"


def test_downgrade_keeps_shared_zero_cluster_of_a_snapshot(builder: ImageBuilder) -> None:
    """A preallocated zero cluster shared with a snapshot that reads data from it: QEMU's
    downgrade zeroes the cluster in place; qcowrs gives the active layer its own zeros and
    the snapshot keeps its data."""
    p = builder.create("img.qcow2", "4M")
    builder.io("img.qcow2", "write -P 0x33 0 128k")
    subprocess.run(["qemu-img", "snapshot", "-c", "s1", str(p)], check=True)
    # Make the active L2 entry ZERO_ALLOC on the shared cluster (0x33 data stays in it).
    hdr = p.read_bytes()
    l1 = int.from_bytes(hdr[40:48], "big")
    with open(p, "r+b") as f:
        f.seek(l1)
        l2 = int.from_bytes(f.read(8), "big") & 0x00FF_FFFF_FFFF_FE00
        # Copy the shared L2 table so that only the active one changes.
        f.seek(l2)
        table = bytearray(f.read(65536))
        f.seek(0, 2)
        end = (f.tell() + 65535) // 65536 * 65536
        e0 = int.from_bytes(table[0:8], "big")
        table[0:8] = (e0 | 1).to_bytes(8, "big")
        f.seek(end)
        f.write(table)
        f.seek(l1)
        f.write((end | (1 << 63)).to_bytes(8, "big"))
    # Give the new table its refcount and drop the old table's extra reference.
    r = qemu_img("check", "-r", "all", p, check=False)
    assert r.returncode == 0, r.stdout
    before = content_digest(p)
    assert before[""] != before["s1"]
    r2 = qcowrs_cli("amend", "-o", "compat=0.10", p)
    assert r2.returncode == 0, r2.stderr
    assert_clean(p)
    assert content_digest(p) == before


REFUSALS: list[tuple[str, str]] = [
    ("zeros", "compat=0.42"),
    ("zeros", "refcount_bits=3"),
    ("zeros", "refcount_bits=128"),
    ("zeros", "compat=0.10,refcount_bits=8"),
    ("zeros", "compat=0.10,lazy_refcounts=on"),
    ("zeros", "data_file=x"),
    ("zeros", "data_file_raw=on"),
    ("zeros", "backing_file=x"),
    ("overlay", "backing_fmt=raw"),
    ("overlay", "backing_file=y,refcount_bits=8"),
    ("zeros", "cluster_size=4096"),
    ("zeros", "foo=1"),
    ("extl2", "compat=0.10"),
    ("zstd", "compat=0.10"),
    ("datafile", "compat=0.10"),
    ("v2snap", "lazy_refcounts=on"),
    ("v2snap", "refcount_bits=8"),
    ("snapzero", "compat=0.10,size=32M"),
    ("snapzero", "refcount_bits=1"),
]


@pytest.mark.parametrize(("kind", "opts"), REFUSALS, ids=[f"{k}-{o}" for k, o in REFUSALS])
def test_refusals_as_qemu(images: dict[str, Path], tmp_path: Path, kind: str, opts: str) -> None:
    ours, theirs = twin(images[kind], tmp_path, "o"), twin(images[kind], tmp_path, "q")
    before = file_sha256(ours)
    q = qemu_img("amend", "-o", opts, theirs, check=False)
    r = qcowrs_cli("amend", "-o", opts, ours)
    assert (r.returncode, q.returncode) == (1, 1), (r.stderr, q.stderr)
    assert len(r.stderr.splitlines()) == 1
    assert "Traceback" not in r.stderr
    first = q.stderr.splitlines()[0].removeprefix("qemu-img: ")
    assert first in r.stderr, (r.stderr, q.stderr)
    assert file_sha256(ours) == before


def test_cli_usage_and_help(images: dict[str, Path], tmp_path: Path) -> None:
    p = twin(images["zeros"], tmp_path, "o")
    r = qcowrs_cli("amend", p)
    assert r.returncode == 1
    assert "Must specify options (-o)" in r.stderr
    r = qcowrs_cli("amend", "-f", "raw", "-o", "compat=1.1", p)
    assert r.returncode == 1
    assert "does not support option amendment" in r.stderr
    raw = tmp_path / "d.raw"
    raw.write_bytes(b"\0" * 4096)
    r = qcowrs_cli("amend", "-o", "compat=1.1", raw)
    assert r.returncode == 1
    assert "does not support option amendment" in r.stderr
    ours = qcowrs_cli("amend", "-o", "help", p).stdout.splitlines()
    theirs = qemu_img("amend", "-f", "qcow2", "-o", "help", p).stdout.splitlines()
    assert ours[0] == theirs[0]
    assert set(ours[1:]) <= set(theirs[1:])
    r = qcowrs_cli("amend", "-p", "-o", "refcount_bits=8", p)
    assert r.returncode == 0, r.stderr
    assert info(p)["format-specific"]["data"]["refcount-bits"] == 8


def test_python_api(images: dict[str, Path], tmp_path: Path, qcowrs_mod: Any) -> None:
    p = twin(images["v2snap"], tmp_path, "o")
    before = content_digest(p)
    calls: list[tuple[int, int]] = []
    qcowrs_mod.amend(
        p,
        compat="1.1",
        refcount_bits=8,
        lazy_refcounts=True,
        progress=lambda d, t: calls.append((d, t)),
    )
    assert calls[0] == (0, 3)
    assert calls[-1] == (3, 3)
    d = info(p)["format-specific"]["data"]
    assert (d["compat"], d["refcount-bits"], d["lazy-refcounts"]) == ("1.1", 8, True)
    assert content_digest(p) == before
    assert_clean(p)
    qcowrs_mod.amend(p, size="20M")
    assert info(p)["virtual-size"] == 20 << 20
    with pytest.raises(ValueError, match="Cannot decrease refcount entry width"):
        qcowrs_mod.amend(p, refcount_bits=1)
    with pytest.raises(TypeError):
        qcowrs_mod.amend(p, backing_file="x")


# --------------------------------------------------------------------------------------------
# Amend interrupted at every write and sync


INTERRUPTED = [
    ("snapzero", {"compat": "0.10"}),
    ("overlay", {"compat": "0.10"}),
    ("v2snap", {"compat": "1.1"}),
    ("v2bare", {"compat": "1.1"}),
    ("zeros", {"refcount_bits": 8}),
    ("bitmap", {"compat": "0.10"}),
]


@pytest.mark.parametrize(("kind", "opts"), INTERRUPTED, ids=[f"{k}-{o}" for k, o in INTERRUPTED])
def test_interrupted_amend(
    images: dict[str, Path],
    tmp_path: Path,
    qcowrs_mod: Any,
    fault_hook: Any,
    kind: str,
    opts: dict[str, Any],
) -> None:
    src = images[kind]
    old = content_digest(src)
    ref = twin(src, tmp_path, "ref")
    before = fault_hook._io_ops()
    qcowrs_mod.amend(ref, **opts)
    total = fault_hook._io_ops() - before
    assert content_digest(ref) == old
    assert 0 < total < 2000
    failures = []
    for k in range(total):
        img = twin(src, tmp_path, f"k{k}")
        fault_hook._fail_after_ops(k)
        try:
            qcowrs_mod.amend(img, **opts)
            failures.append(f"k={k}: no error although operation {k + 1} failed")
        except qcowrs_mod.QcowError:
            pass
        finally:
            fault_hook._fail_after_ops(None)
        r = qemu_img("check", "--output=json", img, check=False)
        report = json.loads(r.stdout)
        if report.get("corruptions", 0) or r.returncode not in (0, 3):
            failures.append(f"k={k}: {r.stdout[:300]}")
        with qcowrs_mod.QcowFile.open(img, rebuild=True):
            pass
        if content_digest(img) != old:
            failures.append(f"k={k}: guest content changed")
        shutil.rmtree(img.parent)
    assert not failures, "\n".join(failures)
