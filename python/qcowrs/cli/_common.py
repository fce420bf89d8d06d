"""The command-line framework every subcommand uses: qemu-img's size syntax, ``-o`` option
lists, ``--output``, ``-f``/``-U``/``-q``/``-p``, the progress bar, and one-line errors with
qemu-img's exit codes."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable

from qcowrs._errors import QcowError

# typing only for the checker (importing it costs a command-line call milliseconds).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "CliError",
    "Progress",
    "add_force_share",
    "add_format",
    "add_output",
    "add_progress",
    "add_quiet",
    "bool_option",
    "check_option_list",
    "number_option",
    "os_message",
    "parse_options",
    "parse_size",
    "size_option",
    "snapshot_param",
    "split_option_list",
]

# qemu_strtosz: the largest size qemu-img accepts.
MAX_SIZE = (1 << 63) - 1
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_UNITS["e"] = 1 << 60
_SIZE_RE = re.compile(
    r"(?P<num>0[xX][0-9a-fA-F]+|[0-9]+(?:\.[0-9]*)?)(?P<unit>[bBkKmMgGtTpPeE]?)", re.ASCII
)
_NEGATIVE_RE = re.compile(r"-(?:0[xX][0-9a-fA-F]+|[0-9]+)", re.ASCII)
_TRUE = {"on", "yes", "true", "y"}
_FALSE = {"off", "no", "false", "n"}


def os_message(e: OSError) -> str:
    """An OSError as one line, without Python's "[Errno N]" prefix or Rust's "(os error N)"."""
    if e.strerror and not isinstance(e, QcowError):
        return e.strerror
    text = str(e)
    if e.errno is not None and text.startswith(f"[Errno {e.errno}] "):
        text = text[len(f"[Errno {e.errno}] ") :]
    return text.replace(f" (os error {e.errno})", "") if e.errno is not None else text


class CliError(Exception):
    """A failure to report as one line ``qcowrs: <message>`` with exit code ``code``."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _strtosz(text: str) -> int | None:
    """qemu_strtosz: decimal or hex, a fraction only with a unit, one unit letter; None when
    the text is not a size."""
    m = _SIZE_RE.fullmatch(text.lstrip())
    if m is None:
        return None
    num: str = m["num"]
    unit: str = m["unit"].lower()
    if num.lower().startswith("0x"):
        # ("0x1b", "0x1e": hex digits, taken by the number.)
        return int(num, 16) * _UNITS[unit]
    if "." in num:
        if not unit:
            return None
        whole, frac = num.split(".")
        mult = _UNITS[unit]
        scale: int = 10 ** len(frac or "0")
        return int(whole or "0") * mult + (int(frac or "0") * mult) // scale
    return int(num) * _UNITS[unit]


def parse_size(text: str, what: str = "image size") -> int:
    """A size as qemu-img reads it: ``10G``, ``512M``, ``1.5M``, ``0x100000``, ``1000``
    (bytes); ``k, M, G, T, P, E`` are powers of 1024. Errors read as qemu-img's."""
    value = _strtosz(text)
    if value is None and _NEGATIVE_RE.fullmatch(text.lstrip()):
        # qemu_strtosz: a negative number (alone: "-1", "-0") is out of range; "-1G" is no size.
        raise CliError(f"Invalid {what} specified. Must be between 0 and {MAX_SIZE}.")
    if value is None:
        raise CliError(f"Invalid {what} specified: '{text}'.")
    if value > MAX_SIZE:
        raise CliError(f"Invalid {what} specified. Must be between 0 and {MAX_SIZE}.")
    return value


def size_option(name: str, value: str) -> int:
    """The value of a size-typed ``-o`` option (``cluster_size=64k``)."""
    v = _strtosz(value)
    if v is None or v >= 1 << 64:
        raise CliError(f"Parameter '{name}' expects a non-negative number below 2^64")
    return v


def number_option(name: str, value: str) -> int:
    """The value of a number-typed ``-o`` option (``refcount_bits=8``)."""
    try:
        return int(value, 0)
    except ValueError:
        raise CliError(f"Parameter '{name}' expects a number") from None


def bool_option(name: str, value: str) -> bool:
    """The value of a bool-typed ``-o`` option: on/off (also yes/no, true/false, y/n)."""
    v = value.lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise CliError(f"Parameter '{name}' expects 'on' or 'off'")


