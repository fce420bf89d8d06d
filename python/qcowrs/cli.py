"""The ``qcowrs`` command line (also ``python -m qcowrs``)."""

from __future__ import annotations

import argparse
import json
import sys

from qcowrs._errors import QcowError
from qcowrs._file import QcowFile
from qcowrs._qcowrs import CheckReport, check, rebuild_refcounts


def _cmd_info(args: argparse.Namespace) -> int:
    with QcowFile.open(args.image, mode="rb") as f:
        h = f.header
        info = {
            "filename": args.image,
            "format": "qcow2",
            "virtual-size": f.virtual_size,
            "cluster-size": f.cluster_size,
            "format-specific": {
                "type": "qcow2",
                "data": {
                    "compat": "0.10" if h.version == 2 else "1.1",
                    "compression-type": "zstd" if h.compression_type == 1 else "zlib",
                    "lazy-refcounts": h.lazy_refcounts,
                    "refcount-bits": h.refcount_bits,
                    "corrupt": h.corrupt,
                    "extended-l2": h.extended_l2,
                },
            },
            "dirty-flag": h.dirty,
        }
        if h.backing_file:
            info["backing-filename"] = h.backing_file
        if h.backing_format:
            info["backing-filename-format"] = h.backing_format
        if h.data_file:
            info["format-specific"]["data"]["data-file"] = h.data_file
    if args.json:
        print(json.dumps(info, indent=4))
    else:
        print(f"image: {args.image}")
        print("file format: qcow2")
        print(f"virtual size: {info['virtual-size']} bytes")
        print(f"cluster_size: {info['cluster-size']}")
        if h.backing_file:
            print(f"backing file: {h.backing_file}")
        print("Format specific information:")
        for k, v in info["format-specific"]["data"].items():
            print(f"    {k}: {str(v).lower() if isinstance(v, bool) else v}")
    return 0


def _cmd_map(args: argparse.Namespace) -> int:
    with QcowFile.open(args.image, mode="rb") as f:
        ranges = f.allocated_ranges()
    if args.json:
        print(json.dumps([{"start": s, "length": n, "kind": k} for s, n, k in ranges], indent=4))
    else:
        print(f"{'Offset':<20}{'Length':<20}Kind")
        for s, n, k in ranges:
            print(f"{s:#<20x}{n:#<20x}{k}".replace("#", " "))
    return 0


def _print_report(image: str, r: CheckReport, as_json: bool) -> None:
    if as_json:
        d: dict[str, object] = {"filename": image, "format": "qcow2", **r.to_dict()}
        if r.dropped:
            # Not in qemu-img's output: what the repair gave up, one entry per item.
            d["dropped"] = [
                {"kind": p.kind, "offset": p.host_offset, "message": p.message} for p in r.dropped
            ]
        print(json.dumps(d, indent=4))
        return
    if r.leaks_fixed or r.corruptions_fixed:
        print("The following inconsistencies were found and repaired:\n")
        print(f"    {r.leaks_fixed} leaked clusters")
        print(f"    {r.corruptions_fixed} corruptions\n")
    if r.dropped:
        print("The repair dropped or changed:\n")
        for p in r.dropped:
            at = f" (at 0x{p.host_offset:x})" if p.host_offset is not None else ""
            print(f"    {p.kind}: {p.message}{at}")
        print()
    if r.leaks_fixed or r.corruptions_fixed:
        print("Double checking the fixed image now...")
    for p in r.problems:
        print(f"{p.kind}: {p.message}", file=sys.stderr)
    if r.unlisted_problems:
        print(f"... and {r.unlisted_problems} more problems", file=sys.stderr)
    if r.is_clean:
        print("No errors were found on the image.")
    if r.corruptions:
        print(f"\n{r.corruptions} errors were found on the image.")
        print("Data may be corrupted, or further writes to the image may corrupt it.")
    if r.leaks:
        print(f"\n{r.leaks} leaked clusters were found on the image.")
        print("This means waste of disk space, but no harm to data.")
    if r.check_errors:
        print(f"\n{r.check_errors} internal errors have occurred during the check.")
    if r.total_clusters and r.allocated_clusters:
        pct = 100.0 * r.allocated_clusters / r.total_clusters
        frag = 100.0 * r.fragmented_clusters / r.allocated_clusters
        print(
            f"{r.allocated_clusters}/{r.total_clusters} = {pct:.2f}% allocated, "
            f"{frag:.2f}% fragmented, "
            f"{100.0 * r.compressed_clusters / r.allocated_clusters:.2f}% compressed clusters"
        )
    print(f"Image end offset: {r.image_end_offset}")


