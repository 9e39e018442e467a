"""Name -> strategy class registry, so CLIs and configs can name strategies. Strategy modules register themselves
(`@register_strategy`); importing `vtokprune.strategies` imports them all."""

from __future__ import annotations

from typing import Any, TypeVar

from ..errors import UnknownStrategyError
from .base import Strategy

_STRATEGIES: dict[str, type[Strategy]] = {}

S = TypeVar("S", bound="type[Strategy]")


def register_strategy(cls: S) -> S:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no `name`")
    if cls.name in _STRATEGIES and _STRATEGIES[cls.name] is not cls:
        raise ValueError(f"strategy name {cls.name!r} is already taken by {_STRATEGIES[cls.name].__name__}")
    _STRATEGIES[cls.name] = cls
    return cls


def available_strategies() -> dict[str, type[Strategy]]:
    return dict(sorted(_STRATEGIES.items()))


def get_strategy(name: str | Strategy | None, **kwargs: Any) -> Strategy:
    """`get_strategy("cls", keep=64)` -> CLSAttention(keep=64). A Strategy instance is returned as is."""
    if name is None:
        raise UnknownStrategyError(
            "no strategy given (None); name one of: "
            + ", ".join(available_strategies())
            + " ('none' keeps every token)"
        )
    if isinstance(name, Strategy):
        if kwargs:
            raise TypeError("pass keyword arguments only with a strategy name, not with a Strategy instance")
        return name
    key = str(name).strip().lower().replace("-", "_")
    if key not in _STRATEGIES:
        raise UnknownStrategyError(f"unknown strategy {name!r}; available: {', '.join(available_strategies())}")
    cls = _STRATEGIES[key]
    try:
        return cls(**kwargs)
    except TypeError as e:
        import dataclasses

        fields = [f.name for f in dataclasses.fields(cls)]
        raise TypeError(f"{e}; strategy {key!r} accepts: {', '.join(fields)}") from None
