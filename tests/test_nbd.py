"""``qcowrs serve``: the NBD server, with QEMU (qemu-img, qemu-io over nbd+unix://) and, when
installed, libnbd's ``nbdinfo`` as the clients, and a few raw protocol exchanges."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    assert_qemu_clean,
    file_sha256,
    merge,
    qemu_check,
    qemu_img,
    qemu_io,
    raw_sha256,
    requires_qemu,
    run,
)

pytestmark = requires_qemu

M = 1 << 20


def _url(sock: Path) -> str:
    return f"nbd+unix:///?socket={sock}"


@contextlib.contextmanager
def served(image: Path, *args: str) -> Iterator[Path]:
    """``python -m qcowrs serve ARGS --socket SOCK IMAGE`` until the block ends (then SIGTERM,
    and the server must exit 0)."""
    d = Path(tempfile.mkdtemp(prefix="nbd-", dir=os.environ.get("TMPDIR", "/var/tmp")))
    sock = d / "s"
    proc = subprocess.Popen(
        [sys.executable, "-m", "qcowrs", "serve", *args, "--socket", str(sock), str(image)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            if proc.poll() is not None:
                _, err = proc.communicate()
                pytest.fail(f"server exited ({proc.returncode}): {err.decode()}")
            assert time.monotonic() < deadline, "the server never listened"
            time.sleep(0.02)
        yield sock
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        shutil.rmtree(d, ignore_errors=True)
    assert proc.returncode == 0, err.decode()
    assert not sock.exists()


def _data_zero(entries: list[dict[str, Any]]) -> tuple[list[tuple[int, int]], ...]:
    data = merge([(e["start"], e["start"] + e["length"]) for e in entries if e["data"]])
    zero = merge([(e["start"], e["start"] + e["length"]) for e in entries if e["zero"]])
    return data, zero


# --------------------------------------------------------------------------------------------
# Images


def _compressed(d: Path) -> Path:
    src = d / "src.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", src, "8M")
    qemu_io(src, "write -P 0x11 0 1M", "write -P 0x22 3M 512k", "write -z 5M 1M")
    img = d / "compressed.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", src, img)
    qemu_io(img, "write -P 0x33 6M 64k", "write -z 64k 64k")
    return img


def _chain(d: Path) -> Path:
    base = d / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "8M")
    qemu_io(base, "write -P 0x44 0 4M")
    top = d / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top, cwd=d)
    qemu_io(top, "write -P 0x55 1M 128k", "write -z 2M 512k", "write -P 0x66 6M 4k")
    return top


def _extended(d: Path) -> Path:
    img = d / "ext.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=64k", img, "8M")
    qemu_io(
        img, "write -P 0x77 4k 4k", "write -P 0x78 70k 8k", "write -z 1M 64k", "write -P 1 3M 1M"
    )
    return img


IMAGES = {"compressed": _compressed, "chain": _chain, "extended_l2": _extended}


@pytest.mark.parametrize("kind", sorted(IMAGES))
def test_read_and_map_match_the_image(kind: str, tmp_path: Path) -> None:
    img = IMAGES[kind](tmp_path)
    want_sha = raw_sha256(img)
    want_map = json.loads(qemu_img("map", "--output=json", img).stdout)
    with served(img) as sock:
        out = tmp_path / "out.raw"
        qemu_img("convert", "-f", "raw", "-O", "raw", _url(sock), out)
        assert file_sha256(out) == want_sha
        opts = f"driver=nbd,server.type=unix,server.path={sock}"
        got_map = json.loads(qemu_img("map", "--output=json", "--image-opts", opts).stdout)
        if shutil.which("nbdinfo"):
            text = run(["nbdinfo", "--map", _url(sock)]).stdout
            nbd_entries = []
            for line in text.splitlines():
                start, length, state = (int(x) for x in line.split()[:3])
                nbd_entries.append(
                    {
                        "start": start,
                        "length": length,
                        "data": not state & 1,
                        "zero": bool(state & 2),
                    }
                )
            assert _data_zero(nbd_entries) == _data_zero(want_map)
    assert _data_zero(got_map) == _data_zero(want_map)
    assert raw_sha256(img) == want_sha  # a read-only server changed nothing


def test_writes_land_in_the_image(tmp_path: Path) -> None:
    img = _chain(tmp_path)
    ref = tmp_path / "ref.qcow2"
    shutil.copy(img, ref)
    cmds = ["write -P 0xab 1M 64k", "write -z 3M 1M", "discard 6M 64k", "write -P 0xcd 7M 100k"]
    qemu_io(ref, *cmds)
    with served(img, "--rw") as sock:
        qemu_io(_url(sock), *cmds, fmt="raw")
        # The image is locked for its writer.
        r = qemu_io(img, "write 0 512", check=False)
        assert r.returncode != 0
        assert "lock" in (r.stdout + r.stderr)
    qemu_img("compare", "-f", "qcow2", "-F", "qcow2", ref, img)
    assert_qemu_clean(img, "after serving writes")
    qemu_io(img, "write 0 512")  # the locks are gone with the server


def test_four_clients_write_at_once(tmp_path: Path) -> None:
    img = tmp_path / "four.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "64M")
    with served(img, "--rw", "--shared", "4") as sock:
        procs = [
            subprocess.Popen(
                ["qemu-io", "-f", "raw"]
                + [a for k in range(8) for a in ("-c", f"write -P {i + 1} {i * 16 + k * 2}M 2M")]
                + [_url(sock)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for i in range(4)
        ]
        for p in procs:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, err.decode()
            assert b"error" not in out.lower()
    for i in range(4):
        r = qemu_io(img, f"read -P {i + 1} {i * 16}M 16M")
        assert "verification failed" not in r.stdout
    assert_qemu_clean(img, "four writers")


def test_read_only_server_refuses_writes(tmp_path: Path) -> None:
    img = _compressed(tmp_path)
    before = raw_sha256(img)
    with served(img) as sock:
        r = qemu_io(_url(sock), "write 0 4k", fmt="raw", check=False)
        assert r.returncode != 0 or "error" in r.stdout.lower()
        with _Client(sock) as c:
            assert c.flags & 2  # NBD_FLAG_READ_ONLY
            assert c.request(1, 0, b"x" * 512) == 1  # NBD_CMD_WRITE: EPERM
            assert c.request(3, 0) == 0  # NBD_CMD_FLUSH is fine
    assert raw_sha256(img) == before


# --------------------------------------------------------------------------------------------
# Raw protocol


class _Client:
    """A minimal NBD client: fixed newstyle, NBD_OPT_GO on the default export, simple replies."""

    def __init__(self, sock: Path) -> None:
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(20)
        self.s.connect(str(sock))
        magic, opt, hflags = struct.unpack(">QQH", self._recv(18))
        assert (magic, opt) == (0x4E42444D41474943, 0x49484156454F5054)
        assert hflags == 3
        self.s.sendall(struct.pack(">I", 3))
        self.option(99, b"")  # unknown option
        kind, _ = self._option_reply(99)
        assert kind == (1 << 31) | 1  # NBD_REP_ERR_UNSUP
        self.option(7, struct.pack(">IH", 0, 0))  # NBD_OPT_GO, default export, no info requests
        self.size = self.flags = -1
        while True:
            kind, data = self._option_reply(7)
            if kind == 1:
                break
            assert kind == 3, hex(kind)
            if struct.unpack(">H", data[:2])[0] == 0:
                self.size, self.flags = struct.unpack(">QH", data[2:])
        self.cookie = 0

    def _recv(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.s.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        return buf

    def option(self, opt: int, data: bytes) -> None:
        self.s.sendall(struct.pack(">QII", 0x49484156454F5054, opt, len(data)) + data)

    def _option_reply(self, opt: int) -> tuple[int, bytes]:
        magic, o, kind, n = struct.unpack(">QIII", self._recv(20))
        assert (magic, o) == (0x3E889045565A9, opt)
        return kind, self._recv(n)

    def send(self, cmd: int, offset: int, data: bytes = b"", length: int | None = None) -> int:
        self.cookie += 1
        n = len(data) if length is None else length
        self.s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, cmd, self.cookie, offset, n) + data)
        return self.cookie

    def request(self, cmd: int, offset: int, data: bytes = b"") -> int:
        cookie = self.send(cmd, offset, data)
        magic, err, got = struct.unpack(">IIQ", self._recv(16))
        assert (magic, got) == (0x67446698, cookie)
        return int(err)

    def __enter__(self) -> _Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.s.close()


def test_client_dropped_mid_write_keeps_flushed_writes(tmp_path: Path) -> None:
    img = tmp_path / "drop.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "16M")
    with served(img, "--rw") as sock:
        with _Client(sock) as c:
            assert c.request(1, 0, b"\x5a" * M) == 0
            assert c.request(3, 0) == 0  # flushed
            # A 4 MiB write of which only half arrives: the client dies mid-write.
            c.send(1, 4 * M, b"\xa5" * (2 * M), length=4 * M)
        with _Client(sock) as c:  # the server goes on serving
            assert c.request(1, 8 * M, b"\x11" * 4096) == 0
            # A malformed request ends that connection only.
            c.s.sendall(b"\0" * 28)
            assert c.s.recv(16) == b""
        qemu_io(_url(sock), "read -P 0x5a 0 1M", "read -P 0 4M 4M", fmt="raw")
    rc, _, err = qemu_check(img)
    assert rc in (0, 3), err
    r = qemu_io(img, "read -P 0x5a 0 1M", "read -P 0 4M 4M", "read -P 0x11 8M 4k")
    assert "verification failed" not in r.stdout


def _simple_reply(c: _Client, lengths: dict[int, int]) -> tuple[int, int, bytes]:
    """One simple reply: (cookie, error, data), the data as long as that cookie's read."""
    magic, err, cookie = struct.unpack(">IIQ", c._recv(16))
    assert magic == 0x67446698
    return cookie, err, c._recv(lengths.get(cookie, 0)) if err == 0 else b""


