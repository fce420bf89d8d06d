"""Shared helpers and fixtures: qemu-img/qemu-io wrappers, hashing oracles, header patching,
a subprocess probe for malformed inputs, and an image builder.

QEMU is the oracle everywhere: content is compared with ``qemu-img convert -O raw`` and
allocation with ``qemu-img map --output=json``. Everything that needs QEMU is skipped when
``qemu-img`` is not on PATH.
"""

from __future__ import annotations

import contextlib
import faulthandler
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")
HAVE_QEMU = QEMU_IMG is not None and QEMU_IO is not None

requires_qemu = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-img/qemu-io not installed")

# A suite started in the background of a non-interactive shell (`make test &` in a script)
# inherits SIGINT ignored, and so would every command it starts (an ignored signal stays
# ignored across exec): the tests that interrupt a command with SIGINT would see nothing
# happen. A handler here is reset to the default by exec, so the commands get Python's usual
# Ctrl-C behaviour, as from a terminal.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Per-test watchdog (seconds): a hang dumps every thread's stack and kills the run instead of
# blocking CI forever. Works even while the GIL is released
# inside the native extension, unlike a SIGALRM handler.
TEST_TIMEOUT = 120
# Timeout for one external command (qemu-img, qemu-io, a probe subprocess).
CMD_TIMEOUT = 120

CHUNK = 1 << 20

# Header field layout (byte offset, struct format), all big endian (qcow2 spec / api brief).
HEADER_FIELDS: dict[str, tuple[int, str]] = {
    "magic": (0, ">I"),
    "version": (4, ">I"),
    "backing_file_offset": (8, ">Q"),
    "backing_file_size": (16, ">I"),
    "cluster_bits": (20, ">I"),
    "size": (24, ">Q"),
    "crypt_method": (32, ">I"),
    "l1_size": (36, ">I"),
    "l1_table_offset": (40, ">Q"),
    "refcount_table_offset": (48, ">Q"),
    "refcount_table_clusters": (56, ">I"),
    "nb_snapshots": (60, ">I"),
    "snapshots_offset": (64, ">Q"),
    "incompatible_features": (72, ">Q"),
    "compatible_features": (80, ">Q"),
    "autoclear_features": (88, ">Q"),
    "refcount_order": (96, ">I"),
    "header_length": (100, ">I"),
    "compression_type": (104, ">B"),
}
V2_FIELDS = (
    "magic",
    "version",
    "backing_file_offset",
    "backing_file_size",
    "cluster_bits",
    "size",
    "crypt_method",
    "l1_size",
    "l1_table_offset",
    "refcount_table_offset",
    "refcount_table_clusters",
    "nb_snapshots",
    "snapshots_offset",
)
QCOW_MAGIC = 0x514649FB


# --------------------------------------------------------------------------------------------
# Command helpers


