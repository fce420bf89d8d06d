"""Argument parsing and the one place errors become one line on stderr."""

from __future__ import annotations

import argparse
import os
import sys
from importlib import import_module

from qcowrs._errors import QcowError
from qcowrs._qcowrs import __version__
from qcowrs.cli._common import CliError, os_message

# typing only for the checker (importing it costs a command-line call milliseconds).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# Each subcommand and its module (imported only when needed: a call names one command, and
# only `qcowrs --help` and mistakes need them all).
_COMMANDS = {
    "info": "cmd_info",
    "check": "cmd_check",
    "map": "cmd_map",
    "create": "cmd_create",
    "convert": "cmd_convert",
    "compare": "cmd_compare",
    "dd": "cmd_dd",
    "measure": "cmd_measure",
    "resize": "cmd_resize",
    "rebase": "cmd_rebase",
    "commit": "cmd_commit",
    "amend": "cmd_amend",
    "snapshot": "cmd_snapshot",
    "bitmap": "cmd_bitmap",
    "rebuild": "cmd_rebuild",
    "mount": "cmd_mount",
    "serve": "cmd_serve",
}


_NEGATIVE = {f"-{d}" for d in "0123456789"}


class _Parser(argparse.ArgumentParser):
    """argparse with qemu-img's usage-error convention: one line, exit code 1."""

    def error(self, message: str) -> None:  # type: ignore[override]
        # "measure: argument --size: ..." for a subcommand's parser; the top-level parser's
        # own errors ("unrecognized arguments: ...") need no name before them.
        command = self.prog.removeprefix("qcowrs").strip()
        raise CliError(f"{command}: {message}" if command else message)

    def _get_formatter(self) -> argparse.HelpFormatter:
        # argparse's own asks shutil for the width, and importing shutil (bz2, lzma, ...)
        # costs every call milliseconds: add_argument makes formatters too, not only --help.
        formatter: Any = self.formatter_class
        return formatter(prog=self.prog, width=_help_width())  # type: ignore[no-any-return]


def _help_width() -> int:
    """The width argparse's formatter takes: shutil.get_terminal_size's columns, less 2."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return (columns or 80) - 2


def _parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser: with only the subcommand `argv` names, if it names one, else all of them."""
    p = _Parser(
        prog="qcowrs",
        description="qcow2 disk images: the qemu-img commands, plus rebuild. "
        "Run 'qcowrs COMMAND --help' for a command's options.",
    )
    p.add_argument("--version", action="version", version=f"qcowrs version {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    names = [argv[0]] if argv and argv[0] in _COMMANDS else list(_COMMANDS)
    for name in names:
        import_module(f"qcowrs.cli.{_COMMANDS[name]}").register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit code (qemu-img's)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "resize" and "--" not in argv and argv[-1][:2] in _NEGATIVE:
        # As qemu-img: the last argument of resize is the size, "-1G" included.
        argv.insert(len(argv) - 1, "--")
    try:
        args = _parser(argv).parse_args(argv)
        return int(args.func(args))
    except CliError as e:
        print(f"qcowrs: {e}", file=sys.stderr)
        return e.code
    except QcowError as e:
        print(f"qcowrs: {os_message(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("qcowrs: interrupted", file=sys.stderr)
        import signal

        return 128 + signal.SIGINT
    except BrokenPipeError:
        # The reader went away (`qcowrs map ... | head`): not an error worth a traceback.
        return 1
    except OSError as e:
        print(f"qcowrs: {os_message(e)}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"qcowrs: {e}", file=sys.stderr)
        return 1
