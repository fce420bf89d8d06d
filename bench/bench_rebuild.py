#!/usr/bin/env python3
"""Refcount rebuild speed and memory: `qcowrs rebuild` against `qemu-img check -r all`; with
`--mode check`, a plain check: `qcowrs check` against `qemu-img check` on the same images
(unbroken, read-only).

    python bench/bench_rebuild.py [--mode rebuild|check] [--runs 3] [--only a,b,c] [--scale 1.0]
                                  [--dir /tmp] [--keep]

Builds three images whose refcounts need a full rebuild (cluster 0's refcount poked to 0, so
QEMU reports "ERROR cluster 0 refcount=0 reference=1" and rebuilds everything), in a temporary
directory under --dir (deleted at the end unless --keep):

  (a) 1 TiB, 64 KiB clusters, every cluster allocated:
      `qemu-img create -o preallocation=metadata` (the data clusters are holes of the sparse
      host file, so it costs ~160 MiB of metadata, not 1 TiB);
  (b) 1 TiB, 64 KiB clusters, 0.1% allocated: 1024 writes of 1 MiB, one every GiB;
  (c) 1 GiB, 512-byte clusters, fully written: `qemu-img convert -o cluster_size=512` from a
      raw file of incompressible non-zero data (2 M clusters, 32 K L2 tables).

--scale shrinks the virtual sizes (e.g. 0.01 for a quick try). Every round makes two fresh
sparse copies of the broken image and runs both tools, alternating which goes first; each
command runs under `/usr/bin/time -f %M` (peak RSS in KiB) when present, otherwise the
peak RSS comes from resource.getrusage(RUSAGE_CHILDREN) in a fresh helper process per run.
Wall time covers the whole command, so the qcowrs figure includes Python start-up and import
(~50 ms). After every run (outside the timing) `qemu-img check` must call the image clean.
Prints a table of medians: seconds, the time ratio qcowrs/qemu-img, peak MB and its ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40
TIME_BIN = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None

# Peak RSS of one child without /usr/bin/time: a helper whose only child is the command, so
# RUSAGE_CHILDREN's ru_maxrss is that command's peak.
_RUSAGE_HELPER = r"""
import resource, subprocess, sys, json
p = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
sys.stdout.write(json.dumps({"rc": p.returncode, "maxrss_kib": ru.ru_maxrss,
                             "stderr": p.stderr.decode(errors="replace")[-2000:]}))
