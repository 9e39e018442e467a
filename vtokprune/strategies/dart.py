"""DART (decoder side): keep the visual tokens least duplicated by a few pivot tokens; no attention weights needed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..errors import BudgetError
from .base import LLMContext, LLMStrategy
from .registry import register_strategy


def pivot_quotas(slots: int, pivots: int) -> list[int]:
    """`slots` split over `pivots` as evenly as possible, earlier pivots first: 10 over 4 -> [3, 3, 2, 2]."""
    if pivots <= 0:
        return []
    base, extra = divmod(slots, pivots)
    return [base + (1 if i < extra else 0) for i in range(pivots)]


def dart_select_one(
    hidden: torch.Tensor,
    key_norm: torch.Tensor,
    visual: torch.Tensor,
    text: torch.Tensor,
    k: int,
    image_pivots: int,
    text_pivots: int,
) -> torch.Tensor:
    """One image: hidden [L, D], key_norm [L], visual / text [L] bool -> [k] kept positions (in selection order).

    Pivots: the `image_pivots` visual tokens and the `text_pivots` text tokens with the largest key L1 norm (stable
    ties). The image pivots are kept; the other k - |image pivots| slots are split over all pivots (image pivots
    first, each group by descending norm) by :func:`pivot_quotas`, and each pivot in turn keeps its quota of the
    not yet kept visual tokens least similar to it (cosine of hidden states, stable ties).
    """
    vis = torch.nonzero(visual, as_tuple=True)[0]
    txt = torch.nonzero(text, as_tuple=True)[0]
    norms = key_norm.float()
    p_img = min(image_pivots, k, vis.numel())
    img_piv = vis[torch.sort(norms[vis], descending=True, stable=True).indices[:p_img]]
    txt_piv = txt[torch.sort(norms[txt], descending=True, stable=True).indices[: min(text_pivots, txt.numel())]]
    pivots = torch.cat([img_piv, txt_piv])
    kept = [int(p) for p in img_piv]
    available = torch.ones(vis.numel(), dtype=torch.bool, device=vis.device)
    available[torch.isin(vis, img_piv)] = False
    h = F.normalize(hidden.float(), dim=-1)
    for pivot, quota in zip(pivots.tolist(), pivot_quotas(k - p_img, pivots.numel())):
        if quota == 0:
            continue
        sim = (h[vis] @ h[pivot]).masked_fill(~available, torch.inf)
        take = torch.sort(sim, stable=True).indices[:quota]
        available[take] = False
        kept += vis[take].tolist()
    return torch.tensor(kept, dtype=torch.long, device=hidden.device)


@register_strategy
@dataclass(frozen=True)
class DART(LLMStrategy):
    """DART: before decoder layer K, keep the visual tokens least similar to a few pivot tokens.

    Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More"
    (EMNLP 2025). Pivots are the `image_pivots` visual tokens and the `text_pivots` instruction tokens with the
    largest L1 norm of their keys at layer K-1 (heads concatenated); each pivot p keeps the visual tokens j with the
    smallest cos(h_p, h_j) among those not yet kept, h the hidden states entering layer K
    (:func:`dart_select_one`). Official defaults (LLaVA-1.5): K = 2, 4 image and 4 text pivots. Needs no attention
    weights, so it is allowed with any attention implementation.

    Departures, each for an exact budget or a deterministic result: the official code gives every pivot
    floor(budget / 8) tokens and keeps the image pivots on top (slightly more than the budget, e.g. 4 + 8*16 for
    128), here pivots share exactly k - |image pivots|; the official pivots are visited in Python-set order, here
    image pivots then text pivots, each by descending norm; instruction tokens are all real text tokens after the
    sample's last visual token (the official code takes everything after the image); the official code compares the
    final-norm-ed hidden states, here the raw ones (cosine ignores scale, not RMSNorm's per-channel gain).
    """

    layer: int = 2
    image_pivots: int = 4
    text_pivots: int = 4

    name: ClassVar[str] = "dart"
    paper: ClassVar[str] = "DART (Wen et al., EMNLP 2025)"
    needs_attention: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        for field_name, low in (("layer", 1), ("image_pivots", 0), ("text_pivots", 0)):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise BudgetError(f"dart {field_name} must be an int >= {low}, got {value!r}")
        if self.image_pivots + self.text_pivots == 0:
            raise BudgetError("dart needs at least one pivot (image_pivots + text_pivots >= 1)")

    def schedule(self, num_layers: int, available: int) -> dict[int, int]:
        return {self.layer: self.budget(available)}

    def key_scores(self, key: torch.Tensor, ctx: LLMContext) -> torch.Tensor:
        return key.float().abs().sum(dim=-1).sum(dim=1)  # L1 norm over heads and dims: [B, L]

    def stage_scores(
        self, scores: torch.Tensor, hidden: torch.Tensor, ctx: LLMContext, image_ids: torch.Tensor, budget: torch.Tensor
    ) -> torch.Tensor:
        out = torch.full_like(scores, -torch.inf, dtype=torch.float32)
        positions = torch.arange(scores.shape[1], device=scores.device)
        for b in range(scores.shape[0]):
            visual_b = image_ids[b] >= 0
            if not bool(visual_b.any()):
                continue
            last_visual = int(positions[visual_b].max())
            text = ctx.text_mask[b] & (positions > last_visual)
            for j in range(budget.shape[1]):
                visual = image_ids[b] == j
                k = int(budget[b, j])
                if k == 0 or not bool(visual.any()):
                    continue
                kept = dart_select_one(hidden[b], scores[b], visual, text, k, self.image_pivots, self.text_pivots)
                # selection order as descending scores, so the runtime's per-image top-k keeps exactly `kept`
                out[b, kept] = torch.arange(kept.numel(), 0, -1, device=scores.device, dtype=torch.float32)
        return out
