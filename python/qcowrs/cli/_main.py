"""Argument parsing and the one place errors become one line on stderr."""

from __future__ import annotations

import argparse
import signal
import sys

from qcowrs._errors import QcowError
from qcowrs._qcowrs import __version__
from qcowrs.cli import (
    cmd_amend,
    cmd_bitmap,
    cmd_check,
    cmd_commit,
    cmd_compare,
    cmd_convert,
    cmd_create,
    cmd_dd,
    cmd_info,
    cmd_map,
    cmd_measure,
    cmd_rebase,
    cmd_rebuild,
    cmd_resize,
    cmd_snapshot,
)
from qcowrs.cli._common import CliError, os_message

_COMMANDS = [
    cmd_info,
    cmd_check,
    cmd_map,
    cmd_create,
    cmd_convert,
    cmd_compare,
    cmd_dd,
    cmd_measure,
    cmd_resize,
    cmd_rebase,
    cmd_commit,
    cmd_amend,
    cmd_snapshot,
    cmd_bitmap,
    cmd_rebuild,
]


_NEGATIVE = {f"-{d}" for d in "0123456789"}


class _Parser(argparse.ArgumentParser):
    """argparse with qemu-img's usage-error convention: one line, exit code 1."""

    def error(self, message: str) -> None:  # type: ignore[override]
        # "measure: argument --size: ..." for a subcommand's parser; the top-level parser's
        # own errors ("unrecognized arguments: ...") need no name before them.
        command = self.prog.removeprefix("qcowrs").strip()
        raise CliError(f"{command}: {message}" if command else message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="qcowrs",
        description="qcow2 disk images: the qemu-img commands, plus rebuild. "
        "Run 'qcowrs COMMAND --help' for a command's options.",
    )
    p.add_argument("--version", action="version", version=f"qcowrs version {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for mod in _COMMANDS:
        mod.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit code (qemu-img's)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "resize" and "--" not in argv and argv[-1][:2] in _NEGATIVE:
        # As qemu-img: the last argument of resize is the size, "-1G" included.
        argv.insert(len(argv) - 1, "--")
    try:
        args = _parser().parse_args(argv)
        return int(args.func(args))
    except CliError as e:
        print(f"qcowrs: {e}", file=sys.stderr)
        return e.code
    except QcowError as e:
        print(f"qcowrs: {os_message(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("qcowrs: interrupted", file=sys.stderr)
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
