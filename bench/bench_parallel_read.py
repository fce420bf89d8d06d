#!/usr/bin/env python3
"""Parallel reads through one handle: two Python threads reading disjoint halves of one
zlib-compressed image with `QcowFile.preadinto`, against one thread reading it all, and
`qemu-img convert` of the same image into a null target (QEMU's own read speed, with its
default coroutines).

    python bench/bench_parallel_read.py [--size 256M] [--runs 5] [--chunk 1M] [--dir /tmp]

The source is compressible text-like data (16 symbols, ~2x with zlib), so every cluster is
stored compressed and every read decompresses. Rounds alternate the order of the contenders;
the table gives each one's median throughput and the two-thread / one-thread ratio (median
and best). Every thread's bytes are checked once against `qemu-img convert -O raw`.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import qcowrs

MiB = 1 << 20


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper()
    return int(t[:-1]) * units[t[-1]] if t[-1] in units else int(t)


def make_image(d: Path, size: int) -> tuple[Path, Path]:
    raw = d / "src.raw"
    rng = random.Random(7)
    alphabet = bytes(range(97, 113))
    with open(raw, "wb") as fh:
        for _ in range(size // MiB):
            fh.write(bytes(rng.choices(alphabet, k=MiB)))
    img = d / "src-zlib.qcow2"
    subprocess.run(["qemu-img", "convert", "-q", "-c", "-O", "qcow2", raw, img], check=True)
    return raw, img


def read_range(f: qcowrs.QcowFile, start: int, end: int, chunk: int, digest: bool = False) -> str:
    buf = bytearray(chunk)
    view = memoryview(buf)
    h = hashlib.sha256() if digest else None
    off = start
    while off < end:
        n = f.preadinto(view[: min(chunk, end - off)], off)
        if h is not None:
            h.update(view[:n])
        off += n
    return h.hexdigest() if h is not None else ""


def one_thread(f: qcowrs.QcowFile, size: int, chunk: int) -> float:
    t = time.perf_counter()
    read_range(f, 0, size, chunk)
    return time.perf_counter() - t


def two_threads(f: qcowrs.QcowFile, size: int, chunk: int) -> float:
    half = size // 2 // chunk * chunk
    ths = [
        threading.Thread(target=read_range, args=(f, 0, half, chunk)),
        threading.Thread(target=read_range, args=(f, half, size, chunk)),
    ]
    t = time.perf_counter()
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    return time.perf_counter() - t


def qemu_img(img: Path, size: int) -> float:
    target = f"driver=raw,file.driver=null-co,file.size={size}"
    t = time.perf_counter()
    subprocess.run(
        ["qemu-img", "convert", "-n", "-f", "qcow2", img, "--target-image-opts", target], check=True
    )
    return time.perf_counter() - t


def verify(f: qcowrs.QcowFile, raw: Path, size: int, chunk: int) -> None:
    want = hashlib.sha256(raw.read_bytes()).hexdigest()
    half = size // 2 // chunk * chunk
    got = hashlib.sha256()
    for start, end in ((0, half), (half, size)):
        buf = bytearray(end - start)
        f.preadinto(buf, start)
        got.update(buf)
    if got.hexdigest() != want or read_range(f, 0, size, chunk, digest=True) != want:
        sys.exit("qcowrs read different bytes than the source")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", default="256M")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--chunk", default="1M")
    ap.add_argument("--dir", default="/tmp")
    args = ap.parse_args()
    size, chunk = parse_size(args.size), parse_size(args.chunk)
    if shutil.which("qemu-img") is None:
        sys.exit("qemu-img not found")
    with tempfile.TemporaryDirectory(prefix="qcowrs-bench-par-", dir=args.dir) as d:
        raw, img = make_image(Path(d), size)
        print(f"image: {size // MiB} MiB guest, {img.stat().st_size / MiB:.0f} MiB zlib-compressed")
        contenders = {"1 thread": one_thread, "2 threads": two_threads}
        times: dict[str, list[float]] = {k: [] for k in [*contenders, "qemu-img"]}
        with qcowrs.QcowFile.open(img) as f:
            verify(f, raw, size, chunk)
            for r in range(args.runs):
                order = list(times) if r % 2 == 0 else list(reversed(times))
                for name in order:
                    s = (
                        qemu_img(img, size)
                        if name == "qemu-img"
                        else contenders[name](f, size, chunk)
                    )
                    times[name].append(s)
                line = "  ".join(f"{k} {size / MiB / v[-1]:7.1f} MiB/s" for k, v in times.items())
                print(f"  round {r + 1}: {line}", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print()
    for k, v in med.items():
        print(f"{k:10s} {size / MiB / v:8.1f} MiB/s (median of {args.runs})")
    ratios = [a / b for a, b in zip(times["1 thread"], times["2 threads"], strict=True)]
    print(
        f"two threads / one thread: {statistics.median(ratios):.2f}x median, "
        f"{max(ratios):.2f}x best (target 1.6x on 2 cores)"
    )
    print(f"two threads / qemu-img convert: {med['qemu-img'] / med['2 threads']:.2f}x")


if __name__ == "__main__":
    main()
