"""Crash consistency of the write path: a writer process runs a long random workload through
qcowrs (writes, write_zeroes, discards, a flush() after every batch, "FLUSHED <n>" printed
after each successful flush) and is SIGKILLed at a random moment. Then:

  * a non-lazy image must need no repair at all: `qemu-img check` finds at most leaks;
  * a lazy_refcounts image may need `QcowFile.open(p, "r+b", rebuild=True)` (when qcowrs
    reports the refcounts stale or qemu-img finds corruptions); afterwards at most leaks;
  * every write flushed before the kill is there: with the model after the n acknowledged
    batches, each byte not touched by batch n+1 (the one in flight) equals the model, and each
    touched byte equals either the model or what one of batch n+1's operations put there.

The workload is a deterministic function of a seed (GEN_SRC, shared by the writer and the
test), so the test re-derives exactly what was written up to each flush. The same image is
killed repeatedly; each run starts from the content verified after the previous kill.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    first_difference,
    merge,
    parse_header,
    qcowrs_read_all,
    qemu_check,
    raw_bytes,
    requires_qemu,
)

pytestmark = requires_qemu

KiB = 1024
MiB = 1024 * KiB

# The workload generator, executed both in the writer and in the test.
GEN_SRC = r'''
import random

def batches(seed, size, cs):
    """Yields (batch number from 1, [(kind, offset, length, data_seed)]) forever."""
    rng = random.Random(seed)
    b = 0
    while True:
        b += 1
        ops = []
        for _ in range(rng.randint(1, 6)):
            kind = rng.choices(("write", "zero", "discard"), weights=(10, 1, 1))[0]
            if rng.random() < 0.3:  # cluster aligned
                off = rng.randrange(size // cs) * cs
            else:
                off = rng.randrange(size)
            n = rng.choice((rng.randint(1, 5000), rng.randint(1, 3 * cs), rng.randint(1, 1 << 18)))
            n = max(1, min(n, size - off))
            ops.append((kind, off, n, rng.getrandbits(32)))
        yield b, ops

def op_data(n, data_seed):
    return random.Random(data_seed).randbytes(n)
'''

WRITER = (
    GEN_SRC
    + r"""
import sys
import qcowrs

path = sys.argv[1]
seed, size, cs, max_batches = (int(a) for a in sys.argv[2:6])
f = qcowrs.QcowFile.open(path, mode="r+b")
print("READY", flush=True)
for b, ops in batches(seed, size, cs):
    for kind, off, n, ds in ops:
        if kind == "write":
            f.seek(off)
            if f.write(op_data(n, ds)) != n:
                raise SystemExit("short write")
        elif kind == "zero":
            f.write_zeroes(off, n)
        else:
            f.discard(off, n)
    f.flush()
    print("FLUSHED", b, flush=True)
    if b >= max_batches:
        break
f.close()
print("DONE", flush=True)
"""
)

_gen: dict[str, Any] = {}
exec(compile(GEN_SRC, "<crash-workload>", "exec"), _gen)
batches = _gen["batches"]
op_data = _gen["op_data"]

MAX_BATCHES = 100_000  # never reached: the writer is killed long before


@dataclass
class Run:
    flushed: int
    killed: bool
    stderr: str


def run_writer(path: Path, seed: int, size: int, cs: int, delay: float, what: str) -> Run:
    """Starts the writer, waits for READY, sleeps `delay` and SIGKILLs its process group."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            WRITER,
            os.fspath(path),
            str(seed),
            str(size),
            str(cs),
            str(MAX_BATCHES),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    ready = threading.Event()

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.strip())
            if line.startswith("READY"):
                ready.set()
        ready.set()

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        if not ready.wait(60):
            pytest.fail("the writer did not start within 60 s")
        time.sleep(delay)
        killed = proc.poll() is None
        if killed:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    t.join(30)
    assert proc.stdout is not None
    assert proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read()
    proc.stderr.close()
    if not killed or proc.returncode != -signal.SIGKILL:
        pytest.fail(
            f"{what}: the writer ended by itself (exit {proc.returncode}) before the kill:\n"
            f"stdout tail: {lines[-5:]}\nstderr:\n{err[-4000:]}"
        )
    assert lines[:1] == ["READY"], lines[:3]
    # A line cut by the kill (or by the pipe closing) is not an acknowledged flush.
    flushed = [int(m[1]) for x in lines if (m := re.fullmatch(r"FLUSHED (\d+)", x))]
    assert flushed == list(range(1, len(flushed) + 1)), "FLUSHED lines out of order"
    return Run(len(flushed), killed, err)


_NONZERO = bytes([0] + [1] * 255)


def _mismatch(a: bytes, b: bytes) -> int:
    """Per-byte flags as an int: byte i of the result (little endian) is 1 where a[i] != b[i]."""
    x = int.from_bytes(a, "little") ^ int.from_bytes(b, "little")
    return int.from_bytes(x.to_bytes(len(a), "little").translate(_NONZERO), "little")


