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
from .loading import load, saved_strategy
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
from .strategies.adaptinfer import AdaptInfer
from .strategies.atp import ATP
from .strategies.cls_multilayer import CLSMultiLayer
from .strategies.divprune import DivPrune
from .strategies.dyvte import DyVTE
from .strategies.flowcut import FlowCut
from .strategies.holov import HoloV
from .strategies.pdrop import PyramidDrop
from .strategies.scheduled import Scheduled
from .strategies.sparsevlm import SparseVLM
from .strategies.text_clip import TextCLIP
from .strategies.vflowopt import VFlowOpt
from .strategies.visionzip import VisionZip

__version__ = "0.1.0"

__all__ = [
    "VisionZip",
    "VFlowOpt",
    "Scheduled",
    "DyVTE",
    "ATP",
    "TextCLIP",
    "SparseVLM",
    "PyramidDrop",
    "HoloV",
    "FlowCut",
    "DivPrune",
    "CLSMultiLayer",
    "AdaptInfer",
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
    "load",
    "pruned",
    "register_strategy",
    "remove",
    "saved_strategy",
    "strategy_of",
]
