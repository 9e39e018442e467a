"""SparseVLM (decoder side): text raters score the visual tokens, pruned tokens are recycled into the kept ones."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..errors import BudgetError
from .base import LLMContext, LLMStrategy
from .pdrop import geometric_counts, place_stages, validate_layers, validate_reference
from .registry import register_strategy


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


def embedding_raters(ctx: LLMContext) -> torch.Tensor:
    """[B, L] the official text raters, chosen once from the decoder's input embeddings, at current positions.

    Per sample, with V its visual tokens and T its text tokens after the last visual one (LM level):
    m_t = mean_{v in V} softmax_{t' in T}(e_v . e_t')_t, raters = {t : m_t > mean(m)} (strictly), as the official
    code. Samples without such text get no raters.
    """
    assert ctx.inputs_embeds is not None and ctx.lm_image_mask is not None and ctx.lm_valid is not None
    assert ctx.cols is not None
    emb = ctx.inputs_embeds.float()
    b, length = ctx.lm_valid.shape
    positions = torch.arange(length, device=emb.device)
    lm_raters = torch.zeros(b, length, dtype=torch.bool, device=emb.device)
    for i in range(b):
        visual = ctx.lm_image_mask[i]
        if not bool(visual.any()):
            continue
        text = ctx.lm_valid[i] & ~visual & (positions > int(positions[visual].max()))
        if not bool(text.any()):
            continue
        m = torch.softmax(emb[i, visual] @ emb[i, text].T, dim=1).mean(dim=0)
        lm_raters[i, positions[text][m > m.mean()]] = True
    current = torch.gather(lm_raters, 1, ctx.cols.clamp(min=0))
    return current & (ctx.cols >= 0) & ctx.valid


def masked_query_rows(mask: torch.Tensor, fallback: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L] bool -> ([B, R] positions of the True entries, [B, R] validity); a sample with none queries its
    `fallback` [B] position (valid), so every sample rates with at least one row."""
    b, length = mask.shape
    empty = ~mask.any(dim=1)
    mask = mask.clone()
    mask[empty, fallback[empty]] = True
    rows, valid = _padded_positions(mask)
    rows = torch.where(valid, rows, fallback[:, None].expand_as(rows))
    return rows, valid


def mean_row_scores(probs: torch.Tensor, row_valid: torch.Tensor) -> torch.Tensor:
    """[B, H, R, L] rows of the raters -> [B, L] mean over valid rows and heads."""
    weights = row_valid.to(probs.dtype)[:, None, :, None]
    total = torch.nan_to_num(probs).mul(weights).sum(dim=2).mean(dim=1)
    return total / row_valid.sum(dim=1, keepdim=True).clamp(min=1).to(total.dtype)


def _padded_positions(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L] bool -> ([B, N] positions of the True entries ascending, padded with 0; [B, N] validity)."""
    b, length = mask.shape
    positions = torch.arange(length, device=mask.device).expand(b, length)
    counts = mask.sum(dim=1)
    width = int(counts.max().item()) if b else 0
    order = torch.sort(torch.where(mask, positions, positions + length), dim=1).values[:, :width]
    valid = torch.arange(width, device=mask.device)[None, :] < counts[:, None]
    return torch.where(valid, order, torch.zeros_like(order)), valid


def kept_mask(keep_idx: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B, L] bool, True at the kept columns `keep_idx` ([B, K], -1 = padding), shaped like the mask `like`."""
    keep = torch.zeros_like(like)
    rows = torch.arange(keep.shape[0], device=keep.device)[:, None].expand_as(keep_idx)
    ok = keep_idx >= 0
    keep[rows[ok], keep_idx[ok]] = True
    return keep


