"""FastV (decoder side)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import BudgetError
from .base import LLMContext, LLMStrategy
from .registry import register_strategy


def last_token_attention_scores(probs: torch.Tensor) -> torch.Tensor:
    """[B, H, 1, L] attention of the last token -> [B, L] head-averaged attention each token receives."""
    return probs[:, :, 0].mean(dim=1)


@register_strategy
@dataclass(frozen=True)
class FastV(LLMStrategy):
    """FastV: after decoder layer K, drop the visual tokens that the last token attends to least.

    Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration for Large
    Vision-Language Models" (ECCV 2024). score_j = (1/H) sum_h A^{(K-1)}_h[last, j], the head-averaged attention the
    last token pays to visual token j in layer K-1; tokens outside the top-k stop at layer K. Paper default: K=2,
    R=50% (half of the visual tokens dropped), which is the budget used when neither keep= nor ratio= is given.

    This follows the official code (pkunlp-icler/FastV), which ranks by the last token's attention row; the paper's
    text describes the average attention each token receives (from all queries), which the code does not compute.
    Kept tokens keep their original positions, as in the official code.
    """

    layer: int = 2

    name: ClassVar[str] = "fastv"
    paper: ClassVar[str] = "FastV (Chen et al., ECCV 2024)"
    default_budget: ClassVar[dict[str, Any] | None] = {"ratio": 0.5}

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
            raise BudgetError(f"FastV layer must be an int >= 1 (prune after that many layers), got {self.layer!r}")

    def schedule(self, num_layers: int, available: int) -> dict[int, int]:
        return {self.layer: self.budget(available)}

    def score(self, probs: torch.Tensor, row_valid: torch.Tensor, ctx: LLMContext) -> torch.Tensor:
        return last_token_attention_scores(probs)
