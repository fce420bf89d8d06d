#!/usr/bin/env python3
"""Write throughput of qcowrs against qemu-io and qemu-img.

    python bench/bench_write.py [--size 256M] [--random-disk 1G] [--random-writes 8192]
                                [--runs 3] [--cluster-size 65536] [--verify]

Everything happens in a temporary directory under /tmp (deleted at the end). Each case writes
into a freshly created image and its time includes creating, writing, flushing and closing it;
the cases alternate inside each round and the best of --runs rounds is kept. QEMU runs with
`-t writeback` (the page cache, one flush at the end, as qcowrs' flush()): qemu-io's default
cache mode is writethrough (an fdatasync per write, ~6x slower for the random case) and
qemu-img convert's default is unsafe (no flush at all).

Sequential (--size bytes, 1 MiB at a time):
  (a) qcowrs:    QcowFile.create, then f.write() of one reused 1 MiB bytes object of random,
                 incompressible content over the whole disk, flush(), close();
  (b) qemu-io:   `qemu-io -t writeback -c 'write -P 0xab 0 SIZE' -c flush` on a new image
                 (one request, so this is the fastest QEMU can allocate and write);
  (c) qemu-img:  `qemu-img convert -t writeback -O qcow2` of a raw file holding what (a) writes
                 (page-cached beforehand).

Random (--random-writes writes of 4 KiB at random 4 KiB-aligned offsets of a
--random-disk-byte disk; the same offsets for both):
  (d) qcowrs:    seek + write of a 4 KiB slice of a random buffer per write, flush(), close();
  (e) qemu-io:   the same writes as `write -q -P <byte> <offset> 4k` commands on stdin,
                 then flush.

Prints MB/s (10^6 bytes per second of guest data written) and the ratios qcowrs / QEMU.
"""

from __future__ import annotations

import argparse
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
BLOCK = 4096


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (examples: 1G, 256M, 1048576)")
    n = int(m.group(1)) << (10 * " KMGT".index((m.group(2) or " ").upper()))
    if n <= 0 or n % CHUNK:
        raise argparse.ArgumentTypeError("size must be a positive multiple of 1 MiB")
    return n


def run(*cmd: str | Path, stdin: Path | None = None) -> None:
    argv = [os.fspath(c) for c in cmd]
    if stdin is None:
        subprocess.run(argv, check=True, capture_output=True, text=True)
        return
    with open(stdin, "rb") as fh:
        p = subprocess.run(argv, check=True, stdin=fh, capture_output=True)
    if b"failed" in p.stdout or b"error" in p.stdout.lower():
        raise RuntimeError(f"{argv}: {p.stdout[-2000:]!r}")


def drop(path: Path) -> None:
    if path.exists():
        path.unlink()


# -- sequential -------------------------------------------------------------------------------


def seq_qcowrs(img: Path, size: int, cs: int, block: bytes) -> float:
    import qcowrs

    drop(img)
    t0 = time.perf_counter()
    f = qcowrs.QcowFile.create(img, size, cluster_size=cs)
    write = f.write
    for _ in range(size // CHUNK):
        write(block)
    f.flush()
    f.close()
    return time.perf_counter() - t0


def seq_qemu_io(img: Path, size: int, cs: int) -> float:
    drop(img)
    t0 = time.perf_counter()
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs}", img, str(size))
    run(
        "qemu-io",
        "-t",
        "writeback",
        "-f",
        "qcow2",
        "-c",
        f"write -q -P 0xab 0 {size}",
        "-c",
        "flush",
        img,
    )
    return time.perf_counter() - t0


def seq_qemu_img(raw: Path, img: Path, cs: int) -> float:
    drop(img)
    t0 = time.perf_counter()
    run(
        "qemu-img", "convert", "-t", "writeback", "-f", "raw", "-O", "qcow2",
        "-o", f"cluster_size={cs}", raw, img,
    )  # fmt: skip
    return time.perf_counter() - t0


# -- random -----------------------------------------------------------------------------------


def rand_qcowrs(img: Path, disk: int, cs: int, offsets: list[int], buf: bytes) -> float:
    import qcowrs

    drop(img)
    mv = memoryview(buf)
    t0 = time.perf_counter()
    f = qcowrs.QcowFile.create(img, disk, cluster_size=cs)
    seek, write = f.seek, f.write
    for i, off in enumerate(offsets):
        seek(off)
        write(mv[(i % 256) * 16 : (i % 256) * 16 + BLOCK])
    f.flush()
    f.close()
    return time.perf_counter() - t0


