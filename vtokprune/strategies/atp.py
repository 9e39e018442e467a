"""ATP-LLaVA (decoder side): a small learned module sets each input's pruning ratio at each stage."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import BudgetError, CapabilityError
from .base import LLMContext, LLMStrategy, Strategy
from .fastv import last_token_attention_scores
from .registry import register_strategy


@register_strategy
@dataclass(frozen=True)
class ATP(LLMStrategy):
    """ATP-LLaVA: instance-specific keep ratios per decoder stage, set by a trained module.

    Ye et al., "ATP-LLaVA: Adaptive Token Pruning for Large Vision Language Models" (CVPR 2025): an adaptive pruning
    module between decoder layers predicts, from the tokens' state, how many visual tokens this input keeps there.
    Here the module is :class:`~vtokprune.search.learned.BudgetHead` on the last token's hidden state entering each
    stage layer (the head's own `layers`, recorded when it was trained); the image keeps ceil(r * n) of its n
    remaining visual tokens, r = max(head output, `min_ratio`), ranked by the last token's attention (FastV's score).
    `head=` is the directory of a head trained for this model (`vtokprune train-budget --kind atp`;
    `head="embedded"`: the head shipped beside the embedded benchmark model).

    `keep` / `ratio` (optional) set a floor: no stage keeps fewer than that many. Departures: the official module
    combines attention- and position-based scores with learned thresholds trained end to end with the LLM; this
    head is trained afterwards, from labels the frozen model gives (the smallest ratio that keeps its answer), and
    the ranking is FastV's. Compute per input varies (`last_selection(model).stages` records it).
    """

    head: str | None = None
    min_ratio: float = 0.05

    name: ClassVar[str] = "atp"
    paper: ClassVar[str] = "ATP-LLaVA (Ye et al., CVPR 2025)"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.min_ratio, bool) or not 0.0 < float(self.min_ratio) <= 1.0:
            raise BudgetError(f"atp min_ratio must be in (0, 1], got {self.min_ratio!r}")

    def has_budget(self) -> bool:
        return True

    def with_default_budget(self) -> Strategy:
        if self.head is None:
            raise CapabilityError(
                "atp needs a trained ratio module: head=DIR (train one: vtokprune train-budget --kind atp --out DIR;"
                " head=embedded on the embedded benchmark model)"
            )
        return self

    def _layers(self) -> list[int]:
        from ..search.learned import load_head

        assert self.head is not None
        return [int(x) for x in load_head(self.head, "atp")[1]["layers"]]

    def schedule(self, num_layers: int, available: int) -> dict[int, int]:
        if self.head is None:
            raise CapabilityError("atp needs head=DIR (a trained ratio module)")
        layers = [layer for layer in self._layers() if 1 <= layer < num_layers]
        return {layer: available for layer in layers}  # the head sets the real budget per input (stage_budget)

    def stage_budget(
        self, budget: torch.Tensor, hidden: torch.Tensor, ctx: LLMContext, image_ids: torch.Tensor
    ) -> torch.Tensor:
        from ..search.learned import check_model, head_output, load_head

        assert self.head is not None
        head, config = load_head(self.head, "atp")
        check_model(config, ctx.num_layers, hidden.shape[-1], self.head)
        ratio = head_output(head, hidden, ctx.last_index, ctx.layer, ctx.num_layers).clamp(min=float(self.min_ratio))
        out = torch.zeros_like(budget)
        for j in range(budget.shape[1]):
            counts = (image_ids == j).sum(dim=1)
            for i in range(budget.shape[0]):
                n = int(counts[i])
                if n:
                    floor = min(n, self.keep) if self.keep is not None else math.ceil(float(self.ratio or 0) * n)
                    out[i, j] = min(n, max(floor, 1, math.ceil(float(ratio[i]) * n - 1e-9)))
        return out

    def score(self, probs: torch.Tensor, row_valid: torch.Tensor, ctx: LLMContext) -> torch.Tensor:
        return last_token_attention_scores(probs)
