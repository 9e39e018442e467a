"""SparseVLM (decoder side): text raters score the visual tokens, pruned tokens are recycled into the kept ones."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..errors import BudgetError
from ..registry import register_strategy
from .base import LLMContext, LLMStrategy
from .pdrop import geometric_counts, place_stages, validate_layers, validate_reference


def text_query_rows(ctx: LLMContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Every real text token (and the last real token) of each sample, ascending, as a fixed-width [B, R] index.

    Samples with fewer such tokens are padded with their last real token and valid=False, so every requested row is
    a real query (never a fully masked one). The last valid row of each sample is its last real token.
    """
    b, length = ctx.valid.shape
    positions = torch.arange(length, device=ctx.valid.device).expand(b, length)
    wanted = ctx.text_mask | (positions == ctx.last_index[:, None])
    counts = wanted.sum(dim=1)
    width = max(int(counts.max().item()) if b else 0, 1)
    # Wanted positions first, in order: sort by (not wanted, position).
    order = torch.sort(torch.where(wanted, positions, positions + length), dim=1).values[:, :width]
    valid = torch.arange(width, device=order.device)[None, :] < counts[:, None]
    rows = torch.where(valid, order, ctx.last_index[:, None].clamp(min=0).expand(b, width))
    return rows, valid


