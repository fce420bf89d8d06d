"""The command line side by side with qemu-img (issue 9): the same images through `qcowrs` and
`qemu-img`, run as a user runs them (subprocesses), compared key by key and line by line.

Intended differences (each asserted where it shows):
* `check --output=json` may add a `dropped` list after a repair (qemu-img has no such key).
* `check` prints qcowrs's own wording for findings QEMU has no line for (cross-links, ...).
* `info` on an image whose snapshot table cannot be read still describes it (qemu-img fails).
"""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Refcounts, held_by_qemu_io, poke_field, qemu_img, qemu_io, requires_qemu
from hostile import GENERATORS

pytestmark = requires_qemu

MiB = 1 << 20


def qcowrs(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "qcowrs", *(str(a) for a in args)]
    p = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=120, check=False)
    assert "Traceback" not in p.stderr, p.stderr
    return p


def qemu(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    argv = ["qemu-img", *(str(a) for a in args)]
    return subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=120, check=False)


# --------------------------------------------------------------------------------------------
# Images


@pytest.fixture(scope="module")
def imgs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cliq")
    out: dict[str, Path] = {}

    def create(name: str, size: str, *opts: str) -> Path:
        qemu_img("create", "-q", "-f", "qcow2", *opts, str(d / name), size)
        return d / name

    p = create("plain.qcow2", "64M")
    qemu_io(p, "write -P 0x11 0 1M", "write -z 2M 64k", "write -P 0x12 10M 4k")
    out["plain"] = p
    raw = d / "data.raw"
    raw.write_bytes(bytes(range(256)) * (4 * MiB // 256))
    qemu_img("convert", "-q", "-c", "-f", "raw", "-O", "qcow2", str(raw), str(d / "comp.qcow2"))
    out["compressed"] = d / "comp.qcow2"
    base = create("base.qcow2", "32M")
    qemu_io(base, "write -P 0x21 0 4M")
    mid = create("mid.qcow2", "32M", "-b", "base.qcow2", "-F", "qcow2")
    qemu_io(mid, "write -P 0x22 1M 1M")
    top = create("top.qcow2", "32M", "-b", "mid.qcow2", "-F", "qcow2")
    qemu_io(top, "write -P 0x23 1536k 64k", "write -z 3M 128k")
    out["chain"] = top
    s = create("snaps.qcow2", "16M")
    qemu_io(s, "write -P 0x31 0 1M")
    qemu_img("snapshot", "-c", "first", str(s))
    qemu_io(s, "write -P 0x32 0 64k")
    qemu_img("snapshot", "-c", "second snapshot", str(s))
    out["snapshots"] = s
    e = create("extl2.qcow2", "16M", "-o", "extended_l2=on,compression_type=zstd")
    qemu_io(e, "write -P 0x41 3000 5000", "write -z 1M 8k")
    out["extl2"] = e
    # An absolute name: QEMU resolves a relative data file name against the working directory.
    df = create("dfile.qcow2", "16M", "-o", f"data_file={d / 'dfile.raw'},data_file_raw=on")
    qemu_io(df, "write -P 0x51 0 1M")
    out["datafile"] = df
    out["c512"] = create("c512.qcow2", "8M", "-o", "cluster_size=512,refcount_bits=1")
    qemu_io(out["c512"], "write -P 0x61 1000 100k")
    out["c2m"] = create("c2m.qcow2", "64M", "-o", "cluster_size=2M,refcount_bits=64")
    qemu_io(out["c2m"], "write -P 0x62 3M 10k")
    v2 = create("v2.qcow2", "16M", "-o", "compat=0.10")
    qemu_io(v2, "write -P 0x71 0 64k")
    out["v2"] = v2
    b = create("bitmaps.qcow2", "16M")
    qemu_img("bitmap", "--add", str(b), "bm0")
    qemu_img("bitmap", "--add", "-g", "128k", "--disable", str(b), "bm1")
    qemu_io(b, "write -P 0x81 0 256k")
    out["bitmaps"] = b
    dirty = create("dirty.qcow2", "16M", "-o", "lazy_refcounts=on")
    qemu_io(dirty, "write -P 0x91 0 64k")
    poke_field(dirty, "incompatible_features", 1)
    out["dirty"] = dirty
    leak = create("leak.qcow2", "16M")
    qemu_io(leak, "write -P 0xa1 0 256k")
    rc = Refcounts(leak)
    last = leak.stat().st_size // 65536 - 1
    rc.set(last, 2)  # a leak: one reference counted twice
    rc.set(2, 0)  # a corruption: the first refblock loses its own count
    out["leak"] = leak
    rawimg = d / "disk.raw"
    rawimg.write_bytes(b"\x01" * 1000)
    out["raw"] = rawimg
    for name in ("l1_past_eof", "file_cut_after_header"):
        sub = d / name
        sub.mkdir()
        out[name] = GENERATORS[name](sub).image
    return out


INFO_KINDS = [
    "plain",
    "compressed",
    "chain",
    "snapshots",
    "extl2",
    "datafile",
    "c512",
    "c2m",
    "v2",
    "bitmaps",
    "dirty",
    "raw",
    "l1_past_eof",
]


# --------------------------------------------------------------------------------------------
# info


@pytest.mark.parametrize("kind", INFO_KINDS)
def test_info_json_equals_qemu(imgs: dict[str, Path], kind: str) -> None:
    img = imgs[kind]
    q = qemu("info", "--output=json", img.name, cwd=img.parent)
    ours = qcowrs("info", "--output=json", img.name, cwd=img.parent)
    assert ours.returncode == q.returncode == 0, (q.stderr, ours.stderr)
    assert json.loads(ours.stdout) == json.loads(q.stdout)


@pytest.mark.parametrize("kind", INFO_KINDS)
def test_info_human_equals_qemu(imgs: dict[str, Path], kind: str) -> None:
    img = imgs[kind]
    q = qemu("info", img.name, cwd=img.parent)
    ours = qcowrs("info", img.name, cwd=img.parent)
    assert ours.returncode == q.returncode == 0
    assert ours.stdout.splitlines() == q.stdout.splitlines()


def test_info_backing_chain(imgs: dict[str, Path]) -> None:
    img = imgs["chain"]
    for args in (["--output=json"], []):
        q = qemu("info", "--backing-chain", *args, img.name, cwd=img.parent)
        ours = qcowrs("info", "--backing-chain", *args, img.name, cwd=img.parent)
        assert ours.returncode == q.returncode == 0
        if args:
            chain = json.loads(ours.stdout)
            assert [c["filename"] for c in chain] == ["top.qcow2", "mid.qcow2", "base.qcow2"]
            assert chain == json.loads(q.stdout)
        else:
            assert ours.stdout.splitlines() == q.stdout.splitlines()


def test_info_python_api_equals_cli(imgs: dict[str, Path], qcowrs_mod: Any) -> None:
    img = imgs["snapshots"]
    d = qcowrs_mod.info(img)
    assert d["format"] == "qcow2"
    assert [s["name"] for s in d["snapshots"]] == ["first", "second snapshot"]
    with qcowrs_mod.QcowFile.open(img) as f:
        snaps = f.snapshots()
    assert [s.name for s in snaps] == ["first", "second snapshot"]
    assert [s.id for s in snaps] == ["1", "2"]
    assert snaps[0].virtual_size == 16 * MiB
    assert snaps[0].date.tzinfo is not None
    chain = qcowrs_mod.info(imgs["chain"], backing_chain=True)
    assert isinstance(chain, list)
    assert len(chain) == 3


def test_info_force_share(imgs: dict[str, Path], tmp_path: Path) -> None:
    img = tmp_path / "held.qcow2"
    shutil.copyfile(imgs["plain"], img)
    with held_by_qemu_io(img):
        assert qemu("info", img).returncode == 1
        ours = qcowrs("info", img)
        assert ours.returncode == 1
        assert "in use" in ours.stderr
        assert len(ours.stderr.splitlines()) == 1
        assert qemu("info", "-U", img).returncode == 0
        shared = qcowrs("info", "-U", "--output=json", img)
        assert shared.returncode == 0, shared.stderr
        assert json.loads(shared.stdout)["virtual-size"] == 64 * MiB
        chk = qcowrs("check", "-U", img)
        assert chk.returncode == 0, chk.stderr
        assert qcowrs("check", "-U", "-r", "all", img).returncode == 1


# --------------------------------------------------------------------------------------------
# map

MAP_KINDS = ["plain", "compressed", "chain", "snapshots", "extl2", "datafile", "c512", "c2m", "v2"]
MAP_KINDS += ["raw"]


@pytest.mark.parametrize("kind", MAP_KINDS)
@pytest.mark.parametrize("window", [[], ["--start-offset=1M", "--max-length=2M"]])
def test_map_equals_qemu(imgs: dict[str, Path], kind: str, window: list[str]) -> None:
    img = imgs[kind]
    q = qemu("map", "--output=json", *window, img.name, cwd=img.parent)
    ours = qcowrs("map", "--output=json", *window, img.name, cwd=img.parent)
    assert ours.returncode == q.returncode == 0, (q.stderr, ours.stderr)
    assert json.loads(ours.stdout) == json.loads(q.stdout)
    qh = qemu("map", *window, img.name, cwd=img.parent)
    oh = qcowrs("map", *window, img.name, cwd=img.parent)
    assert oh.returncode == qh.returncode
    assert oh.stdout.splitlines() == qh.stdout.splitlines()
    if qh.returncode:
        assert oh.stderr.strip() == qh.stderr.strip().replace("qemu-img:", "qcowrs:")


# --------------------------------------------------------------------------------------------
# check


CHECK_KINDS = [
    "plain",
    "compressed",
    "chain",
    "snapshots",
    "extl2",
    "c512",
    "v2",
    "bitmaps",
    "l1_past_eof",
    "file_cut_after_header",
    "leak",
]


@pytest.mark.parametrize("kind", CHECK_KINDS)
def test_check_equals_qemu(imgs: dict[str, Path], kind: str) -> None:
    img = imgs[kind]
    q = qemu("check", "--output=json", img)
    ours = qcowrs("check", "--output=json", img)
    assert ours.returncode == q.returncode
    qj, oj = json.loads(q.stdout), json.loads(ours.stdout)
    assert {k: v for k, v in oj.items() if k != "dropped"} == qj
    qh = qemu("check", img)
    oh = qcowrs("check", img)
    assert oh.returncode == qh.returncode
    assert oh.stdout.splitlines() == qh.stdout.splitlines()
    # QEMU's problem lines, where both have one, are the same lines.
    assert set(qh.stderr.splitlines()) <= set(oh.stderr.splitlines()), (qh.stderr, oh.stderr)


def test_check_raw_is_63(imgs: dict[str, Path]) -> None:
    q = qemu("check", imgs["raw"])
    ours = qcowrs("check", imgs["raw"])
    assert ours.returncode == q.returncode == 63
    assert ours.stderr.strip() == q.stderr.strip().replace("qemu-img:", "qcowrs:")


def test_check_repair_human_equals_qemu(imgs: dict[str, Path], tmp_path: Path) -> None:
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    shutil.copyfile(imgs["dirty"], a)
    shutil.copyfile(imgs["dirty"], b)
    q = qemu("check", "-r", "all", a)
    ours = qcowrs("check", "-r", "all", b)
    assert ours.returncode == q.returncode == 0
    assert ours.stdout.splitlines() == q.stdout.splitlines()


# --------------------------------------------------------------------------------------------
# create


CREATE_CASES = [
    ("qcow2", [], "1G"),
    ("qcow2", ["-o", "cluster_size=4k,refcount_bits=8"], "100M"),
    ("qcow2", ["-o", "compat=0.10"], "1G"),
    ("qcow2", ["-o", "lazy_refcounts=on,extended_l2=on,compression_type=zstd"], "10G"),
    ("qcow2", ["-o", "preallocation=metadata,cluster_size=2M"], "64M"),
    ("qcow2", ["-o", "preallocation=falloc"], "8M"),
    ("qcow2", ["-o", "preallocation=full,cluster_size=512"], "1M"),
    ("qcow2", ["-o", "data_file=NEW.data,data_file_raw=on"], "16M"),
    ("qcow2", ["-b", "base.qcow2", "-F", "qcow2"], None),
    ("qcow2", ["-b", "base.qcow2", "-F", "qcow2"], "1G"),
    ("qcow2", ["-u", "-b", "missing.qcow2", "-F", "qcow2"], "1M"),
    ("qcow2", [], "1000"),
    ("qcow2", [], "1.5M"),
    ("raw", [], "1M"),
    ("raw", ["-o", "preallocation=falloc"], "1M"),
    ("raw", ["-o", "preallocation=full"], "100k"),
]


@pytest.mark.parametrize("case", range(len(CREATE_CASES)))
def test_create_equals_qemu(imgs: dict[str, Path], tmp_path: Path, case: int) -> None:
    fmt, opts, size = CREATE_CASES[case]
    results = {}
    for who in ("q", "o"):
        d = tmp_path / who
        d.mkdir()
        shutil.copyfile(imgs["chain"].parent / "base.qcow2", d / "base.qcow2")
        args = [a.replace("NEW", who) for a in opts]
        tail = [size] if size else []
        run = qemu if who == "q" else qcowrs
        p = run("create", "-f", fmt, *args, "NEW.img", *tail, cwd=d)
        assert p.returncode == 0, p.stderr
        info = json.loads(qemu("info", "--output=json", "-U", "NEW.img", cwd=d).stdout)
        if "data" in info.get("format-specific", {}):
            info["format-specific"]["data"].pop("data-file", None)
        results[who] = (p.stdout.replace(f"data_file={who}.data", "data_file=X"), info)
        # An unsafe create's backing file may be missing: checked without it, as QEMU can.
        target = "NEW.img"
        if "-u" in opts:
            target = 'json:{"driver":"qcow2","backing":null,"file":{"filename":"NEW.img"}}'
        chk = qemu("check", target, cwd=d) if fmt == "qcow2" else None
        assert chk is None or chk.returncode == 0, chk.stdout if chk else ""
    assert results["o"][0].splitlines() == results["q"][0].splitlines()
    assert results["o"][1] == results["q"][1]


def test_create_overwrites_like_qemu(tmp_path: Path) -> None:
    img = tmp_path / "x.qcow2"
    img.write_bytes(b"old content" * 1000)
    p = qcowrs("create", "-q", "-f", "qcow2", img, "1M")
    assert p.returncode == 0, p.stderr
    assert p.stdout == ""
    assert json.loads(qemu("info", "--output=json", img).stdout)["virtual-size"] == MiB


BAD = [
    ["create", "-f", "qcow2", "NEW", "1e3"],
    ["create", "-f", "qcow2", "NEW", "inf"],
    ["create", "-f", "qcow2", "NEW", "99999999999999999999"],
    ["create", "-f", "qcow2", "NEW", "1MiB"],
    ["create", "-f", "qcow2", "-o", "cluster_size=bad", "NEW", "1M"],
    ["create", "-f", "qcow2", "-o", "cluster_size=1000", "NEW", "1M"],
    ["create", "-f", "qcow2", "-o", "refcount_bits=abc", "NEW", "1M"],
    ["create", "-f", "qcow2", "-o", "refcount_bits=3", "NEW", "1M"],
    ["create", "-f", "qcow2", "-o", "lazy_refcounts=maybe", "NEW", "1M"],
    ["create", "-f", "qcow2", "-o", "compat=bad", "NEW", "1M"],
    ["create", "-f", "qcow2", "-o", "preallocation=bad", "NEW", "1M"],
    ["create", "-f", "qcow2", "-o", "compression_type=bad", "NEW", "1M"],
    ["create", "-f", "qcow2", "-o", "foo=bar", "NEW", "1M"],
    ["create", "-f", "qcow2", "-o", "data_file_raw=on", "NEW", "1M"],
    ["create", "-f", "qcow2", "-o", "compat=0.10,lazy_refcounts=on", "NEW", "1M"],
    ["create", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=4k", "NEW", "1M"],
    ["create", "-f", "qcow2", "-o", "size=1M", "NEW", "1M"],
    ["create", "-f", "qcow2", "-b", "base.qcow2", "NEW"],
    ["create", "-f", "qcow2", "-b", "nonexistent.qcow2", "-F", "qcow2", "NEW"],
    ["create", "-f", "qcow2", "-b", "base.qcow2", "-F", "vmdk", "NEW"],
    ["create", "-f", "qcow2", "NEW"],
    ["create", "-f", "vmdk", "NEW", "1M"],
    ["create", "-f", "raw", "-o", "preallocation=metadata", "NEW", "1M"],
    ["create", "-f", "qcow2", "missing-dir/NEW", "1M"],
    ["info", "missing.qcow2"],
    ["info", "-f", "vmdk", "base.qcow2"],
    ["check", "-r", "some", "base.qcow2"],
    ["convert", "-O", "qcow2", "base.qcow2", "."],
    ["convert", "-O", "raw", "base.qcow2", "missing-dir/out.raw"],
    ["convert", "-O", "vdi", "base.qcow2", "NEW"],
    ["map", "missing.qcow2"],
    ["compare", "missing.qcow2", "base.qcow2"],
    ["compare", "-f", "vmdk", "base.qcow2", "base.qcow2"],
    ["compare", "base.qcow2"],
    ["measure"],
    ["measure", "--size", "1G", "base.qcow2"],
    ["measure", "-O", "qcow2", "-o", "cluster_size=1000", "base.qcow2"],
    ["measure", "-O", "qcow2", "-o", "foo=1", "--size", "1G"],
    ["nosuchcommand"],
    ["info"],
]


@pytest.mark.parametrize("argv", BAD, ids=[" ".join(a) for a in BAD])
def test_bad_input_is_one_line_and_leaves_nothing(
    imgs: dict[str, Path], tmp_path: Path, argv: list[str]
) -> None:
    shutil.copyfile(imgs["chain"].parent / "base.qcow2", tmp_path / "base.qcow2")
    before = sorted(os.listdir(tmp_path))
    p = qcowrs(*argv, cwd=tmp_path)
    assert p.returncode != 0
    lines = p.stderr.splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("qcowrs: ")
    assert sorted(os.listdir(tmp_path)) == before, "a failed command left a file behind"


def _help_entries(text: str) -> dict[str, str]:
    """argparse help: {option or argument: its description} for every entry of the
    "positional arguments" and "options" sections."""
    entries: dict[str, str] = {}
    section = False
    current = None
    for ln in text.splitlines():
        if ln.endswith(":") and not ln.startswith(" "):
            section = ln in ("positional arguments:", "options:")
            continue
        if not section or not ln.strip():
            continue
        if ln.startswith("  ") and not ln.startswith("   "):
            name, _, desc = ln.strip().partition("  ")
            current = name
            entries[name] = desc.strip()
        elif current is not None:
            entries[current] = (entries[current] + " " + ln.strip()).strip()
    return entries


def test_help_explains_every_option() -> None:
    for sub in ("info", "check", "map", "create", "convert", "compare", "measure", "rebuild"):
        p = qcowrs(sub, "--help")
        assert p.returncode == 0
        entries = _help_entries(p.stdout)
        assert len(entries) >= 3, p.stdout
        for name, desc in entries.items():
            assert desc, f"qcowrs {sub} --help: no text for {name}"
    v = qcowrs("--version")
    assert v.returncode == 0
    assert v.stdout.startswith("qcowrs version ")


# --------------------------------------------------------------------------------------------
# Progress and Ctrl-C


def _big_image(tmp_path: Path) -> Path:
    img = tmp_path / "big.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "1G")
    qemu_io(img, "write -P 0x5a 0 512M")
    return img


def test_progress_bar_only_on_a_terminal(tmp_path: Path) -> None:
    img = tmp_path / "p.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "64M")
    qemu_io(img, "write -P 0x5a 0 32M")
    # Not a terminal: nothing but the result.
    p = qcowrs("convert", "-p", "-O", "raw", img, tmp_path / "a.raw")
    assert p.returncode == 0
    assert p.stderr == ""
    # A terminal: a progress bar (tqdm's percentage) on it.
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover (child)
        os.execv(
            sys.executable,
            [
                sys.executable,
                "-m",
                "qcowrs",
                "convert",
                "-p",
                "-O",
                "raw",
                str(img),
                str(tmp_path / "b.raw"),
            ],
        )
    out = b""
    while True:
        r, _, _ = select.select([fd], [], [], 60)
        if not r:
            break
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, out
    assert b"100%" in out, out
    assert b"Traceback" not in out


def test_ctrl_c_during_convert_is_one_line(tmp_path: Path) -> None:
    img = _big_image(tmp_path)
    out = tmp_path / "out.qcow2"
    proc = subprocess.Popen(
        [sys.executable, "-m", "qcowrs", "convert", "-O", "qcow2", str(img), str(out)],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while not out.exists() or out.stat().st_size < 8 * MiB:
        assert proc.poll() is None, "convert finished before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip() == "qcowrs: interrupted"
    # The source is untouched and the partial target is a valid image.
    assert qemu("check", img).returncode == 0
    assert qemu("check", out).returncode in (0, 3)
