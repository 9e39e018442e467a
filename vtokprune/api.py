"""The one-line user API: apply / remove / pruned / last_selection."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from torch import nn

from .adapters import get_adapter
from .errors import CapabilityError, PruningStateError
from .loading import forget_strategy, record_strategy
from .registry import get_strategy
from .runtime import PrunerState, Selection
from .strategies.base import LLMStrategy, Strategy

M = TypeVar("M", bound=nn.Module)
_STATE_ATTR = "_vtokprune_state"


def apply(model: M, strategy: Strategy | str, fallback: Strategy | str | None = None, **strategy_kwargs: Any) -> M:
    """Prune `model`'s visual tokens with `strategy`, in place; returns the model.

    `model(**inputs)` and `model.generate(**inputs)` work as before. `strategy` is a Strategy config or a registered
    name (`apply(model, "cls", keep=64)`). If anything fails, the model is left exactly as it was.

    A strategy given no budget gets its paper's default (`FastV` -> ratio=0.5, `PyramidDrop` -> lam=0.5; see each
    class's `default_budget`) and `strategy_of(model)` shows it; strategies whose paper states none raise BudgetError.
    `apply(model, "none")` is the explicit way to keep every token.

    `fallback`: a strategy (or name, given the same budget) to use instead when the model cannot serve `strategy`
    (e.g. `cls` on Qwen2-VL, whose vision tower has no [CLS]); a warning names the substitution. Without it, such a
    model raises CapabilityError.
    """
    resolved = get_strategy(strategy, **strategy_kwargs).with_default_budget()
    if getattr(model, _STATE_ATTR, None) is not None:
        raise PruningStateError(
            f"this model is already pruned with {model._vtokprune_state.strategy!r}; "  # type: ignore[union-attr]
            "call vtokprune.remove(model) first"
        )
    adapter = get_adapter(model)
    try:
        adapter.check(resolved)
    except CapabilityError as e:
        if fallback is None:
            raise
        substitute = (
            get_strategy(fallback, keep=resolved.keep, ratio=resolved.ratio) if isinstance(fallback, str) else fallback
        ).with_default_budget()
        adapter.check(substitute)
        warnings.warn(f"vtokprune: {e}; falling back to {substitute!r} as asked", stacklevel=2)
        resolved = substitute
    if isinstance(resolved, LLMStrategy) and resolved.needs_attention:
        impl = getattr(adapter.text_config(), "_attn_implementation", None)
        if impl not in (None, "sdpa", "eager"):
            raise CapabilityError(
                f"in-LLM strategy {resolved.name!r} supports the 'sdpa' and 'eager' attention implementations, "
                f"not {impl!r}; load the model with attn_implementation='sdpa'"
            )
    state = PrunerState(resolved, adapter)
    try:
        adapter.install(state)
    except BaseException:
        adapter.uninstall(state)
        raise
    setattr(model, _STATE_ATTR, state)
    record_strategy(model, resolved)  # save_pretrained writes it; the repr names it
    return model


def remove(model: M) -> M:
    """Undo `apply`: the model behaves exactly as before. A model that is not pruned is returned unchanged."""
    state: PrunerState | None = getattr(model, _STATE_ATTR, None)
    if state is None:
        return model
    state.adapter.uninstall(state)
    delattr(model, _STATE_ATTR)
    forget_strategy(model)
    return model


def is_pruned(model: nn.Module) -> bool:
    return getattr(model, _STATE_ATTR, None) is not None


def strategy_of(model: nn.Module) -> Strategy | None:
    state: PrunerState | None = getattr(model, _STATE_ATTR, None)
    return None if state is None else state.strategy


@contextmanager
def pruned(model: M, strategy: Strategy | str, **strategy_kwargs: Any) -> Iterator[M]:
    """Temporary pruning: `with vtokprune.pruned(model, "cls", keep=64): model.generate(...)`."""
    apply(model, strategy, **strategy_kwargs)
    try:
        yield model
    finally:
        remove(model)


def last_selection(model: nn.Module) -> Selection | None:
    """Kept visual-token indices of the last prefill run by this thread (None for text-only input)."""
    state: PrunerState | None = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise PruningStateError("this model is not pruned; call vtokprune.apply(model, strategy) first")
    return state.last_selection
