"""Errors raised by vtokprune. Every message names the problem and the fix."""

from __future__ import annotations


class VTokPruneError(Exception):
    """Base class of every error vtokprune raises on purpose."""


class BudgetError(VTokPruneError, ValueError):
    """A keep / ratio budget that cannot be met."""


class UnknownStrategyError(VTokPruneError, KeyError):
    """A strategy name that is not in the registry."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class UnsupportedModelError(VTokPruneError, TypeError):
    """A model that no adapter knows how to prune."""


class CapabilityError(VTokPruneError, ValueError):
    """The model cannot provide a signal the strategy needs (no [CLS], wrong attention implementation...)."""


class PruningStateError(VTokPruneError, RuntimeError):
    """The model is in a state that pruning cannot handle (already wrapped, images after a filled cache...)."""
