#!/usr/bin/env python3
"""Sequential read throughput of qcowrs against its ceiling and against qemu-img.

    python bench/bench_read.py [--size 1G] [--runs 3] [--cluster-size 65536] [--verify]

Builds a fully allocated qcow2 of --size bytes holding real, non-zero, incompressible data
(in a temporary directory under /tmp, deleted at the end), warms the page cache, then times,
alternating the three in each round and keeping the best of --runs rounds:

  (a) qcowrs:   a 1 MiB readinto loop over the whole guest disk through
                qcowrs.QcowFile.open(p, mode="rb"), one reused bytearray;
  (b) ceiling:  the same Python loop over a raw file of the same content
                (made by `qemu-img convert -O raw`), open(raw, "rb", buffering=0);
  (c) qemu-img: `qemu-img convert -n -f qcow2 p --target-image-opts
                driver=raw,file.driver=null-co,file.size=N` (reads everything, writes nothing;
                note that `-O raw` cannot be combined with --target-image-opts).

Prints GB/s (10^9 bytes per second) for each and the ratios qcowrs/ceiling and qcowrs/qemu-img.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

CHUNK = 1 << 20


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (examples: 1G, 512M, 1048576)")
    n = int(m.group(1)) << (10 * " KMGT".index((m.group(2) or " ").upper()))
    if n <= 0 or n % CHUNK:
        raise argparse.ArgumentTypeError("size must be a positive multiple of 1 MiB")
    return n


def run(*cmd: str | Path) -> None:
    subprocess.run([os.fspath(c) for c in cmd], check=True, capture_output=True, text=True)


def make_source(path: Path, size: int) -> None:
    """Incompressible, non-zero data: one random MiB, rotated differently in every MiB."""
    block = random.Random(0x9C0).randbytes(CHUNK)
    with open(path, "wb") as fh:
        for i in range(size // CHUNK):
            r = (i * 4099) % CHUNK
            fh.write(block[r:] + block[:r])


def warm(path: Path) -> None:
    with open(path, "rb", buffering=0) as fh:
        buf = bytearray(8 * CHUNK)
        while fh.readinto(buf):
            pass


def read_loop(fh: object) -> int:
    buf = bytearray(CHUNK)
    readinto = fh.readinto  # type: ignore[attr-defined]
    total = 0
    while True:
        n = readinto(buf)
        if not n:
            return total
        total += n


def bench_qcowrs(path: Path, size: int) -> float:
    import qcowrs

    t0 = time.perf_counter()
    with qcowrs.QcowFile.open(path, mode="rb") as f:
        total = read_loop(f)
    dt = time.perf_counter() - t0
    assert total == size, f"qcowrs read {total} bytes, expected {size}"
    return dt


def bench_ceiling(raw: Path, size: int) -> float:
    t0 = time.perf_counter()
    with open(raw, "rb", buffering=0) as f:
        total = read_loop(f)
    dt = time.perf_counter() - t0
    assert total == size
    return dt


def bench_qemu_img(path: Path, size: int) -> float:
    t0 = time.perf_counter()
    run(
        "qemu-img",
        "convert",
        "-n",
        "-f",
        "qcow2",
        path,
        "--target-image-opts",
        f"driver=raw,file.driver=null-co,file.size={size}",
    )
    return time.perf_counter() - t0


def verify(path: Path, raw: Path, size: int, full: bool) -> None:
    """Check that qcowrs returns the right bytes (sampled, or every byte with --verify)."""
    import qcowrs

    with qcowrs.QcowFile.open(path, mode="rb") as f, open(raw, "rb") as r:
        assert f.virtual_size == size
        if full:
            hq, hr = hashlib.sha256(), hashlib.sha256()
            hq.update(f.read())
            hr.update(r.read())
            assert hq.digest() == hr.digest(), "qcowrs content differs from the raw conversion"
            return
        for off in (0, size // 3 + 12_345, size // 2 - 1, size - CHUNK - 7):
            f.seek(off)
            r.seek(off)
            assert f.read(CHUNK) == r.read(CHUNK), f"qcowrs content differs at {off:#x}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=parse_size, default=parse_size("1G"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cluster-size", type=int, default=65536)
    ap.add_argument("--verify", action="store_true", help="compare every byte, not a sample")
    args = ap.parse_args(argv)
    if shutil.which("qemu-img") is None:
        print("qemu-img is required", file=sys.stderr)
        return 1
    size: int = args.size

    with tempfile.TemporaryDirectory(prefix="qcowrs-bench-", dir="/tmp") as d:
        tmp = Path(d)
        src, img, raw = tmp / "src.raw", tmp / "bench.qcow2", tmp / "bench.raw"
        t0 = time.perf_counter()
        make_source(src, size)
        run(
            "qemu-img",
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            f"cluster_size={args.cluster_size}",
            src,
            img,
        )
        src.unlink()
        run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", img, raw)
        print(
            f"built {size / 2**30:.2f} GiB qcow2 ({img.stat().st_size} bytes on disk, "
            f"cluster_size {args.cluster_size}) in {time.perf_counter() - t0:.1f}s"
        )
        for p in (img, raw):
            warm(p)
        verify(img, raw, size, args.verify)

        cases: dict[str, Callable[[], float]] = {
            "qcowrs": lambda: bench_qcowrs(img, size),
            "ceiling": lambda: bench_ceiling(raw, size),
            "qemu-img": lambda: bench_qemu_img(img, size),
        }
        best = {name: float("inf") for name in cases}
        for rnd in range(args.runs):
            for name, fn in cases.items():
                dt = fn()
                best[name] = min(best[name], dt)
                print(f"  round {rnd + 1}: {name:9s} {dt:7.3f}s  {size / dt / 1e9:6.2f} GB/s")

    gbs = {name: size / dt / 1e9 for name, dt in best.items()}
    print(f"\nbest of {args.runs}, {size / 2**30:.2f} GiB guest disk, 1 MiB reads:")
    labels = {
        "qcowrs": "(a) qcowrs readinto loop",
        "ceiling": "(b) raw file, same Python loop",
        "qemu-img": "(c) qemu-img convert -> null-co",
    }
    for name, label in labels.items():
        print(f"  {label:34s} {gbs[name]:6.2f} GB/s  ({best[name]:.3f}s)")
    print(f"  qcowrs / ceiling  = {gbs['qcowrs'] / gbs['ceiling']:.2f}")
    print(f"  qcowrs / qemu-img = {gbs['qcowrs'] / gbs['qemu-img']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
