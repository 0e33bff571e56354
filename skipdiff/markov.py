"""Deprecated: moved to :mod:`skipdiff.skips.markov` (this path warns and will go)."""

from .lazy import moved_module

moved_module(__name__, "skipdiff.skips.markov")