def rand_qemu_io(img: Path, disk: int, cs: int, script: Path) -> float:
    drop(img)
    t0 = time.perf_counter()
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs}", img, str(disk))
    run("qemu-io", "-t", "writeback", "-f", "qcow2", img, stdin=script)
    return time.perf_counter() - t0


def check_clean(img: Path) -> None:
    p = subprocess.run(["qemu-img", "check", os.fspath(img)], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"qemu-img check {img} failed ({p.returncode}):\n{p.stdout}{p.stderr}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=parse_size, default=parse_size("256M"))
    ap.add_argument("--random-disk", type=parse_size, default=parse_size("1G"))
    ap.add_argument("--random-writes", type=int, default=8192)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cluster-size", type=int, default=65536)
    ap.add_argument("--verify", action="store_true", help="compare the images' content too")
    args = ap.parse_args(argv)
    for tool in ("qemu-img", "qemu-io"):
        if shutil.which(tool) is None:
            print(f"{tool} is required", file=sys.stderr)
            return 1
    size, disk, cs, nrand = args.size, args.random_disk, args.cluster_size, args.random_writes

    rng = random.Random(0xB0B)
    block = rng.randbytes(CHUNK)
    offsets = [rng.randrange(disk // BLOCK) * BLOCK for _ in range(nrand)]
    rbuf = rng.randbytes(BLOCK + 256 * 16)

    with tempfile.TemporaryDirectory(prefix="qcowrs-wbench-", dir="/tmp") as d:
        tmp = Path(d)
        raw = tmp / "src.raw"
        with open(raw, "wb") as fh:
            for _ in range(size // CHUNK):
                fh.write(block)
        script = tmp / "rand.cmds"
        with open(script, "w") as fh:
            for i, off in enumerate(offsets):
                fh.write(f"write -q -P {i % 255 + 1:#x} {off} {BLOCK}\n")
            fh.write("flush\n")
        imgs = {k: tmp / f"{k}.qcow2" for k in ("sq", "sio", "simg", "rq", "rio")}

        cases: dict[str, Callable[[], float]] = {
            "seq qcowrs": lambda: seq_qcowrs(imgs["sq"], size, cs, block),
            "seq qemu-io": lambda: seq_qemu_io(imgs["sio"], size, cs),
            "seq qemu-img convert": lambda: seq_qemu_img(raw, imgs["simg"], cs),
            "rand qcowrs": lambda: rand_qcowrs(imgs["rq"], disk, cs, offsets, rbuf),
            "rand qemu-io": lambda: rand_qemu_io(imgs["rio"], disk, cs, script),
        }
        amount = {k: (size if k.startswith("seq") else nrand * BLOCK) for k in cases}
        best = {k: float("inf") for k in cases}
        for rnd in range(args.runs):
            for name, fn in cases.items():
                dt = fn()
                best[name] = min(best[name], dt)
                print(
                    f"  round {rnd + 1}: {name:22s} {dt:7.3f}s  {amount[name] / dt / 1e6:8.1f} MB/s"
                )
        for k in ("sq", "rq"):
            check_clean(imgs[k])
        if args.verify:
            run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", imgs["sq"], raw)
            run("qemu-img", "compare", imgs["sq"], imgs["simg"])
        sizes = {k: imgs[k].stat().st_size for k in imgs}

    mbs = {k: amount[k] / best[k] / 1e6 for k in cases}
    print(f"\nbest of {args.runs}, cluster_size {cs}:")
    print(f"sequential: {size / 2**20:.0f} MiB in 1 MiB writes")
    for k in ("seq qcowrs", "seq qemu-io", "seq qemu-img convert"):
        print(f"  {k:22s} {mbs[k]:8.1f} MB/s  ({best[k]:.3f}s)")
    print(f"  qcowrs / qemu-io          = {mbs['seq qcowrs'] / mbs['seq qemu-io']:.2f}")
    print(f"  qcowrs / qemu-img convert = {mbs['seq qcowrs'] / mbs['seq qemu-img convert']:.2f}")
    print(f"random: {nrand} x 4 KiB at random 4K-aligned offsets of a {disk / 2**30:.2f} GiB disk")
    for k in ("rand qcowrs", "rand qemu-io"):
        print(f"  {k:22s} {mbs[k]:8.1f} MB/s  ({best[k]:.3f}s, {nrand / best[k]:.0f} writes/s)")
    print(f"  qcowrs / qemu-io          = {mbs['rand qcowrs'] / mbs['rand qemu-io']:.2f}")
    print(
        f"file sizes: qcowrs seq {sizes['sq']}, qemu-io seq {sizes['sio']}, "
        f"qcowrs rand {sizes['rq']}, qemu-io rand {sizes['rio']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
