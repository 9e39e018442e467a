"""The strategy registry (it lives in `vtokprune.strategies.registry`, beside the strategies that register)."""

from .strategies.registry import available_strategies, get_strategy, register_strategy

__all__ = ["available_strategies", "get_strategy", "register_strategy"]
