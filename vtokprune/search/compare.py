"""Equal-compute comparison helpers: the keep at which a fixed strategy averages a target number of visual tokens
over decoder layers, and the average a dynamic (per-input) strategy actually reached."""

from __future__ import annotations

from typing import Any

from ..errors import BudgetError


def keep_for_average(name: str, target: float, num_layers: int, available: int, **params: Any) -> tuple[int, float]:
    """(keep, average reached): the keep whose average visual tokens over layers is closest to `target` (ties: the
    cheaper). BudgetError if even keep=1 averages more than target + 1 token (e.g. FastV's unpruned first layers)."""
    from ..compute import average_visual_tokens
    from ..registry import get_strategy

    best: tuple[float, int, float] | None = None
    for keep in range(1, available + 1):
        avg = average_visual_tokens(get_strategy(name, keep=keep, **params), num_layers, available)
        gap = abs(avg - target)
        if best is None or gap < best[0] - 1e-9:
            best = (gap, keep, avg)
        if avg > target and gap > best[0]:
            break
    assert best is not None
    if best[0] > 1.0 and best[2] > target:
        raise BudgetError(
            f"{name} cannot average {target:g} visual tokens over {num_layers} layers (at keep=1 it averages "
            f"{best[2]:.1f}); compare at a higher target"
        )
    return best[1], best[2]


def measured_average(selection: Any, num_layers: int) -> list[float]:
    """Per image of the last prefill: visual tokens averaged over decoder layers, from `last_selection(model)`
    (in-LLM stages; for per-input strategies such as DyVTE and ATP this is what each input really cost)."""
    if not selection.stages:  # pre-LLM: what reached the language model, at every layer
        return [float(len(k)) for k in selection.kept]
    out = []
    for i, available in enumerate(selection.available):
        current, total = int(available), 0
        for layer in range(num_layers):
            if selection.stages and layer in selection.stages:
                current = len(selection.stages[layer][i])
            total += current
        out.append(total / num_layers)
    return out