def split_option_list(text: str) -> list[str]:
    """The items of one ``-o`` list: split at commas, ``,,`` being a literal comma."""
    items, cur, i = [], "", 0
    while i < len(text):
        if text[i] == "," and text[i + 1 : i + 2] == ",":
            cur += ","
            i += 2
        elif text[i] == ",":
            items.append(cur)
            cur = ""
            i += 1
        else:
            cur += text[i]
            i += 1
    items.append(cur)
    return items


def check_option_list(text: str) -> None:
    """qemu-img's ``is_valid_option_list``: not empty, no leading comma, no trailing comma
    that is not a literal one."""
    trailing = len(text) - len(text.rstrip(","))
    if not text or text.startswith(",") or trailing % 2:
        raise CliError(f"Invalid option list: {text}")


def parse_options(values: list[str] | None) -> list[tuple[str, str]] | None:
    """``-o`` lists (repeatable) as ``[(key, value)]`` in order; ``,,`` is a literal comma;
    a bare key means ``key=on``. Returns None when help was asked for (``help`` or ``?``)."""
    out: list[tuple[str, str]] = []
    for text in values or []:
        for item in split_option_list(text):
            if item in ("help", "?"):
                return None
            if not item:
                continue
            key, eq, value = item.partition("=")
            out.append((key, value if eq else "on"))
    return out


# --------------------------------------------------------------------------------------------
# Common arguments.


def add_format(p: argparse.ArgumentParser, flag: str = "-f", help: str | None = None) -> None:
    p.add_argument(
        flag,
        dest="fmt" if flag == "-f" else flag.lstrip("-"),
        metavar="FMT",
        help=help or "image format: qcow2 or raw (probed when not given)",
    )


def add_force_share(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-U",
        "--force-share",
        action="store_true",
        help="open without taking the image locks, so that an image in use by a running VM "
        "can be inspected (what is read may then be changing)",
    )


def add_output(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--output",
        choices=["human", "json"],
        default="human",
        help="output format: human (qemu-img's layout, the default) or json (qemu-img's keys)",
    )
    p.add_argument(
        "--json", dest="output", action="store_const", const="json", help=argparse.SUPPRESS
    )


def add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet: print no message")


def add_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-p",
        dest="progress",
        action="store_true",
        help="show a progress bar (only when stderr is a terminal)",
    )


# The formats qcowrs reads as a source: qcow (version 1) images are read-only.
READ_FORMATS = ("qcow2", "qcow", "raw")


def check_format(fmt: str | None, allowed: tuple[str, ...] = ("qcow2", "raw")) -> None:
    if fmt is not None and fmt not in allowed:
        raise CliError(f"Unknown file format '{fmt}' (qcowrs handles {', '.join(allowed)})")


# --------------------------------------------------------------------------------------------
# Progress.


class Progress:
    """A progress bar (tqdm) on stderr when asked for and stderr is a terminal; otherwise
    nothing. Use as a context manager; ``update(done, total)`` is the API's callback."""

    def __init__(self, enabled: bool, desc: str = "") -> None:
        self._enabled = enabled and sys.stderr.isatty()
        self._desc = desc
        self._bar: Any = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()

    @property
    def callback(self) -> Callable[[int, int], None] | None:
        return self.update if self._enabled else None

    def update(self, done: int, total: int) -> None:
        if not self._enabled:
            return
        if self._bar is None:
            from shutil import get_terminal_size

            from tqdm import tqdm  # type: ignore[import-untyped]

            # A terminal that reports no size (a bare pty) still gets an 80x24 bar (tqdm hides
            # bars below a 0-line screen).
            cols, rows = get_terminal_size()
            self._bar = tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=self._desc,
                ncols=cols,
                nrows=rows,
            )
        self._bar.total = total
        self._bar.n = done
        self._bar.refresh()


def snapshot_param(text: str) -> str:
    """``-l`` of convert and measure as qemu-img reads it: ``snapshot.id=ID``,
    ``snapshot.name=NAME`` (both: the id is used) or else the whole text as an id or name (an
    id is matched first, then a name, as QEMU does for that form)."""
    if not text.startswith("snapshot."):
        return text
    found: dict[str, str] = {}
    for item in split_option_list(text):
        key, _, value = item.partition("=")
        if item and key not in ("snapshot.id", "snapshot.name"):
            raise CliError(f"Failed in parsing snapshot param '{text}': Invalid parameter '{key}'")
        if item:
            found[key] = value
    return found.get("snapshot.id", found.get("snapshot.name", ""))
