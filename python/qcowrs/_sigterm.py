"""SIGTERM as the quiet end of a long blocking call (``mount``, ``serve``)."""

from __future__ import annotations

import signal
import threading

# typing only for the checker (importing it costs a command-line call milliseconds).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from types import FrameType


class _Terminated(BaseException):
    """Raised by the SIGTERM handler installed for the call: ends it like a normal return."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Terminated


def until_sigterm(call: Callable[[], None], quiet: tuple[type[BaseException], ...] = ()) -> None:
    """Runs ``call``; on the main thread SIGTERM raised inside it ends it and returns normally
    (as do the exceptions in ``quiet``), and the previous SIGTERM handler is restored after.
    From another thread SIGTERM is not caught here."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main else None
    ends: tuple[type[BaseException], ...] = (_Terminated, *quiet)
    try:
        call()
    except ends:
        pass
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
