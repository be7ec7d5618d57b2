"""The CPU-time budget of an analysis: checked cooperatively, no signal handler and no timer.

The analysis counts the CPU time of the process (:func:`time.process_time`) from its start and checks it
between its steps, inside its long loops (the dependency walk, the exactness proof's bisection) and, through a
forward pre-hook on every module of the traced model for the time of the analysis, inside each forward pass
(tracing, the proof's forwards). Past the limit it raises :class:`GraphTimeoutError`. A library must leave the
process's signals to the program: nothing here touches ``SIGALRM`` or an interval timer, and it works off the
main thread as well.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

from torch import nn

from lightning_prune.graph.types import GraphTimeoutError

__all__ = ["DEFAULT_ANALYSIS_TIME_LIMIT_S", "GRAPH_TIME_LIMIT_S", "Budget"]

#: CPU seconds an analysis may use by default (``analysis_time_limit_s``); generous: the largest family of the
#: coverage sweeps needs a fraction of it on a loaded 2-core machine
DEFAULT_ANALYSIS_TIME_LIMIT_S = 300.0
#: the former name of :data:`DEFAULT_ANALYSIS_TIME_LIMIT_S`
GRAPH_TIME_LIMIT_S = DEFAULT_ANALYSIS_TIME_LIMIT_S


class Budget:
    """A CPU-time budget: calling it (or :meth:`check`) raises :class:`GraphTimeoutError` once more than
    ``seconds`` of process CPU time have passed since it was made (``None``: never)."""

    def __init__(self, seconds: float | None, what: str) -> None:
        self.seconds = seconds
        self.what = what
        self.start = time.process_time()

    def used(self) -> float:
        """CPU seconds since the start."""
        return time.process_time() - self.start

    def message(self) -> str:
        return (f"The channel-group analysis of {self.what} used more than {self.seconds:g} s of CPU time"
                f" (its limit, `analysis_time_limit_s`). HINT: pass a larger `analysis_time_limit_s` (CPU"
                " seconds; None = no limit) to the callback, `lp.compress` or `analyse_channels`, or"
                " `include=[...]` to analyse fewer layers.")

    def check(self) -> None:
        if self.seconds is not None and self.used() > self.seconds:
            raise GraphTimeoutError(self.message())

    __call__ = check


@contextlib.contextmanager
def analysis_deadline(seconds: float | None, what: str, model: nn.Module | None = None) -> Iterator[Budget]:
    """A :class:`Budget` for the time of the block; with ``model``, every forward of one of its modules checks
    it too (the hooks are removed on exit; the proof's copies of the model carry them, and are dropped)."""
    budget = Budget(seconds, what)
    handles: list[Any] = []
    if model is not None and seconds is not None:
        def hook(module: nn.Module, args: Any) -> None:
            budget.check()

        for m in model.modules():
            try:
                handles.append(m.register_forward_pre_hook(hook))
            except RuntimeError:  # a scripted module takes no Python hook: checked around it
                pass
    try:
        yield budget
    finally:
        for handle in handles:
            handle.remove()