def check_after_crash(
    img: bytes, model: bytearray, inflight: list[tuple[str, int, int, int]], cs: int, what: str
) -> None:
    """Untouched bytes equal the model; touched bytes equal the model or one in-flight op."""
    size = len(model)
    assert len(img) == size, what
    cands: list[tuple[int, int, bytes]] = []  # (start, end, bytes the op leaves there)
    touched: list[tuple[int, int]] = []
    for kind, off, n, ds in inflight:
        if kind == "write":
            cands.append((off, off + n, op_data(n, ds)))
            touched.append((off, off + n))
        elif kind == "zero":
            cands.append((off, off + n, bytes(n)))
            touched.append((off, off + n))
        else:
            s, e = -(-off // cs) * cs, (off + n) // cs * cs
            if e > s:
                cands.append((s, e, bytes(e - s)))
                touched.append((s, e))
    touched = merge(touched)
    prev = 0
    for s, e in [*touched, (size, size)]:
        if img[prev:s] != model[prev:s]:
            pytest.fail(
                f"{what}: flushed data lost in [{prev:#x}, {s:#x}) (untouched by the batch in "
                f"flight): {first_difference(img[prev:s], model[prev:s])} (relative)"
            )
        prev = e
    for s, e in touched:
        bad = _mismatch(img[s:e], bytes(model[s:e]))
        for cs_, ce, data in cands:
            a, b = max(s, cs_), min(e, ce)
            if a >= b or not bad:
                continue
            sub = _mismatch(img[a:b], data[a - cs_ : b - cs_])
            ones_before = int.from_bytes(b"\x01" * (a - s), "little")
            allow = ones_before | (sub << (8 * (a - s)))
            allow |= int.from_bytes(b"\x01" * (e - b), "little") << (8 * (b - s))
            bad &= allow
        if bad:
            first = (bad & -bad).bit_length() // 8
            pos = s + first
            pytest.fail(
                f"{what}: byte {pos:#x} = {img[pos]:#04x} is neither the flushed content "
                f"({model[pos]:#04x}) nor written by an operation in flight {inflight}"
            )


CONFIGS = [
    ("plain_64k", 64 * MiB, 65536, {}),
    ("lazy_64k", 64 * MiB, 65536, {"lazy_refcounts": True}),
    ("plain_4k", 64 * MiB, 4096, {"cluster_size": 4096}),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("size", "cs", "kw"), [c[1:] for c in CONFIGS], ids=[c[0] for c in CONFIGS]
)
def test_sigkill_during_writes(
    tmp_path: Path, qcowrs_mod: Any, size: int, cs: int, kw: dict[str, Any]
) -> None:
    lazy = bool(kw.get("lazy_refcounts"))
    p = tmp_path / "crash.qcow2"
    qcowrs_mod.QcowFile.create(p, size, **kw).close()
    content = bytearray(size)
    rng = random.Random(0xC0FFEE + cs + lazy)
    runs = 10
    total_flushed = 0
    rebuilt = 0
    for run in range(runs):
        seed = rng.getrandbits(32)
        delay = rng.uniform(0.05, 0.5)
        what = f"run {run} (seed {seed}, kill after {delay:.3f}s"
        r = run_writer(p, seed, size, cs, delay, what + ")")
        what += f", {r.flushed} flushes)"
        total_flushed += r.flushed

        # the model after the acknowledged batches, and the batch in flight
        model = content
        inflight: list[tuple[str, int, int, int]] = []
        for b, ops in batches(seed, size, cs):
            if b > r.flushed:
                inflight = ops
                break
            for kind, off, n, ds in ops:
                if kind == "write":
                    model[off : off + n] = op_data(n, ds)
                elif kind == "zero":
                    model[off : off + n] = bytes(n)
                else:
                    s, e = -(-off // cs) * cs, (off + n) // cs * cs
                    if e > s:
                        model[s:e] = bytes(e - s)

        rc, data, err = qemu_check(p)
        assert rc in (0, 2, 3), f"{what}: qemu-img check failed (exit {rc}): {data}\n{err[-2000:]}"
        if not lazy:
            assert rc in (0, 3), (
                f"{what}: a killed writer left corruptions in a non-lazy image (exit {rc}): "
                f"{data}\n{err[-3000:]}"
            )
        dirty = bool(parse_header(p)["incompatible_features"] & 1)
        with qcowrs_mod.QcowFile.open(p, mode="r+b") as f:  # rebuild=False: no repair
            stale = f.refcounts_stale
        assert stale or not dirty, f"{what}: dirty bit set but refcounts_stale is False"
        if stale or rc == 2:
            with qcowrs_mod.QcowFile.open(p, mode="r+b", rebuild=True) as f:
                assert not f.refcounts_stale, f"{what}: still stale after open(rebuild=True)"
            rebuilt += 1
        rc2, data2, err2 = qemu_check(p)
        assert rc2 in (0, 3), f"{what}: after recovery (exit {rc2}): {data2}\n{err2[-3000:]}"
        assert not data2.get("corruptions"), f"{what}: {data2}"
        assert data2.get("check-errors") == 0, f"{what}: {data2}"

        img = raw_bytes(p)
        check_after_crash(img, model, inflight, cs, what)
        assert qcowrs_read_all(p) == img, f"{what}: qcowrs and QEMU read different content"
        content = bytearray(img)
    assert total_flushed >= runs, f"too few flushes ({total_flushed}, {rebuilt} rebuilds)"
