"""PyTorch reference of the fused score-and-gather hot path (any device; the ground truth for the Triton kernel).

It materialises the [B, H, R, T] attention rows in float32 (R query rows, never the [L, L] map), so it is cheap
whenever R is small; the Triton path computes the same numbers without storing them.
"""

from __future__ import annotations

import torch

from .common import ScoreGather, ScoreGatherArgs, repeat_kv_heads, select


def row_logits(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """q [B, H, R, d], k [B, Hkv, N, d], additive mask [B, H, R, N] -> float32 logits [B, H, R, N]."""
    logits = torch.matmul(q.float(), repeat_kv_heads(k, q.shape[1]).float().transpose(-1, -2)) * scale
    return logits if mask is None else logits + mask.float()


def reference_scores(a: ScoreGatherArgs) -> torch.Tensor:
    """[B, T] float32: sum_h sum_r w[b, r] * softmax_row(b, h, r)[t] / H."""
    logits = row_logits(a.q, a.k, a.key_mask, a.scale)
    if a.lse is not None:
        total = a.lse
    elif a.context_k is not None:
        ctx = row_logits(a.q, a.context_k, a.context_mask, a.scale)
        total = torch.logsumexp(torch.cat([ctx, logits], dim=-1), dim=-1)
    else:
        total = torch.logsumexp(logits, dim=-1)
    finite = torch.isfinite(total)
    # A fully masked row (lse = -inf) contributes nothing instead of NaN.
    probs = torch.exp(logits - torch.where(finite, total, torch.zeros_like(total))[..., None])
    probs = torch.where(finite[..., None], probs, torch.zeros_like(probs))
    return torch.einsum("bhrt,br->bt", probs, a.row_weights) / a.q.shape[1]


def reference_probs(a: ScoreGatherArgs) -> torch.Tensor:
    """[B, H, R, T] float32 softmax probabilities of each query row over the candidate keys (normalised as in
    :func:`reference_scores`); a fully masked row is all zeros."""
    logits = row_logits(a.q, a.k, a.key_mask, a.scale)
    if a.lse is None and a.context_k is None:
        probs = torch.softmax(logits, dim=-1)
        return torch.nan_to_num(probs, nan=0.0)  # softmax of an all -inf row is NaN
    if a.lse is not None:
        total = a.lse
    else:
        assert a.context_k is not None
        ctx = row_logits(a.q, a.context_k, a.context_mask, a.scale)
        total = torch.logsumexp(torch.cat([ctx, logits], dim=-1), dim=-1)
    finite = torch.isfinite(total)
    probs = torch.exp(logits - torch.where(finite, total, torch.zeros_like(total))[..., None])
    return torch.where(finite[..., None], probs, torch.zeros_like(probs))


def score_and_gather_torch(a: ScoreGatherArgs) -> ScoreGather:
    scores = reference_scores(a)
    if a.out_scores is not None:
        a.out_scores.copy_(scores)
        scores = a.out_scores
    idx = select(scores, a.keep, a.candidates)
    x_idx = idx[:, :, None].expand(-1, -1, a.x.shape[2])
    if a.out_x is not None:
        torch.gather(a.x, 1, x_idx, out=a.out_x)
        x = a.out_x
    else:
        x = torch.gather(a.x, 1, x_idx)
    positions = None
    if a.positions is not None:
        if a.out_positions is not None:
            torch.gather(a.positions, 1, idx, out=a.out_positions)
            positions = a.out_positions
        else:
            positions = torch.gather(a.positions, 1, idx)
    return ScoreGather(scores=scores, indices=idx, x=x, positions=positions)
