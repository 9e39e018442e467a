"""Importing this package registers every built-in strategy: each module in it registers its own."""

import importlib
import pkgutil

from .base import LLMContext, LLMStrategy, Strategy, VisionSelection, VisionSignals, VisionStrategy

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base" and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

from .baselines import NoPrune, Pool, RandomPrune  # noqa: E402
from .cls_attention import CLSAttention  # noqa: E402
from .fastv import FastV  # noqa: E402

__all__ = [
    "CLSAttention",
    "FastV",
    "LLMContext",
    "LLMStrategy",
    "NoPrune",
    "Pool",
    "RandomPrune",
    "Strategy",
    "VisionSelection",
    "VisionSignals",
    "VisionStrategy",
]
