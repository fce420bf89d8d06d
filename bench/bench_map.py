#!/usr/bin/env python3
"""`QcowFile.map()` against `qemu-img map --output=json` on the same image.

    python bench/bench_map.py [--size 1T] [--writes 20000] [--depth 3] [--runs 5]

Builds (in a temporary directory under /tmp, deleted at the end) a backing chain of --depth
qcow2 images of --size bytes each; --writes scattered 64 KiB writes at random 64 KiB-aligned
guest offsets are spread over the layers (half in the base, the rest evenly above it; one in
eight of the overlay writes is a zero write, so the map has zero clusters that hide the
layers below). Checks that both give the same entries, then times, alternating in each round:

  (a) qcowrs:   QcowFile.open(top) and f.map() (the list of dicts), plus json.dumps of it;
  (b) qemu-img: `qemu-img map --output=json top` (a process: start-up, mapping, printing).

Prints each round, the median and best of each, and the ratio qemu-img / qcowrs (above 1:
qcowrs is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLUSTER = 64 * 1024


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (examples: 1T, 512G, 1048576)")
    n = int(m.group(1)) << (10 * " KMGT".index((m.group(2) or " ").upper()))
    if n < 16 * CLUSTER or n % CLUSTER:
        raise argparse.ArgumentTypeError("size must be a multiple of 64 KiB, at least 1 MiB")
    return n


def run(*cmd: str | Path, stdin: str | None = None) -> str:
    proc = subprocess.run(
        [os.fspath(c) for c in cmd], input=stdin, check=True, capture_output=True, text=True
    )
    return proc.stdout


def build_chain(tmp: Path, size: int, writes: int, depth: int) -> Path:
    rng = random.Random(0x3A9)
    clusters = size // CLUSTER
    per_layer = [writes // 2] + [(writes - writes // 2) // max(depth - 1, 1)] * (depth - 1)
    prev: Path | None = None
    for level, n in enumerate(per_layer):
        img = tmp / f"layer{level}.qcow2"
        if prev is None:
            run("qemu-img", "create", "-q", "-f", "qcow2", img, str(size))
        else:
            run("qemu-img", "create", "-q", "-f", "qcow2", "-b", prev.name, "-F", "qcow2", img)
        cmds = []
        for i in range(n):
            off = rng.randrange(clusters) * CLUSTER
            zero = level > 0 and i % 8 == 0
            cmds.append(
                f"write -z {off} {CLUSTER}" if zero else f"write -P {level + 1} {off} {CLUSTER}"
            )
        # qemu-io reads its commands from stdin: one process per layer.
        run("qemu-io", "-f", "qcow2", img, stdin="\n".join(cmds) + "\nquit\n")
        prev = img
    assert prev is not None
    return prev


def bench_qcowrs(top: Path) -> tuple[float, list[dict[str, object]]]:
    import qcowrs

    t0 = time.perf_counter()
    with qcowrs.QcowFile.open(top) as f:
        entries = f.map()
    json.dumps(entries)
    return time.perf_counter() - t0, [dict(e) for e in entries]


def bench_qemu_img(top: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = run("qemu-img", "map", "--output=json", top)
    return time.perf_counter() - t0, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=parse_size, default=parse_size("1T"))
    ap.add_argument("--writes", type=int, default=20000)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args(argv)
    if shutil.which("qemu-img") is None or shutil.which("qemu-io") is None:
        print("qemu-img and qemu-io are required", file=sys.stderr)
        return 1

    with tempfile.TemporaryDirectory(prefix="qcowrs-bench-map-", dir="/tmp") as d:
        tmp = Path(d)
        t0 = time.perf_counter()
        top = build_chain(tmp, args.size, args.writes, args.depth)
        on_disk = sum(p.stat().st_size for p in tmp.iterdir())
        print(
            f"built a {args.depth}-deep chain of {args.size / 2**40:.2f} TiB images, "
            f"{args.writes} writes of 64 KiB ({on_disk / 2**20:.0f} MiB on disk) "
            f"in {time.perf_counter() - t0:.1f}s"
        )
        _, ours = bench_qcowrs(top)
        _, theirs = bench_qemu_img(top)
        assert ours == json.loads(theirs), "qcowrs map() differs from qemu-img map"
        print(f"{len(ours)} entries, identical")

        times: dict[str, list[float]] = {"qcowrs": [], "qemu-img": []}
        for rnd in range(args.runs):
            a, _ = bench_qcowrs(top)
            b, _ = bench_qemu_img(top)
            times["qcowrs"].append(a)
            times["qemu-img"].append(b)
            print(f"  round {rnd + 1}: qcowrs {a * 1e3:8.1f} ms   qemu-img {b * 1e3:8.1f} ms")

    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    print(f"\n{args.runs} rounds, alternating:")
    labels = {
        "qcowrs": "(a) qcowrs open + map() + json.dumps",
        "qemu-img": "(b) qemu-img map --output=json",
    }
    for k, label in labels.items():
        print(f"  {label:38s} median {med[k] * 1e3:8.1f} ms  best {best[k] * 1e3:8.1f} ms")
    ratio_med = med["qemu-img"] / med["qcowrs"]
    ratio_best = best["qemu-img"] / best["qcowrs"]
    print(f"  qemu-img / qcowrs = {ratio_med:.1f} (median), {ratio_best:.1f} (best)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
