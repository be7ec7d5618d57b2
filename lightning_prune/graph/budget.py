"""The time limit of an analysis."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from lightning_prune.graph.types import GraphTimeoutError

__all__ = ["GRAPH_TIME_LIMIT_S"]

#: graph analysis stops with :class:`GraphTimeoutError` after this many seconds
GRAPH_TIME_LIMIT_S = 30.0



@contextlib.contextmanager
def _deadline(seconds: float | None, what: str) -> Iterator[Callable[[], None]]:
    """A ``check()`` that raises :class:`GraphTimeoutError` past the deadline; in the main thread an alarm
    also interrupts code that never calls it (torch-pruning's tracing)."""
    if seconds is None:
        yield lambda: None
        return
    end = time.monotonic() + seconds

    def message() -> str:
        return (f"The channel-group analysis of {what} did not finish within {seconds:g} s. HINT: pass"
                " `include=[...]` to analyse fewer layers, or a larger `time_limit_s`.")

    def check() -> None:
        if time.monotonic() > end:
            raise GraphTimeoutError(message())

    use_alarm = threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGALRM")
    previous = None
    if use_alarm:
        def on_alarm(signum: int, frame: Any) -> None:
            raise GraphTimeoutError(message())

        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds + 1.0)
    try:
        yield check
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
