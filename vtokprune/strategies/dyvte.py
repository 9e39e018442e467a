"""DyVTE (decoder side): a small learned head decides, per input, the layer after which the visual tokens exit."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import BudgetError, CapabilityError
from .base import LLMContext, LLMStrategy, Strategy
from .fastv import last_token_attention_scores
from .registry import register_strategy


@register_strategy
@dataclass(frozen=True)
class DyVTE(LLMStrategy):
    """DyVTE: visual tokens exit the decoder once the text tokens have taken what they need from them.

    "Dynamic Visual Token Exit" (DyVTE, 2025): a lightweight network reads the text tokens' state at each layer
    and decides whether the visual tokens can leave; from the first layer where it says so, they are removed for all
    later layers (and from the KV cache of those layers). Here the network is :class:`~vtokprune.search.learned.
    BudgetHead` on the last token's hidden state entering layer l (and l / L); the visual tokens exit before the
    first layer l >= `min_layer` with p >= `threshold`. `head=` is the directory of a head trained for this model
    (`vtokprune train-budget --kind dyvte`; `head="embedded"`: the head shipped beside the embedded benchmark
    model). `exit_layer=` instead makes every input exit before that layer (no head; also what the training labels
    are computed with).

    `keep` / `ratio` (optional): the visual tokens that stay after the exit, chosen by the last token's attention
    (FastV's score); without a budget, all of them exit. Departure: the official head reads several text tokens'
    states; this one reads only the last token's. Compute per input varies: `vtokprune.last_selection(model).stages`
    records what each input kept.
    """

    head: str | None = None
    threshold: float = 0.5
    min_layer: int = 1
    exit_layer: int | None = None

    name: ClassVar[str] = "dyvte"
    paper: ClassVar[str] = "DyVTE (dynamic visual token exit, 2025)"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < float(self.threshold) < 1.0:
            raise BudgetError(f"dyvte threshold must be in (0, 1), got {self.threshold!r}")
        for name, value in (("min_layer", self.min_layer), ("exit_layer", self.exit_layer)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise BudgetError(f"dyvte {name} must be an int >= 1, got {value!r}")
        if self.head is not None and self.exit_layer is not None:
            raise BudgetError("dyvte: give head= (learned exit) or exit_layer= (fixed exit), not both")

    def has_budget(self) -> bool:
        return True

    def with_default_budget(self) -> Strategy:
        if self.head is None and self.exit_layer is None:
            raise CapabilityError(
                "dyvte needs a trained exit head: head=DIR (train one: vtokprune train-budget --kind dyvte --out DIR;"
                " head=embedded on the embedded benchmark model), or exit_layer=K for a fixed exit"
            )
        return self

    def _stay(self, available: int) -> int:
        if self.keep is not None:
            return min(self.keep, available)
        return 0 if self.ratio is None else self.budget(available)

    def schedule(self, num_layers: int, available: int) -> dict[int, int]:
        if self.exit_layer is not None:
            if self.exit_layer >= num_layers:
                raise BudgetError(f"dyvte exit_layer={self.exit_layer} is past the last of {num_layers} layers")
            return {self.exit_layer: self._stay(available)}
        return {layer: available for layer in range(self.min_layer, num_layers)}  # each layer may decide the exit

    def stage_budget(
        self, budget: torch.Tensor, hidden: torch.Tensor, ctx: LLMContext, image_ids: torch.Tensor
    ) -> torch.Tensor:
        if self.head is None:
            return budget
        from ..search.learned import check_model, head_output, load_head

        head, config = load_head(self.head, "dyvte")
        check_model(config, ctx.num_layers, hidden.shape[-1], self.head)
        leave = head_output(head, hidden, ctx.last_index, ctx.layer, ctx.num_layers) >= self.threshold
        counts = torch.stack([(image_ids == j).sum(dim=1) for j in range(budget.shape[1])], dim=1)
        stay = torch.tensor([self._stay(int(c)) if c > 0 else 0 for c in counts.flatten()], device=budget.device)
        return torch.where(leave[:, None], torch.minimum(stay.view_as(counts), counts), budget)

    def score(self, probs: torch.Tensor, row_valid: torch.Tensor, ctx: LLMContext) -> torch.Tensor:
        return last_token_attention_scores(probs)