def recycle_pruned(
    hidden: torch.Tensor,
    kept: torch.Tensor,
    pruned: torch.Tensor,
    scores: torch.Tensor,
    eps: float = 1e-12,
    top: float = 1.0,
) -> torch.Tensor:
    """Merge each pruned visual token into the kept visual token of its sample it is most similar to.

    hidden [B, L, D]; kept / pruned [B, L] bool (disjoint sets of visual positions); scores [B, L] (>= 0 weights).
    With `top` < 1, only the int(top * P) + 1 highest-scoring pruned tokens of each sample are recycled.
    For a kept token k with absorbed set P_k = {p pruned : k = argmax_{k'} cos(h_p, h_k')}:
        h_k' = (w_k h_k + sum_{p in P_k} w_p h_p) / (w_k + sum_{p in P_k} w_p),   w = max(score, eps).
    Kept tokens that absorb nothing (and every other position) are returned bit-identical.
    """
    if not bool(pruned.any()) or not bool(kept.any()):
        return hidden
    if top < 1.0:
        counts = pruned.sum(dim=1, keepdim=True)
        rank = torch.sort(
            torch.sort(scores.float().masked_fill(~pruned, -torch.inf), dim=1, descending=True, stable=True).indices,
            dim=1,
        ).indices
        pruned = pruned & (rank < (counts.float() * top).floor().long() + 1)
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

    Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference" (2024),
    following the official v1.0 code (Gumpest/SparseVLMs, `modelling_sparse_llama.py`) by default:

    * raters (`raters="embeddings"`): chosen once, from the decoder's input embeddings: the text tokens after the
      image whose m_t = mean_v softmax_t(e_v . e_t) is strictly above the mean (:func:`embedding_raters`);
      `raters="attention"` re-chooses them at every stage as the text tokens (all of them) whose head-averaged
      attention mass on the visual tokens is at least the mean (this library's earlier behaviour);
    * score_j = mean over raters r and heads h of A_h[r, j]; the top-k visual tokens survive;
    * stages: the official layers 2, 6, 15 (of 32) run on all tokens, their own attention scores the visual tokens
      and their output is pruned; here that is a stage before layers 3, 7, 16 scored by the layer before it;
    * recycling (`recycle=True`): the top 30% (`recycle_top`; int(0.3 P) + 1) of the P pruned visual tokens by score
      are merged into the kept visual token each is most similar to (cosine of hidden states), score-weighted.

    Departures, for exact budgets: the paper's rank-based adaptive per-layer budget is replaced by a fixed schedule
    (the last stage keeps `keep` / ceil(ratio * T), earlier stages shrink geometrically, `geometric_counts`); the
    official recycling clusters the recycled tokens into int(n/10) + 1 extra tokens, here they are folded into the
    kept ones so counts stay exact. The official code renumbers positions; see `positions`.
    """

    positions: str = "contiguous"  # as the official code (see Strategy.positions)

    layers: tuple[int, ...] = (3, 7, 16)
    reference_layers: int | None = 32
    recycle: bool = True
    raters: str = "embeddings"
    recycle_top: float = 0.3

    name: ClassVar[str] = "sparsevlm"
    paper: ClassVar[str] = "SparseVLM (Zhang et al., 2024)"
    reads_inputs_embeds: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_reference(self.reference_layers)
        object.__setattr__(self, "layers", validate_layers(self.layers, "sparsevlm layers"))
        if not isinstance(self.recycle, bool):
            raise BudgetError(f"sparsevlm recycle must be a bool, got {self.recycle!r}")
        if self.raters not in ("embeddings", "attention"):
            raise BudgetError(f"sparsevlm raters must be 'embeddings' or 'attention', got {self.raters!r}")
        top = self.recycle_top
        if isinstance(top, bool) or not isinstance(top, (int, float)) or not 0.0 < top <= 1.0:
            raise BudgetError(f"sparsevlm recycle_top must be in (0, 1], got {top!r}")

    def schedule(self, num_layers: int, available: int) -> dict[int, int]:
        counts = geometric_counts(available, len(self.layers), self.budget(available))
        return place_stages(self.layers, counts, num_layers, self.reference_layers)

    def query_rows(self, ctx: LLMContext) -> tuple[torch.Tensor, torch.Tensor]:
        if self.raters == "embeddings" and ctx.inputs_embeds is not None:
            return masked_query_rows(embedding_raters(ctx), ctx.last_index)
        return text_query_rows(ctx)

    def score(self, probs: torch.Tensor, row_valid: torch.Tensor, ctx: LLMContext) -> torch.Tensor:
        if self.raters == "embeddings" and ctx.inputs_embeds is not None:
            return mean_row_scores(probs, row_valid)
        return rater_scores(probs, row_valid, ctx.image_mask)

    def merge(
        self, hidden: torch.Tensor, keep_idx: torch.Tensor, ctx: LLMContext, scores: torch.Tensor
    ) -> torch.Tensor | None:
        if not self.recycle:
            return None
        keep = kept_mask(keep_idx, ctx.image_mask)
        kept = keep & ctx.image_mask
        pruned = ctx.image_mask & ~keep
        if not bool(pruned.any()):
            return None
        weights = scores.masked_fill(~ctx.image_mask, 0.0)
        return recycle_pruned(hidden, kept, pruned, weights, top=float(self.recycle_top))
