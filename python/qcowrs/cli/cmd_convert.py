"""``qcowrs convert``: as ``qemu-img convert`` (the default target format is raw, as in
qemu-img); the work is ``qcowrs.convert``'s (the Rust core, on every core)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from qcowrs.cli._common import (
    READ_FORMATS,
    CliError,
    Progress,
    add_force_share,
    add_format,
    add_progress,
    add_quiet,
    check_format,
    number_option,
    parse_options,
    parse_size,
    snapshot_param,
)
from qcowrs.cli.cmd_create import _QCOW2, _help, _qcow2_semantics, _typed


def register(sub: Any) -> None:
    p = sub.add_parser(
        "convert",
        help="copy images' guest content into a raw or qcow2 image (qemu-img convert)",
        description="Copies the guest content of SRC (several are concatenated; qcow2 with "
        "its backing chain, or raw) into DST. Only allocated data is read; zero runs of -S "
        "bytes stay unallocated. A target that is a file the convert reads, or that another "
        "process uses, is refused before anything is written. DST '-' writes the image to "
        "standard output (a pipe: raw, or qcow2 laid out metadata first); SRC '-' reads a raw "
        "image from standard input.",
    )
    add_format(
        p, help="source format: qcow2, qcow (version 1, read-only) or raw (probed when not given)"
    )
    p.add_argument(
        "-O",
        dest="out_fmt",
        default="raw",
        metavar="FMT",
        help="target format: raw (default) or qcow2",
    )
    p.add_argument(
        "-c", dest="compress", action="store_true", help="write compressed clusters (qcow2 target)"
    )
    p.add_argument(
        "-o",
        dest="options",
        action="append",
        metavar="OPTS",
        help="target creation options, as for create (e.g. cluster_size=2M,compression_type=zstd; "
        "'-o help' lists them)",
    )
    p.add_argument(
        "-B",
        dest="backing",
        metavar="BACKING",
        help="the target keeps this backing file; only what differs is written",
    )
    p.add_argument("-F", dest="backing_fmt", metavar="FMT", help="format of the -B backing file")
    p.add_argument(
        "-S",
        dest="sparse",
        metavar="SIZE",
        default="4k",
        help="zero runs of at least SIZE bytes stay unallocated (default 4k; 0: fully allocated)",
    )
    p.add_argument(
        "-n",
        dest="existing",
        action="store_true",
        help="write into the existing target (no create)",
    )
    p.add_argument(
        "--target-is-zero",
        action="store_true",
        help="with -n: the target reads as zeros already, so zeros are not written",
    )
    p.add_argument(
        "-l",
        dest="snapshot",
        metavar="SNAPSHOT",
        help="convert an internal snapshot (snapshot.name=NAME or snapshot.id=ID)",
    )
    p.add_argument(
        "-t",
        dest="cache",
        default="writeback",
        metavar="CACHE",
        help="target cache mode: writeback (default: metadata writes ordered, all durable when "
        "convert returns) or unsafe (never synced, qemu-img convert's default); none, "
        "directsync and writethrough are taken as writeback",
    )
    p.add_argument("-m", dest="threads", metavar="N", help="worker threads (default: one per core)")
    p.add_argument(
        "-W",
        dest="unordered",
        action="store_true",
        help="accepted for qemu-img compatibility (writes stay in guest order; the work is "
        "parallel anyway)",
    )
    add_force_share(p)
    add_progress(p)
    add_quiet(p)
    p.add_argument(
        "files", nargs="*", metavar="SRC... DST", help="the source image(s), then the target"
    )
    p.set_defaults(func=run)


def _target_options(args: argparse.Namespace, pairs: list[tuple[str, str]]) -> dict[str, Any]:
    if args.out_fmt == "raw":
        for key, _ in pairs:
            if key != "preallocation":
                raise CliError(f"Invalid parameter '{key}'")
        return {}
    o = _typed(_QCOW2, pairs)
    if "size" in o:
        raise CliError("Invalid parameter 'size'")
    options = _qcow2_semantics(o)
    kw: dict[str, Any] = {}
    backing = args.backing or o.get("backing_file")
    backing_fmt = args.backing_fmt or o.get("backing_fmt")
    if backing:
        if backing_fmt is not None:
            check_format(backing_fmt, READ_FORMATS)
        kw["backing_file"], kw["backing_format"] = backing, backing_fmt
    if args.compress:
        kw["compress"] = options.pop("compression_type")
    kw["options"] = options
    return kw


def run(args: argparse.Namespace) -> int:
    from qcowrs._convert import convert

    check_format(args.fmt, READ_FORMATS)
    check_format(args.out_fmt)
    pairs = parse_options(args.options)
    if pairs is None:
        return _help(args.out_fmt)
    if len(args.files) < 2:
        raise CliError(
            "Expecting image file name" if not args.files else "Expecting a target file name"
        )
    *sources, dst = args.files
    snapshot = snapshot_param(args.snapshot) if args.snapshot is not None else None
    if args.compress and args.out_fmt == "raw":
        raise CliError("Compression not supported for this file format")
    if args.backing and args.out_fmt == "raw":
        raise CliError("Backing file not supported for file format 'raw'")
    if args.cache not in ("none", "writeback", "unsafe", "directsync", "writethrough"):
        raise CliError(f"Invalid cache option: {args.cache}")
    sparse = parse_size(args.sparse)
    if sparse % 512:
        raise CliError(f"Invalid buffer size for sparse output specified: {args.sparse}")
    threads = number_option("-m", args.threads) if args.threads is not None else 0
    if args.threads is not None and not 1 <= threads <= 16:
        raise CliError(
            "Invalid number of coroutines. Allowed number of coroutines is between 1 and 16"
        )
    kw = _target_options(args, pairs)
    for s in sources:
        if s != "-" and not os.path.exists(s):
            raise CliError(f"Could not open '{s}': No such file or directory")
    if dst == "-" and args.progress:
        args.progress = False  # the bar would share the terminal with the stream's reader
    if os.path.isdir(dst):
        raise CliError(f"{dst}: Could not create '{dst}': Is a directory")
    if not args.existing and not os.path.isdir(os.path.dirname(dst) or "."):
        raise CliError(f"{dst}: Could not create '{dst}': No such file or directory")
    with Progress(args.progress and not args.quiet, "convert") as bar:
        convert(
            sources,
            dst,
            args.out_fmt,
            source_format=args.fmt,
            sparse_size=sparse,
            existing_target=args.existing,
            target_is_zero=args.target_is_zero,
            threads=threads,
            force_share=args.force_share,
            target_cache=args.cache,
            snapshot=snapshot,
            progress=bar.callback,
            **kw,
        )
    return 0