def rater_mask(probs: torch.Tensor, row_valid: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
    """[B, R] text raters: valid rows whose head-averaged attention mass on visual tokens is >= the sample's mean.

    relevance_r = (1/H) sum_h sum_{j visual} A_h[r, j]; raters = {r : relevance_r >= mean over valid rows}. The row
    with the largest relevance always qualifies, so a sample with valid rows has at least one rater.
    """
    vis = image_mask[:, None, None, :].to(probs.dtype)
    relevance = torch.nan_to_num((probs * vis).sum(dim=-1).mean(dim=1))  # [B, R]
    relevance = relevance.masked_fill(~row_valid, 0.0)
    mean = relevance.sum(dim=1, keepdim=True) / row_valid.sum(dim=1, keepdim=True).clamp(min=1)
    return row_valid & (relevance >= mean)


def rater_scores(probs: torch.Tensor, row_valid: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
    """SparseVLM visual-token score: [B, L] mean over raters r and heads h of A_h[r, j]."""
    raters = rater_mask(probs, row_valid, image_mask)
    weights = raters.to(probs.dtype)[:, None, :, None]  # [B, 1, R, 1]
    total = torch.nan_to_num(probs).mul(weights).sum(dim=2).mean(dim=1)  # [B, L]
    return total / raters.sum(dim=1, keepdim=True).clamp(min=1).to(total.dtype)


def _padded_positions(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L] bool -> ([B, N] positions of the True entries ascending, padded with 0; [B, N] validity)."""
    b, length = mask.shape
    positions = torch.arange(length, device=mask.device).expand(b, length)
    counts = mask.sum(dim=1)
    width = int(counts.max().item()) if b else 0
    order = torch.sort(torch.where(mask, positions, positions + length), dim=1).values[:, :width]
    valid = torch.arange(width, device=mask.device)[None, :] < counts[:, None]
    return torch.where(valid, order, torch.zeros_like(order)), valid


def recycle_pruned(
    hidden: torch.Tensor,
    kept: torch.Tensor,
    pruned: torch.Tensor,
    scores: torch.Tensor,
    eps: float = 1e-12,
) -> torch.Tensor:
    """Merge each pruned visual token into the kept visual token of its sample it is most similar to.

    hidden [B, L, D]; kept / pruned [B, L] bool (disjoint sets of visual positions); scores [B, L] (>= 0 weights).
    For a kept token k with absorbed set P_k = {p pruned : k = argmax_{k'} cos(h_p, h_k')}:
        h_k' = (w_k h_k + sum_{p in P_k} w_p h_p) / (w_k + sum_{p in P_k} w_p),   w = max(score, eps).
    Kept tokens that absorb nothing (and every other position) are returned bit-identical.
    """
    if not bool(pruned.any()) or not bool(kept.any()):
        return hidden
    b, _, d = hidden.shape
    kpos, kvalid = _padded_positions(kept)  # [B, K]
    ppos, pvalid = _padded_positions(pruned)  # [B, P]
    h = hidden.float()
    hk = torch.gather(h, 1, kpos[..., None].expand(b, kpos.shape[1], d))
    hp = torch.gather(h, 1, ppos[..., None].expand(b, ppos.shape[1], d))
    sim = F.normalize(hp, dim=-1) @ F.normalize(hk, dim=-1).transpose(1, 2)  # [B, P, K]
    sim = sim.masked_fill(~kvalid[:, None, :], -torch.inf)
    target = sim.argmax(dim=-1)  # [B, P] first maximum on ties
    w = scores.float().clamp(min=eps)
    wk = torch.gather(w, 1, kpos) * kvalid
    wp = torch.gather(w, 1, ppos) * pvalid
    num = hk * wk[..., None]
    num = num.scatter_add(1, target[..., None].expand(b, target.shape[1], d), hp * wp[..., None])
    den = wk.scatter_add(1, target, wp)
    absorbed = torch.zeros_like(kvalid, dtype=torch.long).scatter_add(1, target, pvalid.long()) > 0  # [B, K]
    absorbed &= kvalid
    merged = (num / den.clamp(min=eps)[..., None]).to(hidden.dtype)
    out = hidden.clone()
    rows = torch.arange(b, device=hidden.device)[:, None].expand_as(kpos)
    out[rows[absorbed], kpos[absorbed]] = merged[absorbed]
    return out


@register_strategy
@dataclass(frozen=True)
class SparseVLM(LLMStrategy):
    """SparseVLM: text tokens relevant to the image rate the visual tokens; pruned tokens are recycled.

    Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference" (2024).
    At the layer l before each stage, with A = softmax attention of that layer:

    * raters: the text tokens whose head-averaged attention mass on the visual tokens,
      rel_t = (1/H) sum_h sum_{j in V} A_h[t, j], is at least the mean of rel over the sample's text tokens;
    * score_j = (1/(|raters| H)) sum_{t in raters} sum_h A_h[t, j] for each visual token j; the top-k survive;
    * recycling (`recycle=True`): every pruned visual token is merged into the kept visual token it is most
      similar to (cosine similarity of hidden states), a score-weighted average, so its information is not lost.

    Budgets are exact: the last stage keeps `keep` (or ceil(ratio * T)) tokens per image; earlier stages shrink
    geometrically from T towards it (see `geometric_counts`). Default stages: before layers 2, 6 and 15 of a
    32-layer model (`reference_layers`), scaled to the model's depth. Differences from the paper: its rank-based
    adaptive per-layer budget is replaced by this fixed schedule (so budgets are exact), and recycled tokens are
    folded into kept tokens instead of being appended as extra cluster tokens (so counts stay exact).
    """

    layers: tuple[int, ...] = (2, 6, 15)
    reference_layers: int | None = 32
    recycle: bool = True

    name: ClassVar[str] = "sparsevlm"
    paper: ClassVar[str] = "SparseVLM (Zhang et al., 2024)"

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_reference(self.reference_layers)
        object.__setattr__(self, "layers", validate_layers(self.layers, "sparsevlm layers"))
        if not isinstance(self.recycle, bool):
            raise BudgetError(f"sparsevlm recycle must be a bool, got {self.recycle!r}")

    def schedule(self, num_layers: int, available: int) -> dict[int, int]:
        counts = geometric_counts(available, len(self.layers), self.budget(available))
        return place_stages(self.layers, counts, num_layers, self.reference_layers)

    def query_rows(self, ctx: LLMContext) -> tuple[torch.Tensor, torch.Tensor]:
        return text_query_rows(ctx)

    def score(self, probs: torch.Tensor, row_valid: torch.Tensor, ctx: LLMContext) -> torch.Tensor:
        return rater_scores(probs, row_valid, ctx.image_mask)

    def merge(
        self, hidden: torch.Tensor, keep_idx: torch.Tensor, ctx: LLMContext, scores: torch.Tensor
    ) -> torch.Tensor | None:
        if not self.recycle:
            return None
        keep = torch.zeros_like(ctx.image_mask)
        rows = torch.arange(keep.shape[0], device=keep.device)[:, None].expand_as(keep_idx)
        ok = keep_idx >= 0
        keep[rows[ok], keep_idx[ok]] = True
        kept = keep & ctx.image_mask
        pruned = ctx.image_mask & ~keep
        if not bool(pruned.any()):
            return None
        return recycle_pruned(hidden, kept, pruned, scores.masked_fill(~ctx.image_mask, 0.0))
