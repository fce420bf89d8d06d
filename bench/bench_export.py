#!/usr/bin/env python3
"""Read throughput through qcowrs's exports next to QEMU's, on the same image, alternating.

    python bench/bench_export.py [--size 1G] [--runs 3] [--random 20000] [--workdir DIR]

One qcow2 image (--size, every cluster written by qemu-io) is served four ways, one at a time:
  * FUSE: `qcowrs mount IMAGE FILE` and `qemu-storage-daemon --export type=fuse` (QEMU's FUSE
    export; skipped with a message if this QEMU was built without it);
  * NBD: `qcowrs serve --socket S IMAGE` and `qemu-nbd -r -f qcow2 --socket S IMAGE`.
Each round measures, for qcowrs then QEMU: sequential reads (FUSE: `dd bs=1M` of the whole
file; NBD: `nbdcopy` to `null:`) and random 4 KiB reads (FUSE: `os.pread` at --random seeded
offsets; NBD: the same offsets as `qemu-io` `read` commands on stdin), with the page cache
dropped before each. Prints the median MiB/s (sequential) and reads/s (random) of each and the
ratio qcowrs / QEMU (above 1: qcowrs is faster).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

MiB = 1 << 20


def run(*cmd: str | Path, **kw: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([os.fspath(c) for c in cmd], check=True, capture_output=True, **kw)  # type: ignore[call-overload, no-any-return]


def drop_caches() -> None:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass


def qcowrs_cmd() -> list[str]:
    beside = Path(sys.executable).with_name("qcowrs")
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "qcowrs"]


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


@contextmanager
def serving(argv: list[str], ready: Callable[[], bool], what: str) -> Iterator[None]:
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: ready() or p.poll() is not None, what)
        if p.poll() is not None:
            err = p.stderr.read().decode() if p.stderr else ""
            raise RuntimeError(f"{what} exited: {err.strip()}")
        yield
    finally:
        p.terminate()
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def mounted(f: Path, size: int) -> Callable[[], bool]:
    return lambda: f.exists() and f.stat().st_size == size


def fuse_seq(f: Path) -> float:
    drop_caches()
    t = time.perf_counter()
    run("dd", f"if={f}", "of=/dev/null", "bs=1M")
    return time.perf_counter() - t


def fuse_random(f: Path, offsets: list[int]) -> float:
    drop_caches()
    fd = os.open(f, os.O_RDONLY)
    try:
        t = time.perf_counter()
        for off in offsets:
            os.pread(fd, 4096, off)
        return time.perf_counter() - t
    finally:
        os.close(fd)


def nbd_seq(sock: Path) -> float:
    drop_caches()
    t = time.perf_counter()
    run("nbdcopy", f"nbd+unix:///?socket={sock}", "null:")
    return time.perf_counter() - t


def nbd_random(sock: Path, script: bytes) -> float:
    drop_caches()
    t = time.perf_counter()
    run("qemu-io", "-r", "-f", "raw", f"nbd+unix:///?socket={sock}", input=script)
    return time.perf_counter() - t


def measure(args: argparse.Namespace, work: Path) -> list[tuple[str, list[float], list[float]]]:
    size = args.size_bytes
    img = work / "img.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", img, str(size))
    cmds: list[str] = []
    for i, at in enumerate(range(0, size, 64 * MiB)):
        cmds += ["-c", f"write -P {0x10 + i % 200} {at} {min(64 * MiB, size - at)}"]
    run("qemu-io", "-f", "qcow2", *cmds, img)
    rng = random.Random(1)
    offsets = [rng.randrange(0, size // 4096) * 4096 for _ in range(args.random)]
    script = "".join(f"read -q {o} 4k\n" for o in offsets).encode()
    fq, fm = work / "fuse-q", work / "fuse-m"
    sq, sm = work / "nbd-q.sock", work / "nbd-m.sock"
    fq.touch()
    fm.touch()
    qsd_fuse = [
        "qemu-storage-daemon",
        "--blockdev", f"driver=file,node-name=file,filename={img},read-only=on",
        "--blockdev", "driver=qcow2,node-name=disk,file=file,read-only=on",
        "--export", f"type=fuse,id=exp,node-name=disk,mountpoint={fm},writable=off",
    ]  # fmt: skip
    cases: dict[str, tuple[list[str], Callable[[], bool], Callable[[], float]]] = {
        "fuse seq (qcowrs)": ([*qcowrs_cmd(), "mount", str(img), str(fq)], mounted(fq, size),
                              lambda: fuse_seq(fq)),
        "fuse seq (qemu)": (qsd_fuse, mounted(fm, size), lambda: fuse_seq(fm)),
        "fuse random (qcowrs)": ([*qcowrs_cmd(), "mount", str(img), str(fq)], mounted(fq, size),
                                 lambda: fuse_random(fq, offsets)),
        "fuse random (qemu)": (qsd_fuse, mounted(fm, size), lambda: fuse_random(fm, offsets)),
        "nbd seq (qcowrs)": ([*qcowrs_cmd(), "serve", "--socket", str(sq), str(img)], sq.exists,
                             lambda: nbd_seq(sq)),
        "nbd seq (qemu)": (["qemu-nbd", "-r", "-f", "qcow2", "--socket", str(sm), str(img)],
                           sm.exists, lambda: nbd_seq(sm)),
        "nbd random (qcowrs)": ([*qcowrs_cmd(), "serve", "--socket", str(sq), str(img)],
                                sq.exists, lambda: nbd_random(sq, script)),
        "nbd random (qemu)": (["qemu-nbd", "-r", "-f", "qcow2", "--socket", str(sm), str(img)],
                              sm.exists, lambda: nbd_random(sm, script)),
    }  # fmt: skip
    times: dict[str, list[float]] = {k: [] for k in cases}
    skipped: set[str] = set()
    for _ in range(args.runs):
        for name, (argv, ready, work_fn) in cases.items():
            if name in skipped:
                continue
            for s in (sq, sm):
                s.unlink(missing_ok=True)
            try:
                with serving(argv, ready, name):
                    times[name].append(work_fn())
            except RuntimeError as e:
                print(f"skipped {name}: {e}", file=sys.stderr)
                skipped.add(name)
    out = []
    for kind in ("fuse seq", "fuse random", "nbd seq", "nbd random"):
        out.append((kind, times[f"{kind} (qcowrs)"], times[f"{kind} (qemu)"]))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", default="1G", help="disk size (default 1G)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--random", type=int, default=20000, help="random 4 KiB reads per run")
    ap.add_argument("--workdir", type=Path)
    args = ap.parse_args(argv)
    units = {"K": 1 << 10, "M": MiB, "G": 1 << 30}
    s = args.size.upper()
    args.size_bytes = int(s[:-1]) * units[s[-1]] if s[-1] in units else int(s)
    work = Path(tempfile.mkdtemp(prefix="qcowrs-bench-export-", dir=args.workdir))
    try:
        results = measure(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'case':<12} {'qcowrs':>14} {'QEMU':>14} {'ratio':>7}")
    for kind, ours, theirs in results:
        if not ours or not theirs:
            print(f"{kind:<12} {'n/a':>14} {'n/a':>14}")
            continue
        to, tq = statistics.median(ours), statistics.median(theirs)
        if "seq" in kind:
            a, b, unit = args.size_bytes / MiB / to, args.size_bytes / MiB / tq, "MiB/s"
        else:
            a, b, unit = args.random / to, args.random / tq, "reads/s"
        print(f"{kind:<12} {a:>8.0f} {unit:<5} {b:>8.0f} {unit:<5} {a / b:>6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
