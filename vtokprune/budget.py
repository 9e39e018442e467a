"""Token budgets: an absolute count (`keep=64`) or a fraction (`ratio=0.111`), resolved per image."""

from __future__ import annotations

import math
import numbers

from .errors import BudgetError


def normalise_budget(keep: object, ratio: object) -> tuple[object, object]:
    """Accept numpy / torch integer keeps and real ratios (what users get from arrays and tensors) as plain numbers."""
    if keep is not None and not isinstance(keep, (bool, int)):
        if hasattr(keep, "numel") and keep.numel() == 1 and not keep.is_floating_point():  # type: ignore[attr-defined]
            keep = int(keep.item())  # type: ignore[attr-defined]
        elif isinstance(keep, numbers.Integral):
            keep = int(keep)
    if ratio is not None and not isinstance(ratio, (bool, float)):
        if hasattr(ratio, "numel") and ratio.numel() == 1:  # type: ignore[attr-defined]
            ratio = float(ratio.item())  # type: ignore[attr-defined]
        elif isinstance(ratio, numbers.Real):
            ratio = float(ratio)
    return keep, ratio


def validate_budget(keep: int | None, ratio: float | None) -> None:
    """Check a budget at construction time, before any model is touched."""
    if keep is not None and ratio is not None:
        raise BudgetError(f"give either keep= or ratio=, not both (got keep={keep}, ratio={ratio})")
    if keep is not None:
        if isinstance(keep, bool) or not isinstance(keep, int):
            raise BudgetError(f"keep must be a positive int, got {keep!r}; use ratio= for fractions")
        if keep <= 0:
            raise BudgetError(f"keep must be >= 1, got {keep}; to disable pruning use the 'none' strategy")
    bad_ratio = not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0.0 < float(ratio) <= 1.0
    if ratio is not None and bad_ratio:
        raise BudgetError(f"ratio must be in (0, 1], got {ratio!r}")


def resolve_budget(keep: int | None, ratio: float | None, available: int) -> int:
    """Number of tokens to keep out of `available` (per image). Raises if the budget cannot be met."""
    if keep is None and ratio is None:
        raise BudgetError(
            "no budget: pass keep= (visual tokens per image) or ratio= (fraction of them); "
            "to keep every token use the 'none' strategy"
        )
    if keep is not None:
        if keep > available:
            raise BudgetError(
                f"keep={keep} is more than the {available} visual tokens this image has; "
                f"use keep<={available} or ratio= to scale with the image"
            )
        return keep
    assert ratio is not None
    return max(1, min(available, math.ceil(float(ratio) * available - 1e-9)))
