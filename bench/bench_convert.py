#!/usr/bin/env python3
"""`qcowrs convert` against `qemu-img convert`, side by side on the same work, alternating.

    python bench/bench_convert.py [--size 1G] [--compress-size 256M] [--backing-size 1T]
                                  [--runs 3] [--workdir DIR] [--keep] [--quick]
                                  [--cache MODE] [--qcowrs CMD]

Everything happens in --workdir (default: a temporary directory under /var/tmp, removed at the
end unless --keep). Both tools get the same command line, `TOOL convert -f FMT -O FMT [options]
SRC DST`, run as processes (start-up included) and timed with time.perf_counter; in each of
--runs rounds qemu-img runs first, then qcowrs; before every run the target is deleted and
sync(2) called (not timed: no dirty pages of an earlier run are written back during the next
one), and st_blocks is read after another sync. Nothing is dropped from the page cache: the
sources are read once beforehand and both tools see the same warm cache. The first qcowrs output
of every case is checked with `qemu-img compare` against the source (and `qemu-img check` when
it is a qcow2).

Cases:
  1. qcow2 -> raw    of --size bytes of incompressible data (the qcow2 made by qemu-img);
  2. raw -> qcow2    of the same data;
  3. qcow2 -> qcow2  of the same;
  4. an overlay over a sparse --backing-size qcow2 (1 MiB written with qemu-io at 0, 30% and
     90% of it; 1 MiB at four other places of the overlay, one overlapping a base write),
     converted (flattened) -> qcow2 and -> raw;
  5. raw -> qcow2 -c of --compress-size bytes of half-compressible data (each 64 KiB cluster:
     32 KiB random, then 32 KiB of a short repeated pattern), with zlib (`-c`) and with zstd
     (`-c -o compression_type=zstd`), with the default settings and with `-W -m 8` (qemu-img's
     best multi-threaded setting; both tools get it).

Prints each run, then per case the median wall time of each tool, the ratio qemu-img / qcowrs
(above 1: qcowrs is faster) and the target's allocated size (st_blocks * 512) for both, and a
summary table at the end. Both tools get the same target cache mode, `-t MODE` (--cache):
`unsafe` by default (qemu-img convert's default: the target is never synced), or `writeback`
(qcowrs's default: metadata writes ordered and the target synced before exit; qemu-img then
flushes at the end too).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

MIB = 1 << 20
CLUSTER = 64 * 1024
MT = ("-W", "-m", "8")


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (examples: 1G, 256M, 1048576)")
    n = int(m.group(1)) << (10 * " KMGT".index((m.group(2) or " ").upper()))
    if n <= 0 or n % MIB:
        raise argparse.ArgumentTypeError("size must be a positive multiple of 1 MiB")
    return n


def human(n: int) -> str:
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):g} {unit}"
    return f"{n} B"


def run(*cmd: str | Path, stdin: str | None = None) -> str:
    proc = subprocess.run(
        [os.fspath(c) for c in cmd], input=stdin, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(map(os.fspath, cmd))} exited with {proc.returncode}:\n"
            f"{proc.stdout}{proc.stderr}"
        )
    return proc.stdout


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def warm(path: Path) -> None:
    with open(path, "rb", buffering=0) as fh:
        buf = bytearray(8 * MIB)
        while fh.readinto(buf):
            pass


def make_random(path: Path, size: int) -> None:
    """Incompressible, non-zero data: one random MiB, rotated differently in every MiB."""
    block = random.Random(0xC0417).randbytes(MIB)
    with open(path, "wb") as fh:
        for i in range(size // MIB):
            r = (i * 4099) % MIB
            fh.write(block[r:] + block[:r])


def make_half_compressible(path: Path, size: int) -> None:
    """Each 64 KiB cluster: 32 KiB of random bytes, then 32 KiB of a short repeated pattern."""
    rng = random.Random(0x5EED)
    half = CLUSTER // 2
    pattern = (b"qcowrs-bench-convert " * (half // 21 + 1))[:half]
    with open(path, "wb") as fh:
        for _ in range(size // MIB):
            fh.write(b"".join(rng.randbytes(half) + pattern for _ in range(MIB // CLUSTER)))


def make_overlay(work: Path, backing_size: int) -> tuple[Path, Path]:
    base, over = work / "base.qcow2", work / "over.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", base, str(backing_size))

    def at(frac: float, extra: int = 0) -> int:
        return int(backing_size * frac) // MIB * MIB + extra

    base_writes = [f"write -P 0x61 {at(f)} 1M" for f in (0.0, 0.3, 0.9)]
    run("qemu-io", "-f", "qcow2", base, stdin="\n".join(base_writes) + "\nquit\n")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", over)
    over_writes = [
        f"write -P 0x62 {at(0.0, MIB)} 1M",
        f"write -P 0x63 {at(0.45)} 1M",
        f"write -P 0x64 {at(0.9, MIB // 2)} 1M",  # half over the base's write at 90%
        f"write -P 0x65 {backing_size - MIB} 1M",
    ]
    run("qemu-io", "-f", "qcow2", over, stdin="\n".join(over_writes) + "\nquit\n")
    return base, over


@dataclass
class Case:
    name: str
    src: Path
    src_fmt: str
    dst_fmt: str
    opts: tuple[str, ...] = ()
    times: dict[str, list[float]] = field(default_factory=lambda: {"qemu-img": [], "qcowrs": []})
    alloc: dict[str, int] = field(default_factory=dict)
    verified: str = "-"

    def cmd(self, tool: list[str], dst: Path, cache: str) -> list[str]:
        extra = ["-t", cache]
        return [
            *tool,
            "convert",
            "-f",
            self.src_fmt,
            "-O",
            self.dst_fmt,
            *extra,
            *self.opts,
            os.fspath(self.src),
            os.fspath(dst),
        ]


def verify(case: Case, dst: Path) -> str:
    run("qemu-img", "compare", "-q", "-f", case.src_fmt, "-F", case.dst_fmt, case.src, dst)
    if case.dst_fmt != "qcow2":
        return "compare ok"
    run("qemu-img", "check", "-q", "-f", "qcow2", dst)
    return "compare+check ok"


def run_case(case: Case, work: Path, tools: dict[str, list[str]], args: argparse.Namespace) -> None:
    dst = work / f"target.{case.dst_fmt}"
    opts = " ".join(case.opts)
    print(f"\n{case.name}: -f {case.src_fmt} -O {case.dst_fmt} {opts}".rstrip())
    for rnd in range(args.runs):
        for name, tool in tools.items():
            dst.unlink(missing_ok=True)
            os.sync()  # no dirty pages of an earlier run left to write back during this one
            cmd = case.cmd(tool, dst, args.cache)
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            dt = time.perf_counter() - t0
            if proc.returncode != 0:
                raise RuntimeError(
                    f"{' '.join(cmd)} exited with {proc.returncode}:\n{proc.stdout}{proc.stderr}"
                )
            case.times[name].append(dt)
            os.sync()  # settle ext4's delayed allocation before reading st_blocks
            size = allocated(dst)
            if name in case.alloc and case.alloc[name] != size:
                print(f"    note: {name} target size changed: {case.alloc[name]} -> {size}")
            case.alloc[name] = size
            line = f"  round {rnd + 1}: {name:8s} {dt:8.3f}s  allocated {size / MIB:9.1f} MiB"
            if name == "qcowrs" and rnd == 0:
                try:
                    case.verified = verify(case, dst)
                except RuntimeError as e:
                    case.verified = "DIFFERS"
                    print(f"    VERIFY FAILED: {e}")
                line += f"  ({case.verified})"
            print(line)
    dst.unlink(missing_ok=True)
    q, c = (statistics.median(case.times[k]) for k in ("qemu-img", "qcowrs"))
    print(
        f"  median: qemu-img {q:.3f}s  qcowrs {c:.3f}s  qemu-img/qcowrs {q / c:.2f}  "
        f"allocated qemu-img {case.alloc['qemu-img'] / MIB:.1f} MiB, "
        f"qcowrs {case.alloc['qcowrs'] / MIB:.1f} MiB"
    )


def summary(cases: list[Case], runs: int) -> None:
    w = max(len(c.name) for c in cases)
    head = (
        f"| {'case':{w}s} | qemu-img s | qcowrs s | speed-up | qemu-img alloc | qcowrs alloc "
        f"| verified         |"
    )
    print(f"\nsummary (median of {runs} alternating runs, warm page cache, alloc = st_blocks*512):")
    print(head)
    print("|" + "|".join("-" * (len(p)) for p in head.split("|")[1:-1]) + "|")
    for c in cases:
        q, o = (statistics.median(c.times[k]) for k in ("qemu-img", "qcowrs"))
        print(
            f"| {c.name:{w}s} | {q:10.3f} | {o:8.3f} | {q / o:7.2f}x "
            f"| {c.alloc['qemu-img'] / MIB:10.1f} MiB | {c.alloc['qcowrs'] / MIB:8.1f} MiB "
            f"| {c.verified:16s} |"
        )


def find_qcowrs(given: str | None) -> list[str]:
    if given:
        return shlex.split(given)
    beside = Path(sys.executable).parent / "qcowrs"
    if beside.exists():
        return [os.fspath(beside)]
    found = shutil.which("qcowrs")
    return [found] if found else [sys.executable, "-m", "qcowrs"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=parse_size, default=None, help="cases 1-3 (default 1G)")
    ap.add_argument("--compress-size", type=parse_size, default=None, help="case 5 (256M)")
    ap.add_argument("--backing-size", type=parse_size, default=None, help="case 4 (1T)")
    ap.add_argument("--runs", type=int, default=3, help="rounds per case (median reported)")
    ap.add_argument("--workdir", type=Path, help="default: a new directory under /var/tmp")
    ap.add_argument("--keep", action="store_true", help="keep the images at the end")
    ap.add_argument("--quick", action="store_true", help="64M / 32M / 64G: a smoke test")
    ap.add_argument(
        "--cache",
        metavar="MODE",
        default="unsafe",
        choices=["unsafe", "writeback"],
        help="-t MODE for both tools: unsafe (default, as qemu-img's) or writeback (both sync)",
    )
    ap.add_argument(
        "--qcowrs",
        metavar="CMD",
        help="the qcowrs CLI, a command line (default: the one beside this Python)",
    )
    args = ap.parse_args(argv)
    size = args.size or parse_size("64M" if args.quick else "1G")
    csize = args.compress_size or parse_size("32M" if args.quick else "256M")
    bsize = args.backing_size or parse_size("64G" if args.quick else "1T")
    if bsize < 16 * MIB:
        ap.error("--backing-size must be at least 16M")
    for tool in ("qemu-img", "qemu-io"):
        if shutil.which(tool) is None:
            print(f"{tool} is required", file=sys.stderr)
            return 1
    tools = {"qemu-img": ["qemu-img"], "qcowrs": find_qcowrs(args.qcowrs)}

    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="bench-convert-", dir=args.workdir))
    else:
        work = Path(tempfile.mkdtemp(prefix="qcowrs-bench-convert-", dir="/var/tmp"))
    print(run("qemu-img", "--version").splitlines()[0])
    print(run(*tools["qcowrs"], "--version").strip(), f"({' '.join(tools['qcowrs'])})")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"{os.cpu_count()} cores, load average {load}; work directory {work}")
    print(
        f"{args.runs} round(s) per case, alternating qemu-img then qcowrs, median wall time; "
        "target deleted and sync(2) before every run (outside the timing); no cache dropping: "
        "the sources are read once beforehand and both tools see the same warm page cache"
    )
    startup = {}
    for name, tool in tools.items():
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            run(*tool, "--version")
            ts.append(time.perf_counter() - t0)
        startup[name] = statistics.median(ts)
    print(
        "process start-up (`--version`, median of 3, included in every time below): "
        + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in startup.items())
    )
    what = {"unsafe": "never synced", "writeback": "synced before exit"}[args.cache]
    print(f"target cache mode for both tools: -t {args.cache} ({what})")

    cases: list[Case] = []
    try:
        t0 = time.perf_counter()
        raw, qcow = work / "src.raw", work / "src.qcow2"
        make_random(raw, size)
        run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow)
        half = work / "half.raw"
        make_half_compressible(half, csize)
        _, over = make_overlay(work, bsize)
        for p in work.iterdir():
            warm(p)
        print(
            f"sources: {human(size)} incompressible (raw and qcow2), {human(csize)} "
            f"half-compressible raw, overlay over a sparse {human(bsize)} base; "
            f"built in {time.perf_counter() - t0:.1f}s"
        )
        g = human(size)
        cases = [
            Case(f"1. qcow2->raw {g}", qcow, "qcow2", "raw"),
            Case(f"2. raw->qcow2 {g}", raw, "raw", "qcow2"),
            Case(f"3. qcow2->qcow2 {g}", qcow, "qcow2", "qcow2"),
            Case(f"4a. overlay/{human(bsize)}->qcow2", over, "qcow2", "qcow2"),
            Case(f"4b. overlay/{human(bsize)}->raw", over, "qcow2", "raw"),
        ]
        c = human(csize)
        zstd = ("-c", "-o", "compression_type=zstd")
        cases += [
            Case(f"5a. -c zlib {c}", half, "raw", "qcow2", ("-c",)),
            Case(f"5b. -c zlib -W -m 8 {c}", half, "raw", "qcow2", ("-c", *MT)),
            Case(f"5c. -c zstd {c}", half, "raw", "qcow2", zstd),
            Case(f"5d. -c zstd -W -m 8 {c}", half, "raw", "qcow2", (*zstd, *MT)),
        ]
        for case in cases:
            run_case(case, work, tools, args)
    finally:
        if args.keep:
            print(f"\nkept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    summary(cases, args.runs)
    print("load average at the end: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    bad = [c.name for c in cases if c.verified == "DIFFERS"]
    if bad:
        print(f"qcowrs output did not verify: {', '.join(bad)}")
    status = 1 if bad else 0
    print(f"exit status {status}")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