def run(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    cwd: str | os.PathLike[str] | None = None,
    check: bool = True,
    timeout: float = CMD_TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    """Run a command, capture text output, fail loudly (with its output) on a non-zero exit."""
    argv = [os.fspath(c) for c in cmd]
    proc = subprocess.run(
        argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"command failed ({proc.returncode}): {' '.join(argv)}\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


def qemu_img(
    *args: str | os.PathLike[str], cwd: str | os.PathLike[str] | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    if QEMU_IMG is None:
        pytest.skip("qemu-img not installed")
    return run([QEMU_IMG, *args], cwd=cwd, check=check)


def qemu_io(
    path: str | os.PathLike[str], *cmds: str, fmt: str = "qcow2", check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run qemu-io commands (one ``-c`` each) on an image. qemu-io exits 1 when a command fails."""
    if QEMU_IO is None:
        pytest.skip("qemu-io not installed")
    argv: list[str | os.PathLike[str]] = [QEMU_IO, "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    argv.append(path)
    return run(argv, check=check)


def qemu_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    out = qemu_img("info", "-U", "--output=json", path).stdout
    return json.loads(out)


def qemu_map(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """`qemu-img map --output=json`, parsed: a list of {start, length, depth, present, zero, data,
    compressed[, offset]} dicts covering the whole guest disk."""
    out = qemu_img("map", "-U", "--output=json", path).stdout
    return json.loads(out)


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def raw_sha256(path: str | os.PathLike[str], fmt: str = "qcow2") -> str:
    """sha256 of the guest disk as QEMU sees it (`qemu-img convert -O raw` to a temp file)."""
    with tempfile.TemporaryDirectory(prefix="qcowrs-raw-") as d:
        raw = Path(d) / "out.raw"
        qemu_img("convert", "-U", "-f", fmt, "-O", "raw", path, raw)
        return file_sha256(raw)


def raw_bytes(path: str | os.PathLike[str], fmt: str = "qcow2") -> bytes:
    """The whole guest disk as QEMU sees it (only for small images)."""
    with tempfile.TemporaryDirectory(prefix="qcowrs-raw-") as d:
        raw = Path(d) / "out.raw"
        qemu_img("convert", "-U", "-f", fmt, "-O", "raw", path, raw)
        return raw.read_bytes()


def qcowrs_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of the guest disk read through qcowrs (readinto on one reused 1 MiB bytearray)."""
    import qcowrs

    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    total = 0
    with qcowrs.QcowFile.open(path, mode="rb") as f:
        size = f.virtual_size
        while True:
            want = min(CHUNK, size - total)
            if want <= 0:
                break
            n = f.readinto(view[:want] if want < CHUNK else buf)
            assert n is not None, "readinto returned None on a blocking file"
            assert 0 < n <= want, f"readinto returned {n} at {total:#x} (wanted {want})"
            h.update(view[:n])
            total += n
        assert f.readinto(buf) == 0, "readinto at EOF must return 0"
        assert total == size
    return h.hexdigest()


def poke(path: str | os.PathLike[str], offset: int, fmt: str, value: int | bytes) -> None:
    """Patch `value` packed with struct format `fmt` (e.g. ">I") at `offset`, in place."""
    data = struct.pack(fmt, value) if not isinstance(value, bytes) else value
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(data)


def poke_field(path: str | os.PathLike[str], field: str, value: int) -> None:
    off, fmt = HEADER_FIELDS[field]
    poke(path, off, fmt, value)


def peek(path: str | os.PathLike[str], offset: int, fmt: str) -> int:
    with open(path, "rb") as fh:
        fh.seek(offset)
        raw = fh.read(struct.calcsize(fmt))
    return int(struct.unpack(fmt, raw)[0])


def parse_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """An independent, minimal header parser (numeric fields only) used as an oracle.

    v2 headers stop at byte 72: the v3 fields take their implicit values
    (refcount_order 4, header_length 72, everything else 0).
    """
    with open(path, "rb") as fh:
        head = fh.read(112)
    fields = {
        name: struct.unpack_from(fmt, head, off)[0]
        for name, (off, fmt) in HEADER_FIELDS.items()
        if off + struct.calcsize(fmt) <= len(head)
    }
    if fields["version"] == 2:
        fields.update(
            incompatible_features=0,
            compatible_features=0,
            autoclear_features=0,
            refcount_order=4,
            header_length=72,
            compression_type=0,
        )
    elif fields["header_length"] <= 104:
        fields["compression_type"] = 0
    fields["cluster_size"] = 1 << fields["cluster_bits"]
    fields["refcount_bits"] = 1 << fields["refcount_order"]
    return fields


# --------------------------------------------------------------------------------------------
# Allocation maps


def merge(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sort and merge overlapping or adjacent [start, end) intervals."""
    out: list[tuple[int, int]] = []
    for s, e in sorted(intervals):
        if e <= s:
            continue
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def qemu_kind(entry: dict[str, Any]) -> str | None:
    """Kind of a `qemu-img map` entry as qcowrs reports it, or None if not held at depth 0.

    qemu 10 reports, at depth 0 of a qcow2:
      * normal data cluster/subcluster: present, data, !zero, !compressed   -> "data"
      * data cluster whose host range is a hole (preallocation=metadata):
        present, data, zero                                                 -> "data"
      * compressed cluster: present, data, compressed                       -> "compressed"
      * zero cluster, plain or preallocated (ZERO_PLAIN / ZERO_ALLOC, also
        extended-L2 zero subclusters, v3 discards): present, zero, !data    -> "zero"
      * unallocated (also unallocated subclusters of an allocated extended-L2
        cluster, which carry an "offset"): present false at depth 0         -> None
    Anything at depth > 0 comes from a backing file and is not this image's.
    """
    if entry["depth"] != 0 or not entry["present"]:
        return None
    if entry.get("compressed"):
        return "compressed"
    if entry["data"]:
        return "data"
    if entry["zero"]:
        return "zero"
    raise AssertionError(
        f"qemu-img map entry present at depth 0 but neither data nor zero: {entry}"
    )


def qemu_allocation(path: str | os.PathLike[str]) -> dict[str, list[tuple[int, int]]]:
    """Depth-0 allocation per kind from `qemu-img map`, as merged [start, end) interval sets."""
    kinds: dict[str, list[tuple[int, int]]] = {"data": [], "zero": [], "compressed": []}
    for e in qemu_map(path):
        k = qemu_kind(e)
        if k is not None:
            kinds[k].append((e["start"], e["start"] + e["length"]))
    return {k: merge(v) for k, v in kinds.items()}


def ranges_by_kind(ranges: list[tuple[int, int, str]]) -> dict[str, list[tuple[int, int]]]:
    kinds: dict[str, list[tuple[int, int]]] = {"data": [], "zero": [], "compressed": []}
    for off, length, kind in ranges:
        kinds[kind].append((off, off + length))
    return {k: merge(v) for k, v in kinds.items()}


# --------------------------------------------------------------------------------------------
# Probing malformed inputs in a child process (a crash or hang must not take pytest down)

_PROBE_SCRIPT = r"""
import hashlib, json, sys, traceback
path, mode, action = sys.argv[1], sys.argv[2], sys.argv[3]
out = {"stage": "import"}
try:
    import qcowrs
    out["stage"] = "open"
    if action == "header":
        h = qcowrs.QcowHeader.read(path)
        out["version"] = h.version
    else:
        with qcowrs.QcowFile.open(path, mode=mode) as f:
            out["stage"] = "read"
            out["virtual_size"] = f.virtual_size
            size = min(f.virtual_size, 256 << 20)  # bound the work if a huge size is accepted
            if action == "read":
                h = hashlib.sha256()
                buf = bytearray(1 << 20)
                mv = memoryview(buf)
                total = 0
                while total < size:
                    want = min(len(buf), size - total)
                    n = f.readinto(mv[:want])
                    if not n:
                        break
                    h.update(mv[:n])
                    total += n
                out["read_bytes"] = total
                out["sha256"] = h.hexdigest()
                out["stage"] = "ranges"
                out["ranges"] = len(f.allocated_ranges())
    out["ok"] = True
except BaseException as e:
    out["ok"] = False
    out["exc"] = type(e).__name__
    out["mro"] = [c.__module__ + "." + c.__qualname__ for c in type(e).__mro__]
    out["msg"] = str(e)
    out["tb"] = traceback.format_exc()[-3000:]
sys.stdout.write("\n@@PROBE@@" + json.dumps(out))
"""


def probe(
    path: str | os.PathLike[str], mode: str = "rb", action: str = "open", timeout: float = 60
) -> dict[str, Any]:
    """Open (and for action="read" read everything from and map) an image in a child Python.

    action: "open" (open + virtual_size), "read" (also read all + allocated_ranges), or
    "header" (QcowHeader.read only). Returns the child's JSON report: ok, exc, mro, msg, stage.
    Fails the test on a crash (signal / abnormal exit) or a hang (timeout).
    """
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _PROBE_SCRIPT, os.fspath(path), mode, action],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"qcowrs hung (> {timeout}s) on {action} of {path} mode={mode}")
    marker = proc.stdout.rfind("@@PROBE@@")
    if proc.returncode != 0 or marker < 0:
        pytest.fail(
            f"qcowrs crashed (exit {proc.returncode}) on {action} of {path} mode={mode}\n"
            f"stdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-4000:]}"
        )
    result: dict[str, Any] = json.loads(proc.stdout[marker + len("@@PROBE@@") :])
    return result


def exc_is(result: dict[str, Any], *names: str) -> bool:
    """True if the probed exception is (a subclass of) one of the qcowrs classes `names`."""
    mro = [m for m in result.get("mro", []) if m.split(".", 1)[0] == "qcowrs"]
    return any(m.rsplit(".", 1)[1] == n for m in mro for n in names)


# --------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(autouse=True)
def _watchdog() -> Iterator[None]:
    # Armed whether or not pytest-timeout is installed (it does nothing unless configured); a
    # shorter pytest-timeout setting simply fires first.
    faulthandler.dump_traceback_later(TEST_TIMEOUT, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


@contextlib.contextmanager
def held_by_qemu_io(path: str | os.PathLike[str]) -> Iterator[subprocess.Popen[bytes]]:
    """Runs ``qemu-io`` on ``path`` (read-write, as a VM holds its disk) until the block ends.

    Returns once qemu-io holds its locks. Waiting is done by watching ``/proc/locks`` for the
    file's inode, never by probing with another QEMU process: a probe that opens the image
    while qemu-io is starting takes locks of its own and can make qemu-io fail to start.
    """
    ino = os.stat(path).st_ino
    holder = subprocess.Popen(
        ["qemu-io", "-c", "sleep 20000", os.fspath(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while not any(f":{ino} " in line for line in Path("/proc/locks").read_text().splitlines()):
            if holder.poll() is not None:
                err = holder.stderr.read().decode() if holder.stderr else ""
                pytest.fail(f"qemu-io exited before taking its locks: {err}")
            assert time.monotonic() < deadline, "qemu-io never took its locks"
            time.sleep(0.02)
        time.sleep(0.2)  # every lock byte of the open is taken by now
        yield holder
    finally:
        holder.kill()
        holder.communicate()


@pytest.fixture
def fault_hook(qcowrs_mod: Any) -> Iterator[Any]:
    """The native module with its fault-injection hook (`_fail_after_ops`, `_io_ops`), the
    hook off before and after the test."""
    native = qcowrs_mod._qcowrs
    native._fail_after_ops(None)
    try:
        yield native
    finally:
        native._fail_after_ops(None)


@pytest.fixture(scope="session")
def qcowrs_mod() -> Any:
    """The qcowrs package (imported lazily so that collection works before it is built)."""
    return pytest.importorskip("qcowrs")


class ImageBuilder:
    """Makes images with qemu-img/qemu-io inside one directory.

    Names are relative to the directory; qemu-img runs with the directory as its working
    directory, so relative backing file names work as they do for a user.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.root / name

    def create(
        self,
        name: str,
        size: int | str | None = None,
        *,
        fmt: str = "qcow2",
        backing: str | None = None,
        backing_fmt: str | None = None,
        **opts: Any,
    ) -> Path:
        """`qemu-img create -f fmt [-b backing -F backing_fmt] [-o k=v,...] name [size]`.

        Option names use underscores (cluster_size=512, extended_l2="on", ...).
        """
        args: list[str] = ["create", "-q", "-f", fmt]
        if backing is not None:
            args += ["-b", backing, "-F", backing_fmt or "qcow2"]
        if opts:
            args += ["-o", ",".join(f"{k}={v}" for k, v in opts.items())]
        args.append(name)
        if size is not None:
            args.append(str(size))
        qemu_img(*args, cwd=self.root)
        return self.path(name)

    def io(self, name: str, *cmds: str, fmt: str = "qcow2") -> Path:
        p = self.path(name)
        qemu_io(p, *cmds, fmt=fmt)
        return p

    def convert(
        self,
        src: str,
        dst: str,
        *,
        src_fmt: str = "qcow2",
        fmt: str = "qcow2",
        compress: bool = False,
        **opts: Any,
    ) -> Path:
        args = ["convert", "-f", src_fmt, "-O", fmt]
        if compress:
            args.append("-c")
        if opts:
            args += ["-o", ",".join(f"{k}={v}" for k, v in opts.items())]
        args += [src, dst]
        qemu_img(*args, cwd=self.root)
        return self.path(dst)

    def copy(self, src: str | Path, name: str) -> Path:
        dst = self.path(name)
        shutil.copyfile(src, dst)
        return dst


@pytest.fixture(scope="session")
def session_builder(tmp_path_factory: pytest.TempPathFactory) -> ImageBuilder:
    """An ImageBuilder for images shared by several tests (build them once per session)."""
    if not HAVE_QEMU:
        pytest.skip("qemu-img/qemu-io not installed")
    return ImageBuilder(tmp_path_factory.mktemp("images"))


@pytest.fixture
def builder(tmp_path: Path) -> ImageBuilder:
    """An ImageBuilder in the test's own tmp_path (for images a test modifies)."""
    if not HAVE_QEMU:
        pytest.skip("qemu-img/qemu-io not installed")
    return ImageBuilder(tmp_path / "img")


@pytest.fixture(scope="session")
def valid_image(session_builder: ImageBuilder) -> Path:
    """A small valid v3 image (64 KiB clusters, 4 MiB) with 1 MiB of data; do not modify.

    Layout (qemu 10 defaults): header 0x0, reftable 0x10000, refblock 0x20000, L1 0x30000
    (l1_size 1), L2 0x40000, data 0x50000..0x14ffff.
    """
    p = session_builder.create("valid.qcow2", "4M")
    qemu_io(p, "write -P 0xab 0 1M", "write -P 0xcd 3M 4096")
    return p


@pytest.fixture
def valid_copy(valid_image: Path, tmp_path: Path) -> Path:
    """A private copy of `valid_image` that the test may patch."""
    dst = tmp_path / "patched.qcow2"
    shutil.copyfile(valid_image, dst)
    return dst


# --------------------------------------------------------------------------------------------
# Refcount structure helpers (check / repair / rebuild tests). An independent reading of the
# reftable and refblocks straight from the file bytes, used to make corruptions and as an oracle.


def qemu_check(
    path: str | os.PathLike[str], repair: str | None = None
) -> tuple[int, dict[str, Any], str]:
    """`qemu-img check --output=json [-r repair] path` -> (exit code, parsed JSON or {}, stderr).

    The JSON is {} when qemu could not open the image (exit 1, nothing on stdout).
    """
    args: list[str | os.PathLike[str]] = ["check", "--output=json"]
    if repair is not None:
        args += ["-r", repair]
    proc = qemu_img(*args, path, check=False)
    data: dict[str, Any] = json.loads(proc.stdout) if proc.stdout.strip() else {}
    return proc.returncode, data, proc.stderr


def assert_qemu_clean(path: str | os.PathLike[str], what: str = "") -> dict[str, Any]:
    """qemu-img check finds no corruption, no leak and no check error (exit 0)."""
    rc, data, err = qemu_check(path)
    clean = rc == 0 and not data.get("corruptions") and not data.get("leaks")
    assert clean, f"{what}: qemu-img check is not clean (exit {rc}): {data}\n{err[-3000:]}"
    assert data.get("check-errors") == 0, f"{what}: {data}"
    return data


class Refcounts:
    """Reads and patches one image's refcount structure (any refcount width, v2 and v3).

    Sub-byte widths are packed LSB-first in each byte; 8..64-bit entries are big endian.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        h = parse_header(path)
        self.header = h
        self.cluster_bits: int = h["cluster_bits"]
        self.cluster_size: int = h["cluster_size"]
        self.bits: int = h["refcount_bits"]
        self.rb_entries = self.cluster_size * 8 // self.bits
        self.reftable_offset: int = h["refcount_table_offset"]
        self.reftable_clusters: int = h["refcount_table_clusters"]

    @property
    def max_refcount(self) -> int:
        return (1 << self.bits) - 1

    def reftable(self) -> list[int]:
        n = self.reftable_clusters * self.cluster_size // 8
        with open(self.path, "rb") as fh:
            fh.seek(self.reftable_offset)
            raw = fh.read(n * 8)
        raw = raw.ljust(n * 8, b"\0")
        return list(struct.unpack(f">{n}Q", raw))

    def reftable_entry_offset(self, index: int) -> int:
        return self.reftable_offset + 8 * index

    def set_reftable_entry(self, index: int, value: int) -> None:
        poke(self.path, self.reftable_entry_offset(index), ">Q", value)

    def refblock_offset(self, cluster: int) -> int:
        """Host offset of the refblock covering host cluster `cluster` (0: none)."""
        idx = cluster // self.rb_entries
        table = self.reftable()
        if idx >= len(table):
            return 0
        return table[idx] & ~0x1FF

    def _locate(self, cluster: int) -> tuple[int, int]:
        """(byte offset in the file of the entry, bit shift inside it for sub-byte widths)."""
        rb = self.refblock_offset(cluster)
        if rb == 0:
            raise LookupError(f"no refblock covers cluster {cluster}")
        i = cluster % self.rb_entries
        if self.bits >= 8:
            return rb + i * (self.bits // 8), 0
        per_byte = 8 // self.bits
        return rb + i // per_byte, (i % per_byte) * self.bits

    def get(self, cluster: int) -> int:
        try:
            off, shift = self._locate(cluster)
        except LookupError:
            return 0
        width = max(1, self.bits // 8)
        with open(self.path, "rb") as fh:
            fh.seek(off)
            raw = fh.read(width).ljust(width, b"\0")
        v = int.from_bytes(raw, "big")
        if self.bits < 8:
            v = (v >> shift) & ((1 << self.bits) - 1)
        return v

    def set(self, cluster: int, value: int) -> None:
        assert 0 <= value <= self.max_refcount, f"refcount {value} does not fit {self.bits} bits"
        off, shift = self._locate(cluster)
        width = max(1, self.bits // 8)
        if self.bits < 8:
            with open(self.path, "rb") as fh:
                fh.seek(off)
                old = fh.read(1).ljust(1, b"\0")[0]
            mask = ((1 << self.bits) - 1) << shift
            raw = bytes([(old & ~mask) | (value << shift)])
        else:
            raw = value.to_bytes(width, "big")
        poke(self.path, off, "", raw)  # bytes are written as they are

    def all_refcounts(self, upto_cluster: int | None = None) -> dict[int, int]:
        """Non-zero refcounts of host clusters below `upto_cluster` (default: the file end)."""
        if upto_cluster is None:
            upto_cluster = -(-self.path.stat().st_size // self.cluster_size)
        out: dict[int, int] = {}
        per_byte = 8 // self.bits if self.bits < 8 else 0
        with open(self.path, "rb") as fh:
            for idx, entry in enumerate(self.reftable()):
                rb = entry & ~0x1FF
                first = idx * self.rb_entries
                if rb == 0 or first >= upto_cluster:
                    continue
                fh.seek(rb)
                block = fh.read(self.cluster_size).ljust(self.cluster_size, b"\0")
                for i in range(min(self.rb_entries, upto_cluster - first)):
                    if self.bits >= 8:
                        w = self.bits // 8
                        v = int.from_bytes(block[i * w : (i + 1) * w], "big")
                    else:
                        v = (block[i // per_byte] >> ((i % per_byte) * self.bits)) & (
                            (1 << self.bits) - 1
                        )
                    if v:
                        out[first + i] = v
        return out


def data_host_clusters(path: str | os.PathLike[str]) -> list[int]:
    """Host cluster indices of the normal (uncompressed) data clusters, from `qemu-img map`."""
    cs = parse_header(path)["cluster_size"]
    out: set[int] = set()
    for e in qemu_map(path):
        if e["depth"] == 0 and e.get("data") and not e.get("compressed") and "offset" in e:
            for o in range(e["offset"], e["offset"] + e["length"], cs):
                out.add(o // cs)
    return sorted(out)


def set_header_bits(path: str | os.PathLike[str], field: str, bits: int, on: bool = True) -> None:
    """Set or clear bits of a v3 feature field (incompatible_features bit 0 is the dirty bit)."""
    off, fmt = HEADER_FIELDS[field]
    v = peek(path, off, fmt)
    poke(path, off, fmt, (v | bits) if on else (v & ~bits))


def snapshot_names(path: str | os.PathLike[str]) -> list[str]:
    return [s["name"] for s in qemu_info(path).get("snapshots", [])]


def snapshot_sha256(path: str | os.PathLike[str], name: str) -> str:
    """sha256 of an internal snapshot's guest content (`qemu-img convert -l snapshot.name=`)."""
    with tempfile.TemporaryDirectory(prefix="qcowrs-snap-") as d:
        raw = Path(d) / "snap.raw"
        qemu_img("convert", "-U", "-l", f"snapshot.name={name}", "-O", "raw", path, raw)
        return file_sha256(raw)


def content_digest(path: str | os.PathLike[str]) -> dict[str, str]:
    """Guest content of the active layer and of every internal snapshot, as QEMU reads them."""
    out = {"": raw_sha256(path)}
    for name in snapshot_names(path):
        out[name] = snapshot_sha256(path, name)
    return out


def copy_image(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Copies an image keeping holes sparse (cp --sparse=always), so huge sparse files are cheap."""
    run(["cp", "--sparse=always", os.fspath(src), os.fspath(dst)])
    return Path(dst)


# --------------------------------------------------------------------------------------------
# Write-path helpers (test_write.py, test_write_model.py, test_crash.py): a guest-content model
# and QEMU oracles usable while qcowrs still holds the image open.


def pattern_bytes(n: int, seed: int) -> bytes:
    """`n` deterministic, incompressible bytes (distinct for distinct seeds)."""
    import random

    return random.Random(seed).randbytes(n)


class GuestModel:
    """The guest disk as a bytearray, updated the way qcowrs' write API is specified to act."""

    def __init__(self, content: bytes | bytearray, cluster_size: int) -> None:
        self.data = bytearray(content)
        self.cluster_size = cluster_size

    @property
    def size(self) -> int:
        return len(self.data)

    def write(self, offset: int, buf: bytes) -> None:
        assert 0 <= offset <= offset + len(buf) <= self.size, (offset, len(buf), self.size)
        self.data[offset : offset + len(buf)] = buf

    def write_zeroes(self, offset: int, length: int) -> None:
        assert 0 <= offset <= offset + length <= self.size, (offset, length, self.size)
        self.data[offset : offset + length] = bytes(length)

    def discard(self, offset: int, length: int) -> None:
        """v3 semantics: the whole clusters inside the range read as zeros, partial clusters
        keep their content. A range reaching the end of the disk covers its last (partial)
        cluster too only if that cluster starts inside the range; the model does not guess
        there and callers keep virtual sizes cluster aligned."""
        cs = self.cluster_size
        start = -(-offset // cs) * cs
        end = (offset + length) // cs * cs
        if end > start:
            self.data[start:end] = bytes(end - start)

    def truncate(self, new_size: int) -> None:
        assert new_size >= self.size
        self.data += bytes(new_size - self.size)

    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def qemu_check_shared(path: str | os.PathLike[str]) -> tuple[int, dict[str, Any], str]:
    """`qemu-img check -U --output=json`: usable while another process holds the image open."""
    proc = qemu_img("check", "-U", "--output=json", path, check=False)
    data: dict[str, Any] = json.loads(proc.stdout) if proc.stdout.strip() else {}
    return proc.returncode, data, proc.stderr


def assert_qemu_check(
    path: str | os.PathLike[str], what: str = "", *, allow_leaks: bool = False, shared: bool = False
) -> dict[str, Any]:
    """qemu-img check finds no corruption and no check error (and no leak unless allowed)."""
    rc, data, err = qemu_check_shared(path) if shared else qemu_check(path)
    ok = (0, 3) if allow_leaks else (0,)
    good = (
        rc in ok
        and not data.get("corruptions")
        and data.get("check-errors") == 0
        and (allow_leaks or not data.get("leaks"))
    )
    assert good, f"{what}: qemu-img check (exit {rc}): {data}\n{err[-3000:]}"
    return data


def qcowrs_read_all(path: str | os.PathLike[str]) -> bytes:
    """The whole guest disk read through qcowrs (small images only)."""
    import qcowrs

    with qcowrs.QcowFile.open(path, mode="rb") as f:
        f.seek(0)
        data = f.read(f.virtual_size)
        assert len(data) == f.virtual_size
        return bytes(data)


def first_difference(a: bytes | bytearray, b: bytes | bytearray) -> str:
    """A short description of where two byte strings differ (for assertion messages)."""
    if len(a) != len(b):
        return f"lengths differ: {len(a)} != {len(b)}"
    step = 4096
    for off in range(0, len(a), step):
        if a[off : off + step] != b[off : off + step]:
            for i in range(off, min(off + step, len(a))):
                if a[i] != b[i]:
                    j = i
                    while j < len(a) and a[j] != b[j]:
                        j += 1
                    return (
                        f"first difference at {i:#x} (run of {j - i} bytes): "
                        f"{a[i]:#04x} != {b[i]:#04x}"
                    )
    return "equal"
