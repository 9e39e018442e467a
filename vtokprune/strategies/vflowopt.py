"""VFlowOpt (decoder side): attention + entropy importance, progressive pruning with recycling; tuned by search."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import BudgetError
from .base import LLMContext, LLMStrategy
from .fastv import last_token_attention_scores
from .pdrop import geometric_counts, place_stages, validate_layers, validate_reference
from .registry import register_strategy
from .sparsevlm import kept_mask, recycle_pruned


def feature_entropy(hidden: torch.Tensor) -> torch.Tensor:
    """[B, L, D] -> [B, L] entropy of each token's normalised feature magnitudes, p_d = |h_d| / sum |h|."""
    mag = hidden.float().abs()
    p = mag / mag.sum(dim=-1, keepdim=True).clamp(min=1e-12)
    return -(p * torch.log(p.clamp(min=1e-12))).sum(dim=-1)


def share_of_visual(values: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
    """Each visual token's value divided by its sample's sum over visual tokens (0 elsewhere); values >= 0."""
    v = values.float().clamp(min=0).masked_fill(~image_mask, 0.0)
    return v / v.sum(dim=1, keepdim=True).clamp(min=1e-12)


@register_strategy
@dataclass(frozen=True)
class VFlowOpt(LLMStrategy):
    """VFlowOpt: token importance from attention and information content, progressive pruning, recycling.

    Yang et al., "VFlowOpt: A Token Pruning Framework for LMMs with Visual Information Flow-Guided Optimization"
    (ICCV 2025). At each stage, importance_j = (1 - w) * a_j + w * e_j, with a_j the share of the last token's
    head-averaged attention that visual token j gets (layer before the stage) and e_j its share of the visual tokens'
    entropy; the top tokens survive, and the top `recycle_top` fraction of the pruned ones (by importance) are merged
    into the kept token each is most similar to (cosine, importance-weighted, as SparseVLM's recycling here).
    Stages (`layers`, scaled from `reference_layers`) shrink geometrically to `keep` / ceil(ratio * T) after the last.
    The hyper-parameters (`entropy_weight`, `recycle_top`) are what `vtokprune search --method vflowopt` fits to
    keep the pruned model's answers equal to the unpruned model's on calibration data (no labels).

    Departures from the official code (sihany077/VFlowOpt, built on LLaVA-OneVision): the official entropy is that
    of each image patch's pixels, measured before the vision tower, and part of its pruning runs inside the vision
    tower; here everything happens in the decoder, and the entropy is that of the token's own feature magnitudes at
    the stage (the pixels are not available there). The official optimiser matches the visual information flow
    (hidden states) of the pruned and unpruned model with a search over more parameters; here the objective is
    answer agreement, over two parameters.
    """

    positions: str = "contiguous"

    layers: tuple[int, ...] = (4, 12, 20)
    reference_layers: int | None = 32
    entropy_weight: float = 0.5
    recycle: bool = True
    recycle_top: float = 0.3

    name: ClassVar[str] = "vflowopt"
    paper: ClassVar[str] = "VFlowOpt (Yang et al., ICCV 2025)"

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_reference(self.reference_layers)
        object.__setattr__(self, "layers", validate_layers(self.layers, "vflowopt layers"))
        w = self.entropy_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0.0 <= w <= 1.0:
            raise BudgetError(f"vflowopt entropy_weight must be in [0, 1], got {w!r}")
        top = self.recycle_top
        if isinstance(top, bool) or not isinstance(top, (int, float)) or not 0.0 < top <= 1.0:
            raise BudgetError(f"vflowopt recycle_top must be in (0, 1], got {top!r}")
        if not isinstance(self.recycle, bool):
            raise BudgetError(f"vflowopt recycle must be a bool, got {self.recycle!r}")

    def schedule(self, num_layers: int, available: int) -> dict[int, int]:
        counts = geometric_counts(available, len(self.layers), self.budget(available))
        return place_stages(self.layers, counts, num_layers, self.reference_layers)

    def score(self, probs: torch.Tensor, row_valid: torch.Tensor, ctx: LLMContext) -> torch.Tensor:
        return last_token_attention_scores(probs)

    def stage_scores(
        self, scores: torch.Tensor, hidden: torch.Tensor, ctx: LLMContext, image_ids: torch.Tensor, budget: torch.Tensor
    ) -> torch.Tensor:
        w = float(self.entropy_weight)
        attention = share_of_visual(scores, ctx.image_mask)
        if w == 0.0:
            return attention.to(scores.dtype)
        entropy = share_of_visual(feature_entropy(hidden), ctx.image_mask)
        return ((1.0 - w) * attention + w * entropy).to(scores.dtype)

    def merge(
        self, hidden: torch.Tensor, keep_idx: torch.Tensor, ctx: LLMContext, scores: torch.Tensor
    ) -> torch.Tensor | None:
        if not self.recycle:
            return None
        keep = kept_mask(keep_idx, ctx.image_mask)
        pruned = ctx.image_mask & ~keep
        if not bool(pruned.any()):
            return None
        weights = scores.masked_fill(~ctx.image_mask, 0.0)
        return recycle_pruned(hidden, keep & ctx.image_mask, pruned, weights, top=float(self.recycle_top))
