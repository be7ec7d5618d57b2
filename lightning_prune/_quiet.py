"""Third-party noise that is not the user's business, filtered by the ``lightning-prune`` command and by
the test suite.

Only messages named here are dropped, each matched by its own text; every warning lightning-prune itself
emits, and every other third-party warning, still shows. Nothing here imports torch or Lightning.
"""

from __future__ import annotations

import logging
import warnings

__all__ = ["NOISY_LOG_MESSAGES", "NOISY_WARNINGS", "quiet_third_party"]

# (message regex, category): warnings a user cannot act on.
NOISY_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    # Lightning's own pytree helper builds torch's deprecated LeafSpec (torch >= 2.10).
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
)

# Substrings of log records (Lightning's rank-zero "info" lines) that advertise rather than inform.
NOISY_LOG_MESSAGES: tuple[str, ...] = ("litlogger",)

_RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                      "lightning_utilities.core.rank_zero")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # a malformed record is not ours to judge
            return True
        return not any(noise in text for noise in NOISY_LOG_MESSAGES)


_FILTER = _DropNoise()


def quiet_third_party() -> None:
    """Install the filters (idempotent): the warnings of :data:`NOISY_WARNINGS` are ignored and the log lines
    containing :data:`NOISY_LOG_MESSAGES` are dropped from Lightning's rank-zero loggers."""
    for message, category in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in _RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
