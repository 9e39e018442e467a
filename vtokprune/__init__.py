"""vtokprune: visual token pruning for vision-language models, one line for any supported HF model.

model = vtokprune.apply(model, vtokprune.CLSAttention(keep=64))
"""

from __future__ import annotations

from . import strategies  # noqa: F401  (registers the built-in strategies)
from .adapters import ADAPTERS, get_adapter
from .api import apply, is_pruned, last_selection, pruned, remove, strategy_of
from .errors import (
    BudgetError,
    CapabilityError,
    PruningStateError,
    UnknownStrategyError,
    UnsupportedModelError,
    VTokPruneError,
)
from .registry import available_strategies, get_strategy, register_strategy
from .runtime import Selection
from .strategies import (
    DART,
    CDPruner,
    CDPrunerCLIP,
    CLSAttention,
    FastV,
    LLMStrategy,
    NoPrune,
    Pool,
    RandomPrune,
    Strategy,
    VisionSignals,
    VisionStrategy,
    VisPruner,
    ZOOPrune,
)

__version__ = "0.1.0"

__all__ = [
    "ADAPTERS",
    "DART",
    "BudgetError",
    "CDPruner",
    "CDPrunerCLIP",
    "CLSAttention",
    "CapabilityError",
    "FastV",
    "LLMStrategy",
    "NoPrune",
    "Pool",
    "PruningStateError",
    "RandomPrune",
    "Selection",
    "Strategy",
    "UnknownStrategyError",
    "UnsupportedModelError",
    "VTokPruneError",
    "VisionSignals",
    "VisPruner",
    "VisionStrategy",
    "ZOOPrune",
    "__version__",
    "apply",
    "available_strategies",
    "get_adapter",
    "get_strategy",
    "is_pruned",
    "last_selection",
    "pruned",
    "register_strategy",
    "remove",
    "strategy_of",
]
