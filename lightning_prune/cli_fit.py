"""Moved to :mod:`lightning_prune.cli.fit` (this path warns, and goes in the next release)."""

from lightning_prune._moved import moved

moved(__name__, globals())