"""


def sh(*cmd: str | os.PathLike[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([os.fspath(c) for c in cmd], capture_output=True, text=True, check=False)
    if check and p.returncode != 0:
        sys.exit(f"command failed ({p.returncode}): {' '.join(map(str, cmd))}\n{p.stderr}")
    return p


# --------------------------------------------------------------------------------------------
# Breaking an image: cluster 0's refcount to 0 (any refcount width)


def zero_cluster0_refcount(path: Path) -> None:
    with open(path, "r+b") as fh:
        head = fh.read(104)
        version = struct.unpack_from(">I", head, 4)[0]
        (reftable,) = struct.unpack_from(">Q", head, 48)
        order = struct.unpack_from(">I", head, 96)[0] if version >= 3 else 4
        fh.seek(reftable)
        (rb,) = struct.unpack(">Q", fh.read(8))
        rb &= ~0x1FF
        bits = 1 << order
        fh.seek(rb)
        if bits >= 8:
            fh.write(bytes(bits // 8))
        else:
            b = fh.read(1)[0]
            fh.seek(rb)
            fh.write(bytes([b & ~((1 << bits) - 1)]))


def assert_needs_rebuild(path: Path) -> None:
    p = sh("qemu-img", "check", "--output=json", path, check=False)
    data = json.loads(p.stdout) if p.stdout.strip() else {}
    if p.returncode != 2 or data.get("corruptions") != 1:
        sys.exit(f"{path}: expected exactly one corruption, got {p.returncode} {data}")


# --------------------------------------------------------------------------------------------
# Builders


def build_full(d: Path, scale: float) -> Path:
    size = max(GiB, int(TiB * scale) // GiB * GiB)
    p = d / "a-full.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", p, str(size))
    return p


def build_sparse(d: Path, scale: float) -> Path:
    size = max(GiB, int(TiB * scale) // GiB * GiB)
    p = d / "b-sparse.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", p, str(size))
    n = max(16, round(1024 * scale))  # 0.1% of the disk in 1 MiB writes, evenly spread
    step = size // n // MiB * MiB
    args: list[str | os.PathLike[str]] = ["qemu-io", "-f", "qcow2"]
    for i in range(n):
        args += ["-c", f"write -P {i % 255 + 1} {i * step} 1M"]
    args.append(p)
    sh(*args)
    return p


def build_small_clusters(d: Path, scale: float) -> Path:
    size = max(16 * MiB, int(GiB * scale) // MiB * MiB)
    src = d / "c-src.raw"
    block = random.Random(0x512).randbytes(MiB)
    with open(src, "wb") as fh:
        for i in range(size // MiB):
            r = (i * 4099) % MiB
            fh.write(block[r:] + block[:r])
    p = d / "c-c512.qcow2"
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=512", src, p)
    src.unlink()
    return p


IMAGES: dict[str, tuple[str, Callable[[Path, float], Path]]] = {
    "a": ("1 TiB, 64K clusters, 100% allocated", build_full),
    "b": ("1 TiB, 64K clusters, 0.1% allocated", build_sparse),
    "c": ("1 GiB, 512 B clusters, full", build_small_clusters),
}


# --------------------------------------------------------------------------------------------
# Timing


def timed(cmd: list[str]) -> tuple[float, float]:
    """Runs cmd; returns (wall seconds, peak RSS MB). Exits on failure."""
    if TIME_BIN:
        with tempfile.NamedTemporaryFile("r", suffix=".rss") as out:
            t = time.perf_counter()
            p = subprocess.run(
                [TIME_BIN, "-f", "%M", "-o", out.name, *cmd],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                check=False,
            )
            wall = time.perf_counter() - t
            rss_kib = int(out.read().strip().splitlines()[-1])
        rc, err = p.returncode, p.stderr.decode(errors="replace")
    else:
        t = time.perf_counter()
        p2 = subprocess.run(
            [sys.executable, "-c", _RUSAGE_HELPER, *cmd], capture_output=True, text=True
        )
        wall = time.perf_counter() - t
        res = json.loads(p2.stdout)
        rc, rss_kib, err = res["rc"], res["maxrss_kib"], res["stderr"]
    if rc != 0:
        sys.exit(f"failed ({rc}): {' '.join(cmd)}\n{err[-2000:]}")
    return wall, rss_kib / 1024


def fresh_copy(src: Path, dst: Path) -> None:
    dst.unlink(missing_ok=True)
    sh("cp", "--sparse=always", src, dst)
    # flush the copy so writeback of the copy does not land inside the timed run
    with open(dst, "rb") as fh:
        os.fsync(fh.fileno())


def verify_clean(path: Path, who: str) -> None:
    p = sh("qemu-img", "check", "--output=json", path, check=False)
    data = json.loads(p.stdout) if p.stdout.strip() else {}
    if p.returncode != 0 or data.get("corruptions") or data.get("leaks"):
        sys.exit(f"{who} left {path} unclean: exit {p.returncode} {data}\n{p.stderr[-2000:]}")


EXAMPLES = Path(__file__).resolve().parent.parent / "target" / "release" / "examples"
CORE_BIN = EXAMPLES / "rebuild"


def build_core(mode: str) -> bool:
    """Builds the Rust-only example of the mode (the core without the Python interpreter)."""
    global CORE_BIN
    CORE_BIN = EXAMPLES / mode
    root = Path(__file__).resolve().parent.parent
    p = subprocess.run(
        ["cargo", "build", "--release", "--quiet", "--example", mode],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
    )
    return p.returncode == 0 and CORE_BIN.exists()


def bench_one(
    master: Path, work: Path, runs: int, mode: str
) -> dict[str, list[tuple[float, float]]]:
    if mode == "check":
        tools = {
            "qcowrs": lambda p: [sys.executable, "-m", "qcowrs", "check", os.fspath(p)],
            "qemu-img": lambda p: ["qemu-img", "check", os.fspath(p)],
        }
    else:
        tools = {
            "qcowrs": lambda p: [sys.executable, "-m", "qcowrs", "rebuild", os.fspath(p)],
            "qemu-img": lambda p: ["qemu-img", "check", "-r", "all", os.fspath(p)],
        }
    if CORE_BIN.exists():
        tools["core"] = lambda p: [os.fspath(CORE_BIN), os.fspath(p)]
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in tools}
    for r in range(runs):
        order = list(tools) if r % 2 == 0 else list(reversed(tools))
        for name in order:
            if mode == "check":
                img = master  # read-only: every tool checks the same file
            else:
                img = work / f"run-{name}.qcow2"
                fresh_copy(master, img)
            wall, mb = timed(tools[name](img))
            verify_clean(img, name)
            results[name].append((wall, mb))
            print(f"    run {r + 1} {name:9s} {wall:8.2f} s {mb:8.1f} MB", flush=True)
            if img != master:
                img.unlink()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--mode", choices=["rebuild", "check"], default="rebuild")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", default="a,b,c", help="comma-separated subset of a,b,c")
    ap.add_argument("--scale", type=float, default=1.0, help="shrink virtual sizes (0 < s <= 1)")
    ap.add_argument("--dir", default="/tmp")
    ap.add_argument("--keep", action="store_true", help="keep the images")
    args = ap.parse_args()
    which = [w for w in args.only.split(",") if w]
    for w in which:
        if w not in IMAGES:
            sys.exit(f"unknown image {w!r}")
    for tool in ("qemu-img", "qemu-io", "cp"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found")
    # real blocks at once: (c) 1 GiB raw + 1 GiB image + one copy, plus slack
    need = int(4 * GiB * args.scale) + 512 * MiB
    free = shutil.disk_usage(args.dir).free
    if free < need:
        sys.exit(
            f"not enough space in {args.dir}: {free / GiB:.1f} GiB free, {need / GiB:.1f} needed"
        )
    sh(sys.executable, "-c", "import qcowrs")  # installed?
    if not build_core(args.mode):
        print("(the Rust-only example could not be built: core column skipped)")

    work = Path(tempfile.mkdtemp(prefix="qcowrs-bench-rebuild-", dir=args.dir))
    rows = []
    try:
        for w in which:
            label, build = IMAGES[w]
            print(f"({w}) {label}: building...", flush=True)
            t = time.perf_counter()
            master = build(work, args.scale)
            if args.mode == "rebuild":
                zero_cluster0_refcount(master)
                assert_needs_rebuild(master)
            st = master.stat()
            print(
                f"    built in {time.perf_counter() - t:.1f} s: file {st.st_size / GiB:.2f} GiB, "
                f"{st.st_blocks * 512 / MiB:.0f} MiB on disk",
                flush=True,
            )
            res = bench_one(master, work, args.runs, args.mode)
            q_s = statistics.median(x[0] for x in res["qcowrs"])
            e_s = statistics.median(x[0] for x in res["qemu-img"])
            q_m = statistics.median(x[1] for x in res["qcowrs"])
            e_m = statistics.median(x[1] for x in res["qemu-img"])
            c = res.get("core") or [(float("nan"), float("nan"))]
            c_s = statistics.median(x[0] for x in c)
            c_m = statistics.median(x[1] for x in c)
            rows.append((f"({w}) {label}", q_s, e_s, q_m, e_m, c_s, c_m))
            if not args.keep:
                master.unlink()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"images kept in {work}")

    print()
    head = f"{'image':42s} {'qcowrs s':>9s} {'qemu-img s':>10s} {'ratio':>6s}"
    head += f" {'qcowrs MB':>9s} {'qemu MB':>8s} {'ratio':>6s}"
    head += f" | {'core s':>7s} {'ratio':>6s} {'core MB':>8s} {'ratio':>6s}"
    print(head)
    print("-" * len(head))
    for name, q_s, e_s, q_m, e_m, c_s, c_m in rows:
        print(
            f"{name:42s} {q_s:9.2f} {e_s:10.2f} {q_s / e_s:6.2f} "
            f"{q_m:9.1f} {e_m:8.1f} {q_m / e_m:6.2f}"
            f" | {c_s:7.2f} {c_s / e_s:6.2f} {c_m:8.1f} {c_m / e_m:6.2f}"
        )
    print(f"\nmedian of {args.runs} alternating runs; ratio = qcowrs / qemu-img (lower is better)")
    for name, q_s, e_s, *_ in rows:
        print(f"{name}: qcowrs is {e_s / q_s:.1f}x as fast as qemu-img")
    print(f"qcowrs = `python -m qcowrs {args.mode}` (includes the interpreter, ~8.4 MB RSS alone);")
    print(f"core = the same {args.mode} from the Rust crate alone (rust/examples/{args.mode}.rs)")


if __name__ == "__main__":
    main()
