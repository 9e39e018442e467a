"""AdaptInfer (decoder side): text->vision attention re-weighted by a text->text attention prior."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import LLMContext, LLMStrategy
from .pdrop import geometric_counts, place_stages, validate_layers, validate_reference
from .registry import register_strategy
from .sparsevlm import text_query_rows


def text_prior(probs: torch.Tensor, row_valid: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """[B, R] soft prior over the text rows: the head-averaged attention the last real token pays to each of them.

    probs [B, H, R, L] over all keys, rows [B, R] the positions of the query rows (the last valid row of each sample
    is its last real token, as :func:`text_query_rows` returns them). w_t = (1/H) sum_h A_h[last, t], renormalised
    over the valid rows to sum to 1 (uniform if the last token pays them no attention at all).
    """
    b, _, r, _ = probs.shape
    last_row = (row_valid.sum(dim=1) - 1).clamp(min=0)  # [B]
    last = torch.gather(probs, 2, last_row[:, None, None, None].expand(b, probs.shape[1], 1, probs.shape[3]))
    last = torch.nan_to_num(last[:, :, 0].mean(dim=1))  # [B, L] attention of the last token over all keys
    prior = torch.gather(last, 1, rows).masked_fill(~row_valid, 0.0)  # [B, R]
    total = prior.sum(dim=1, keepdim=True)
    uniform = row_valid.to(prior.dtype) / row_valid.sum(dim=1, keepdim=True).clamp(min=1)
    return torch.where(total > 0, prior / total.clamp(min=torch.finfo(prior.dtype).tiny), uniform)


def prior_weighted_scores(probs: torch.Tensor, row_valid: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """AdaptInfer score: [B, L], s_j = sum_t w_t (1/H) sum_h A_h[t, j] with w the text prior of :func:`text_prior`."""
    w = text_prior(probs, row_valid, rows)  # [B, R]
    per_row = torch.nan_to_num(probs).mean(dim=1)  # [B, R, L]
    return torch.einsum("br,brl->bl", w, per_row)


@register_strategy
@dataclass(frozen=True)
class AdaptInfer(LLMStrategy):
    """AdaptInfer: score visual tokens by text->vision attention, each text token weighted by its text->text prior.

    Zhang et al., "AdaptInfer: Adaptive Token Pruning for Vision-Language Model Inference with Dynamical Text
    Guidance" (arXiv 2508.06084, 2025). At the layer l before a stage, with A the head-averaged softmax attention of
    that layer, T the text tokens and `last` the last real (instruction) token:

        w_t = A[last, t] / sum_{t' in T} A[last, t']      (dynamic text prior, re-read at every stage)
        s_j = sum_{t in T} w_t A[t, j]                    for each visual token j

    and the top-k visual tokens go on. Unlike FastV (only the last token's row) every text token votes, weighted by
    how much the last token relies on it at that layer, so the key text tokens may shift from layer to layer.

    Schedule: `layers` (default (2,), FastV's layer, in a `reference_layers`-deep model, default 32, scaled to the
    model's depth; `reference_layers=None` takes them as absolute). The paper derives its stage layers from an
    offline analysis of cross-modal attention shifts per model; pass them as `layers` (several stages shrink
    geometrically to the final budget `keep` / ceil(ratio * T), see `geometric_counts`).
    """

    layers: tuple[int, ...] = (2,)
    reference_layers: int | None = 32

    name: ClassVar[str] = "adaptinfer"
    paper: ClassVar[str] = "AdaptInfer (Zhang et al., 2025)"

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_reference(self.reference_layers)
        object.__setattr__(self, "layers", validate_layers(self.layers, "adaptinfer layers"))

    def schedule(self, num_layers: int, available: int) -> dict[int, int]:
        counts = geometric_counts(available, len(self.layers), self.budget(available))
        return place_stages(self.layers, counts, num_layers, self.reference_layers)

    def query_rows(self, ctx: LLMContext) -> tuple[torch.Tensor, torch.Tensor]:
        return text_query_rows(ctx)

    def score(self, probs: torch.Tensor, row_valid: torch.Tensor, ctx: LLMContext) -> torch.Tensor:
        rows, _ = text_query_rows(ctx)
        return prior_weighted_scores(probs, row_valid, rows)
