"""Importing this package registers every built-in strategy: each module in it registers its own."""

import importlib
import pkgutil

from .base import LLMContext, LLMStrategy, Strategy, VisionSelection, VisionSignals, VisionStrategy

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base" and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

from .baselines import NoPrune, Pool, RandomPrune  # noqa: E402
from .cdpruner import CDPruner, CDPrunerCLIP  # noqa: E402
from .cls_attention import CLSAttention  # noqa: E402
from .dart import DART  # noqa: E402
from .fastv import FastV  # noqa: E402
from .vispruner import VisPruner  # noqa: E402
from .zoo import ZOOPrune  # noqa: E402

__all__ = [
    "CDPruner",
    "CDPrunerCLIP",
    "CLSAttention",
    "DART",
    "FastV",
    "LLMContext",
    "LLMStrategy",
    "NoPrune",
    "Pool",
    "RandomPrune",
    "Strategy",
    "VisionSelection",
    "VisionSignals",
    "VisPruner",
    "VisionStrategy",
    "ZOOPrune",
]
