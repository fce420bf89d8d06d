"""The main job on a built-in sample: make a qcow2 image with QEMU, read it through qcowrs,
break its refcounts, check and repair it with qcowrs, write to it, and show at every step that
QEMU agrees."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import qcowrs


def run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def qemu_check(path: Path) -> str:
    p = subprocess.run(
        ["qemu-img", "check", "--output=json", str(path)], capture_output=True, text=True
    )
    d = json.loads(p.stdout)
    return f"exit {p.returncode}, corruptions {d.get('corruptions', 0)}, leaks {d.get('leaks', 0)}"


def raw_sha(path: Path, d: str) -> str:
    raw = Path(d) / "tmp.raw"
    run("qemu-img", "convert", "-O", "raw", str(path), str(raw))
    with raw.open("rb") as r:
        digest = hashlib.file_digest(r, "sha256").hexdigest()
    raw.unlink()
    return digest


def zero_cluster0_refcount(path: Path) -> None:
    """Pokes cluster 0's refcount to 0: the image's refcounts can no longer be trusted."""
    with path.open("r+b") as f:
        f.seek(48)
        (reftable,) = struct.unpack(">Q", f.read(8))
        f.seek(reftable)
        (refblock,) = struct.unpack(">Q", f.read(8))
        f.seek(refblock)
        f.write(b"\0\0")


def repair_demo(img: Path, d: str) -> bool:
    before = raw_sha(img, d)
    zero_cluster0_refcount(img)
    print("\nbroke the image: cluster 0's refcount set to 0")
    print(f"  qemu-img check : {qemu_check(img)}")
    r = qcowrs.check(img)
    print(f"  qcowrs.check   : exit {r.exit_code}, corruptions {r.corruptions}, leaks {r.leaks}")
    for p in r.problems[:3]:
        print(f"    {p.kind}: {p.message}")
    with qcowrs.QcowFile.open(img, mode="r+b", rebuild=True) as f:
        rep = f.rebuild_report
        print(f"  QcowFile.open(rebuild=True): rebuilt={rep.rebuilt if rep else False}")
        f.seek(7 << 20)
        f.write(b"written by qcowrs")
    after = qemu_check(img)
    print(f"  qemu-img check after repair and a write: {after}")
    with qcowrs.QcowFile.open(img, mode="rb") as f:
        f.seek(7 << 20)
        back = f.read(17)
    ok = after.startswith("exit 0,") and back == b"written by qcowrs"
    # The guest content is unchanged except for the 17 bytes written (over zeros).
    run("qemu-io", "-f", "qcow2", "-c", "write -z 7M 17", str(img))
    ok = ok and raw_sha(img, d) == before
    print("  guest content otherwise unchanged" if ok else "  CONTENT CHANGED")
    return ok


def main() -> int:
    if shutil.which("qemu-img") is None:
        print("qemu-img is needed for the demo (apt-get install qemu-utils)")
        return 1
    with tempfile.TemporaryDirectory() as d:
        img = Path(d) / "sample.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", str(img), "64M")
        run(
            "qemu-io", "-f", "qcow2",
            "-c", "write -P 0xab 0 1M",
            "-c", "write -P 0x5a 5M 300k",
            "-c", "write -z 20M 2M",
            str(img),
        )  # fmt: skip
        print(f"sample image: {img} (made by qemu-img/qemu-io)")
        with qcowrs.QcowFile.open(img, mode="rb") as f:
            h = f.header
            print(
                f"  version {h.version}, virtual size {f.virtual_size} B, "
                f"cluster size {f.cluster_size} B, refcount bits {h.refcount_bits}"
            )
            print("  what the image holds (guest offset, length, kind):")
            for start, length, kind in f.allocated_ranges():
                print(f"    {start:#12x} {length:#10x} {kind}")
            f.seek(5 << 20)
            print(f"  first bytes at 5 MiB: {f.read(8).hex()}")
            f.seek(0)
            ours = hashlib.file_digest(f, "sha256").hexdigest()
        raw = Path(d) / "sample.raw"
        run("qemu-img", "convert", "-O", "raw", str(img), str(raw))
        with raw.open("rb") as r:
            theirs = hashlib.file_digest(r, "sha256").hexdigest()
        print(f"  sha256 through qcowrs : {ours}")
        print(f"  sha256 via qemu-img   : {theirs}")
        print("  agree" if ours == theirs else "  DISAGREE")
        repaired = repair_demo(img, d)
        return 0 if ours == theirs and repaired else 1


if __name__ == "__main__":
    sys.exit(main())
