"""The thread count of the library's own computations (the channel analysis and its exactness proof).

torch's default intra-op thread count is the number of cores. On a machine whose cores are busy with other
processes, every parallel region then waits for its slowest thread, and a float64 depthwise convolution of the
exactness proof took seconds instead of milliseconds (issue 28: the analysis of ``efficientnet_b0`` at 32x32
went from 0.5 s to 113 s and hit its time limit). The analysis works on small example batches, where one
thread is about as fast as several on a quiet machine (``benchmarks/analysis_threads.py``), so it runs at
:data:`ANALYSIS_THREADS` and gives the caller's setting back afterwards, also when it raises.

Example::

    >>> import torch
    >>> from lightning_prune.core.threads import analysis_threads
    >>> before = torch.get_num_threads()
    >>> with analysis_threads():
    ...     torch.get_num_threads()
    1
    >>> torch.get_num_threads() == before
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["ANALYSIS_THREADS", "analysis_threads", "limited_threads"]

#: The intra-op thread count of the channel analysis (``None``: leave the caller's).
ANALYSIS_THREADS: int | None = 1


@contextlib.contextmanager
def limited_threads(threads: int | None) -> Iterator[None]:
    """Run the block at ``threads`` intra-op threads (at most the caller's count), then restore the caller's
    ``torch.get_num_threads()``, also on error. ``None`` leaves the count alone."""
    import torch

    before = torch.get_num_threads()
    if threads is None or threads >= before:
        yield
        return
    torch.set_num_threads(max(int(threads), 1))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def analysis_threads() -> contextlib.AbstractContextManager[None]:
    """:func:`limited_threads` at :data:`ANALYSIS_THREADS` (read when called, so it can be changed)."""
    return limited_threads(ANALYSIS_THREADS)