def _cmd_check(args: argparse.Namespace) -> int:
    r = check(args.image, repair=args.repair)
    _print_report(args.image, r, args.json)
    if r.check_errors:
        print("qcowrs: Check failed", file=sys.stderr)
    return int(r.exit_code)


def _cmd_rebuild(args: argparse.Namespace) -> int:
    r = rebuild_refcounts(args.image)
    _print_report(args.image, r, args.json)
    return int(r.exit_code)


_SUFFIXES = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def _size(text: str) -> int:
    """Parses a size like qemu-img: a number with an optional K/M/G/T/P suffix (powers of 2)."""
    t = text.strip().upper().removesuffix("IB")
    unit = t[-1] if t and t[-1] in _SUFFIXES else ""
    number = t[: len(t) - len(unit)] if unit else t
    try:
        value = float(number) * _SUFFIXES[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}") from None
    if value < 0 or value != int(value):
        raise argparse.ArgumentTypeError(f"invalid size {text!r}")
    return int(value)


def _options(text: str | None) -> dict[str, str]:
    opts: dict[str, str] = {}
    for item in (text or "").split(","):
        if item:
            key, _, value = item.partition("=")
            opts[key.strip()] = value.strip()
    return opts


def _flag(opts: dict[str, str], key: str) -> bool:
    return opts.get(key, "off").lower() in ("on", "true", "yes", "1")


def _cmd_create(args: argparse.Namespace) -> int:
    opts = _options(args.o)
    known = {"cluster_size", "refcount_bits", "lazy_refcounts", "extended_l2", "backing_fmt"}
    unknown = set(opts) - known
    if unknown:
        print(f"qcowrs: unknown option(s) {', '.join(sorted(unknown))}", file=sys.stderr)
        return 1
    f = QcowFile.create(
        args.image,
        args.size,
        cluster_size=_size(opts.get("cluster_size", "65536")),
        refcount_bits=int(opts.get("refcount_bits", "16")),
        backing_file=args.b,
        backing_format=args.F or opts.get("backing_fmt"),
        lazy_refcounts=_flag(opts, "lazy_refcounts"),
        extended_l2=_flag(opts, "extended_l2"),
    )
    f.close()
    print(f"Formatting '{args.image}', fmt=qcow2 size={args.size}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from qcowrs._convert import convert

    convert(args.src, args.dst, args.O, progress=sys.stderr.isatty())
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qcowrs", description="qcow2 images: inspect, check, repair")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("info", help="describe an image, like qemu-img info")
    s.add_argument("image")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_info)
    s = sub.add_parser("map", help="what the image holds, like qemu-img map")
    s.add_argument("image")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_map)
    s = sub.add_parser("check", help="check (and repair) an image, like qemu-img check")
    s.add_argument("image")
    s.add_argument("-r", dest="repair", choices=["leaks", "all"], default=None)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_check)
    s = sub.add_parser("create", help="create an image, like qemu-img create -f qcow2")
    s.add_argument("image")
    s.add_argument("size", type=_size)
    s.add_argument("-o", help="cluster_size=..,refcount_bits=..,lazy_refcounts=on,extended_l2=on")
    s.add_argument("-b", help="backing file")
    s.add_argument("-F", help="backing file format (qcow2 or raw)")
    s.set_defaults(func=_cmd_create)
    s = sub.add_parser("convert", help="copy a qcow2 image's guest content to raw or qcow2")
    s.add_argument("src")
    s.add_argument("dst")
    s.add_argument("-O", choices=["raw", "qcow2"], default="raw")
    s.set_defaults(func=_cmd_convert)
    s = sub.add_parser("rebuild", help="rebuild the refcount structure")
    s.add_argument("image")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_rebuild)
    return p


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except QcowError as e:
        print(f"qcowrs: {e}", file=sys.stderr)
        return 1
