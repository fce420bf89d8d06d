#!/usr/bin/env python3
"""`qcowrs commit`, safe `rebase` and `resize --shrink` against qemu-img's, alternating.

    python bench/bench_chain.py [--size 4G] [--runs 3] [--workdir DIR] [--keep]

The images (made once with qemu-img/qemu-io, copied fresh before every run, the copy not
timed, `sync` before every run):
  * commit: a --size base with 25% written, an overlay with another 25% (half over the base's
    data); `commit overlay` (into the base, overlay emptied);
  * rebase: the same overlay moved (safe mode) from its base onto a second base that shares
    half of the first base's data; every differing cluster is compared and copied;
  * shrink: a --size image with 25% written spread over the disk, shrunk to a quarter.
Each round runs qemu-img, the `qcowrs` command (both with process start-up: a Python
interpreter starts in ~15 ms here, qemu-img does its whole run of a small image in ~8 ms) and
the Python API in this process (`qcowrs.commit/rebase/resize`, what a Python program calls
instead of running qemu-img), with the same arguments; the median wall time of each is printed
with the ratios qemu-img / qcowrs (above 1: qcowrs is faster). The first result of each qcowrs
way is checked against qemu-img's (guest content of every image by sha256 of `qemu-img
convert -O raw`, `qemu-img check` clean).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GiB = 1 << 30
MiB = 1 << 20


def run(*cmd: str | Path, cwd: Path | None = None) -> None:
    p = subprocess.run([os.fspath(c) for c in cmd], capture_output=True, text=True, cwd=cwd)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))}: exit {p.returncode}: {p.stderr.strip()}")


def qcowrs_cmd() -> list[str]:
    beside = Path(sys.executable).with_name("qcowrs")
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "qcowrs"]


def write_spread(img: Path, size: int, fraction_of: int, pattern: int, offset: int = 0) -> None:
    """Writes 64 MiB pieces so that 1/fraction_of of the disk holds data."""
    piece = 64 * MiB
    cmds: list[str] = []
    for at in range(offset, size, piece * fraction_of):
        cmds += ["-c", f"write -P {pattern} {at} {min(piece, size - at)}"]
    run("qemu-io", *cmds, img)


def settle(work: Path) -> None:
    """Syncs, then waits (up to 20 s) until the disk under `work` has had no request in flight
    for 0.3 s: deleting a copy sends discards that would otherwise land on the next run."""
    os.sync()
    st = os.stat(work).st_dev
    inflight = Path(f"/sys/dev/block/{os.major(st)}:{os.minor(st)}/inflight")
    if not inflight.exists():
        return
    quiet_since = time.monotonic()
    deadline = quiet_since + 20
    while time.monotonic() < deadline:
        if any(int(x) for x in inflight.read_text().split()):
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= 0.3:
            return
        time.sleep(0.01)


def digest(p: Path) -> str:
    out = p.with_suffix(".flat")
    run("qemu-img", "convert", "-O", "raw", p, out)
    h = hashlib.sha256()
    with open(out, "rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    out.unlink()
    return h.hexdigest()


def prepare(work: Path, size: int) -> Path:
    src = work / "src"
    src.mkdir()
    run("qemu-img", "create", "-q", "-f", "qcow2", src / "base.qcow2", str(size))
    write_spread(src / "base.qcow2", size, 4, 0x11)
    run("qemu-img", "create", "-q", "-f", "qcow2", src / "base2.qcow2", str(size))
    write_spread(src / "base2.qcow2", size, 8, 0x11)  # half of base's data, the same bytes
    run(
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        src / "over.qcow2",
    )
    write_spread(src / "over.qcow2", size, 4, 0x22, offset=32 * MiB)
    run("qemu-img", "create", "-q", "-f", "qcow2", src / "shrink.qcow2", str(size))
    write_spread(src / "shrink.qcow2", size, 4, 0x33)
    return src


CASES = {
    "commit": (["commit", "over.qcow2"], ["over.qcow2", "base.qcow2"]),
    "rebase (safe)": (["rebase", "-b", "base2.qcow2", "-F", "qcow2", "over.qcow2"], ["over.qcow2"]),
    "shrink to 1/4": (["resize", "--shrink", "shrink.qcow2", "QUARTER"], ["shrink.qcow2"]),
}


def api_call(name: str, d: Path, size: int) -> None:
    """The Python API's call for a case, in this process."""
    import qcowrs

    if name == "commit":
        qcowrs.commit(d / "over.qcow2")
    elif name == "rebase (safe)":
        qcowrs.rebase(d / "over.qcow2", "base2.qcow2", "qcow2")
    else:
        qcowrs.resize(d / "shrink.qcow2", size // 4, shrink=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", default="4G", help="disk size (default 4G)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of the cases")
    args = ap.parse_args(argv)
    size = int(args.size[:-1]) * {"M": MiB, "G": GiB}[args.size[-1]]
    work = Path(tempfile.mkdtemp(prefix="qcowrs-bench-chain-", dir=args.workdir or "/var/tmp"))
    tools: dict[str, list[str] | None] = {
        "qemu-img": ["qemu-img"],
        "qcowrs": qcowrs_cmd(),
        "API": None,
    }
    import qcowrs  # noqa: F401  (imported before any timing, as a program would have)

    print(f"work directory {work}; {os.cpu_count()} cores; size {args.size}, {args.runs} rounds")
    try:
        src = prepare(work, size)
        rows = []
        for name in args.cases.split(","):
            cmd, check = CASES[name]
            cmd = [str(size // 4) if c == "QUARTER" else c for c in cmd]
            times: dict[str, list[float]] = {t: [] for t in tools}
            results: dict[str, dict[str, str]] = {}
            for r in range(args.runs):
                for tool, argv0 in tools.items():
                    d = work / f"{tool}-{r}"
                    shutil.copytree(src, d)
                    settle(work)
                    t0 = time.perf_counter()
                    if argv0 is None:
                        api_call(name, d, size)
                    else:
                        run(*argv0, *cmd, cwd=d)
                    times[tool].append(time.perf_counter() - t0)
                    if r > 0:
                        shutil.rmtree(d)
            # The first round's results are checked after every round is timed: digests write
            # and delete whole raw images, whose write-back and discards would slow the next runs.
            for tool in tools:
                d = work / f"{tool}-0"
                results[tool] = {f: digest(d / f) for f in check}
                for f in check:
                    run("qemu-img", "check", d / f)
                shutil.rmtree(d)
            ok = "equal" if all(r == results["qemu-img"] for r in results.values()) else "DIFFERENT"
            q, o, a = (statistics.median(times[t]) for t in tools)
            rows.append((name, q, o, a, ok))
            rounds = "  ".join(f"{t} " + ",".join(f"{x:.3f}" for x in times[t]) for t in tools)
            print(f"{name}: {rounds}")
            print(
                f"{name}: qemu-img {q:.3f}s  qcowrs {o:.3f}s ({q / o:.2f}x)  "
                f"API {a:.3f}s ({q / a:.2f}x)  results {ok}"
            )
        print("\n| case | qemu-img s | qcowrs s | speed-up | API s | speed-up | result |")
        print("|---|---|---|---|---|---|---|")
        for name, q, o, a, ok in rows:
            print(f"| {name} | {q:.3f} | {o:.3f} | {q / o:.2f}x | {a:.3f} | {q / a:.2f}x | {ok} |")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
