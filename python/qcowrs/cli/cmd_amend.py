"""``qcowrs amend``: as ``qemu-img amend``."""

from __future__ import annotations

import argparse
from typing import Any

from qcowrs.cli._common import (
    CliError,
    Progress,
    add_format,
    add_progress,
    add_quiet,
    check_option_list,
    parse_options,
)

# qemu-img 10's amend options for qcow2 (the encrypt.* ones need an encrypted image, which
# qcowrs cannot open).
_OPTIONS = {
    "backing_file": ("str", "File name of a base image"),
    "backing_fmt": ("str", "Image format of the base image"),
    "compat": ("str", "Compatibility level (v2 [0.10] or v3 [1.1])"),
    "data_file": ("str", "File name of an external data file"),
    "data_file_raw": ("bool", "The external data file must stay valid as a raw image"),
    "lazy_refcounts": ("bool", "Postpone refcount updates"),
    "refcount_bits": ("num", "Width of a reference count entry in bits"),
    "size": ("size", "Virtual disk size"),
}
_CREATE_ONLY = {
    "cluster_size",
    "preallocation",
    "extended_l2",
    "compression_type",
    "encryption",
    "encrypt.format",
    "encrypt.key-secret",
    "encrypt.cipher-alg",
    "encrypt.cipher-mode",
    "encrypt.ivgen-alg",
    "encrypt.ivgen-hash-alg",
    "encrypt.hash-alg",
    "encrypt.iter-time",
}


def register(sub: Any) -> None:
    p = sub.add_parser(
        "amend",
        help="change options of a qcow2 image in place (qemu-img amend)",
        description="Changes options of IMAGE: compat=0.10|1.1, refcount_bits=N, "
        "lazy_refcounts=on|off, data_file=NAME, data_file_raw=off, size=SIZE. A new backing "
        "file is 'rebase's job. '-o help' lists the options.",
    )
    add_format(p, help="image format (qcow2)")
    p.add_argument("-o", dest="options", action="append", metavar="OPTS", help="the options")
    p.add_argument("--force", action="store_true", help="accepted for qemu-img compatibility")
    p.add_argument("-t", dest="cache", metavar="CACHE", help="accepted for qemu-img compatibility")
    add_progress(p)
    add_quiet(p)
    p.add_argument("image", nargs="?", help="the image to amend")
    p.set_defaults(func=run)


def _help() -> int:
    print("Amend options for 'qcow2':")
    kinds = {"str": "<str>", "size": "<size>", "num": "<num>", "bool": "<bool (on/off)>"}
    for name, (kind, text) in sorted(_OPTIONS.items()):
        print(f"  {f'{name}={kinds[kind]}':<22} - {text}")
    return 0


def _typed(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """create's typed parsing of ``-o`` values, after amend's own refusal of create-only
    options."""
    from qcowrs.cli.cmd_create import _typed as typed

    for key, _ in pairs:
        if key in _CREATE_ONLY:
            raise CliError(
                f"Invalid parameter '{key}'. This option is only supported for image creation"
            )
    return typed(_OPTIONS, pairs)


def run(args: argparse.Namespace) -> int:
    from qcowrs import _qcowrs

    if not args.options:
        raise CliError("Must specify options (-o)")
    for text in args.options:
        check_option_list(text)
    pairs = parse_options(args.options)
    if pairs is None:
        return _help()
    if args.fmt not in (None, "qcow2"):
        raise CliError(f"Format driver '{args.fmt}' does not support option amendment")
    if not args.image:
        raise CliError("Expecting one image file name")
    o = _typed(pairs)
    with Progress(args.progress and not args.quiet, "amend") as bar:
        _qcowrs.amend(
            args.image,
            compat=o.get("compat"),
            refcount_bits=o.get("refcount_bits"),
            lazy_refcounts=o.get("lazy_refcounts"),
            data_file=o.get("data_file"),
            data_file_raw=o.get("data_file_raw"),
            size=o.get("size"),
            backing_file=o.get("backing_file"),
            backing_format=o.get("backing_fmt"),
            progress=bar.callback,
        )
    return 0
