"""The main job on a built-in sample: make a qcow2 image with QEMU, read it through qcowrs,
and show that both see the same disk."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import qcowrs


def run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


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
        return 0 if ours == theirs else 1


if __name__ == "__main__":
    sys.exit(main())