def test_pipelined_requests(tmp_path: Path) -> None:
    """Requests sent without waiting (as nbdcopy and qemu do): every read answered with its own
    data (answers may come in any order), a write applied after the reads sent before it and
    before those sent after it, and the reads in flight at a disconnect still answered."""
    img = tmp_path / "pipe.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "16M")
    qemu_io(img, *(f"write -P {k + 1} {k}M 1M" for k in range(16)))
    with served(img, "--rw") as sock, _Client(sock) as c:
        lengths = {c.send(0, k * M, length=M): k for k in range(16)}
        got = {}
        for _ in range(16):
            cookie, err, data = _simple_reply(c, dict.fromkeys(lengths, M))
            assert err == 0
            got[cookie] = data
        assert sorted(got) == sorted(lengths)
        for cookie, k in lengths.items():
            assert got[cookie] == bytes([k + 1]) * M, k
        # read, write, read of the same range, all in flight at once
        before = c.send(0, 3 * M, length=4096)
        wrote = c.send(1, 3 * M, b"\xee" * 4096)
        after = c.send(0, 3 * M, length=4096)
        replies = {}
        for _ in range(3):
            cookie, err, data = _simple_reply(c, {before: 4096, after: 4096})
            assert err == 0
            replies[cookie] = data
        assert replies[before] == b"\x04" * 4096
        assert replies[wrote] == b""
        assert replies[after] == b"\xee" * 4096
        # reads then a disconnect: every read is answered before the server closes
        tail = {c.send(0, k * M, length=M): k for k in range(8, 12)}
        c.send(2, 0)  # NBD_CMD_DISC
        for _ in range(4):
            cookie, err, data = _simple_reply(c, dict.fromkeys(tail, M))
            assert err == 0
            assert data == bytes([tail[cookie] + 1]) * M
        assert c.s.recv(1) == b""
    r = qemu_io(img, "read -P 0xee 3M 4k", "read -P 4 3149824 1044480")
    assert "verification failed" not in r.stdout
    rc, _, err = qemu_check(img)
    assert rc == 0, err


def test_second_server_on_the_same_image_is_refused(tmp_path: Path) -> None:
    img = tmp_path / "lock.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "1M")
    with served(img, "--rw"):
        d = tempfile.mkdtemp(dir=os.environ.get("TMPDIR", "/var/tmp"))
        r = subprocess.run(
            [sys.executable, "-m", "qcowrs", "serve", "--socket", f"{d}/s", str(img)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        shutil.rmtree(d, ignore_errors=True)
        assert r.returncode != 0
        assert "in use" in r.stderr or "lock" in r.stderr
