"""Argument checking, normalisation and top-k selection shared by the PyTorch and Triton score-and-gather paths.

Both backends receive the same :class:`ScoreGatherArgs` (built by :func:`prepare`), so they agree on every shape rule,
mask convention and edge case; only the score computation and the gather differ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ScoreGather:
    """Result of :func:`vtokprune.kernels.score_and_gather`.

    scores:    [B, T] float32, head- and row-averaged softmax attention each candidate token receives.
    indices:   [B, keep] int64, the kept token indices in ascending order.
    x:         [B, keep, D] the kept hidden states (dtype of the input `x`).
    positions: [B, keep] the kept positions (dtype of the input), or None when no positions were given.
    """

    scores: torch.Tensor
    indices: torch.Tensor
    x: torch.Tensor
    positions: torch.Tensor | None


@dataclass
class ScoreGatherArgs:
    """Validated, normalised inputs. Masks are additive, broadcast (stride-0 views) to [B, H, R, T] / [B, H, R, S]."""

    q: torch.Tensor  # [B, H, R, d]
    k: torch.Tensor  # [B, Hkv, T, d]
    x: torch.Tensor  # [B, T, D]
    positions: torch.Tensor | None  # [B, T]
    keep: int
    scale: float
    key_mask: torch.Tensor | None  # [B, H, R, T] additive (float), possibly an expanded view
    lse: torch.Tensor | None  # [B, H, R] float32, total normaliser given by the caller
    context_k: torch.Tensor | None  # [B, Hkv, S, d]
    context_mask: torch.Tensor | None  # [B, H, R, S] additive
    row_weights: torch.Tensor  # [B, R] float32, weight of each query row (sums to 1 per sample, or 0 if none valid)
    candidates: torch.Tensor | None  # [B, T] bool
    out_scores: torch.Tensor | None
    out_x: torch.Tensor | None
    out_positions: torch.Tensor | None

    @property
    def group(self) -> int:
        return self.q.shape[1] // self.k.shape[1]


def _additive_mask(mask: torch.Tensor | None, b: int, h: int, r: int, n: int, name: str) -> torch.Tensor | None:
    """[B, n] or [B, 1|H, 1|R, n], bool (True = attend) or additive float -> additive view of shape [B, H, R, n]."""
    if mask is None:
        return None
    if mask.dim() == 2:
        mask = mask[:, None, None, :]
    if mask.dim() != 4 or mask.shape[0] != b or mask.shape[1] not in (1, h) or mask.shape[2] not in (1, r):
        raise ValueError(
            f"{name} must be [B, {n}] or [B, 1|H, 1|R, {n}] with B={b}, H={h}, R={r}; got {tuple(mask.shape)}"
        )
    if mask.shape[3] != n:
        raise ValueError(f"{name} has {mask.shape[3]} key columns, expected {n}")
    if mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=torch.float32, device=mask.device)
        mask = torch.where(mask, zero, torch.full_like(zero, -torch.inf))
    elif not mask.dtype.is_floating_point:
        raise TypeError(f"{name} must be boolean (True = attend) or an additive float mask, got {mask.dtype}")
    return mask.expand(b, h, r, n)


def prepare(
    q: torch.Tensor,
    k: torch.Tensor,
    x: torch.Tensor,
    positions: torch.Tensor | None,
    keep: int,
    *,
    key_mask: torch.Tensor | None = None,
    scaling: float | None = None,
    lse: torch.Tensor | None = None,
    context_k: torch.Tensor | None = None,
    context_mask: torch.Tensor | None = None,
    row_valid: torch.Tensor | None = None,
    candidates: torch.Tensor | None = None,
    out_scores: torch.Tensor | None = None,
    out_x: torch.Tensor | None = None,
    out_positions: torch.Tensor | None = None,
) -> ScoreGatherArgs:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q must be [B, H, R, d] and k [B, Hkv, T, d]; got {tuple(q.shape)} and {tuple(k.shape)}")
    b, h, r, d = q.shape
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k {tuple(k.shape)} does not match q {tuple(q.shape)} (batch and head dim must agree)")
    hkv, t = k.shape[1], k.shape[2]
    if hkv == 0 or h % hkv:
        raise ValueError(f"query heads ({h}) must be a multiple of key heads ({hkv})")
    if r == 0 or t == 0:
        raise ValueError("need at least one query row and one candidate key")
    if x.dim() != 3 or x.shape[:2] != (b, t):
        raise ValueError(f"x must be [B, T, D] = [{b}, {t}, D]; got {tuple(x.shape)}")
    if positions is not None and positions.shape != (b, t):
        raise ValueError(f"positions must be [B, T] = [{b}, {t}]; got {tuple(positions.shape)}")
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= t:
        raise ValueError(f"keep must be an int in [1, {t}], got {keep!r}")
    if lse is not None and context_k is not None:
        raise ValueError(
            "give either lse= (the full normaliser) or context_k= (extra keys to normalise over), not both"
        )
    if lse is not None and lse.shape != (b, h, r):
        raise ValueError(f"lse must be [B, H, R] = [{b}, {h}, {r}]; got {tuple(lse.shape)}")
    ctx_mask = None
    if context_k is not None:
        if context_k.dim() != 4 or context_k.shape[0] != b or context_k.shape[1] != hkv or context_k.shape[3] != d:
            raise ValueError(f"context_k must be [B, Hkv, S, d] = [{b}, {hkv}, S, {d}]; got {tuple(context_k.shape)}")
        ctx_mask = _additive_mask(context_mask, b, h, r, context_k.shape[2], "context_mask")
    elif context_mask is not None:
        raise ValueError("context_mask given without context_k")
    if row_valid is None:
        weights = torch.full((b, r), 1.0 / r, dtype=torch.float32, device=q.device)
    else:
        if row_valid.shape != (b, r) or row_valid.dtype != torch.bool:
            raise ValueError(f"row_valid must be a bool [B, R] = [{b}, {r}] tensor")
        valid = row_valid.to(torch.float32)
        weights = valid / valid.sum(dim=1, keepdim=True).clamp(min=1.0)
    if candidates is not None and (candidates.shape != (b, t) or candidates.dtype != torch.bool):
        raise ValueError(f"candidates must be a bool [B, T] = [{b}, {t}] tensor")
    for name, out, shape, dtype in (
        ("out_scores", out_scores, (b, t), torch.float32),
        ("out_x", out_x, (b, keep, x.shape[2]), x.dtype),
        ("out_positions", out_positions, (b, keep), None if positions is None else positions.dtype),
    ):
        if out is None:
            continue
        if name == "out_positions" and positions is None:
            raise ValueError("out_positions given without positions")
        if tuple(out.shape) != shape or out.dtype != dtype or out.device != x.device:
            raise ValueError(f"{name} must be a {dtype} tensor of shape {shape} on {x.device}")
    return ScoreGatherArgs(
        q=q,
        k=k,
        x=x,
        positions=positions,
        keep=keep,
        scale=float(scaling) if scaling is not None else d**-0.5,
        key_mask=_additive_mask(key_mask, b, h, r, t, "key_mask"),
        lse=None if lse is None else lse.float(),
        context_k=context_k,
        context_mask=ctx_mask,
        row_weights=weights,
        candidates=candidates,
        out_scores=out_scores,
        out_x=out_x,
        out_positions=out_positions,
    )


def select(scores: torch.Tensor, keep: int, candidates: torch.Tensor | None = None) -> torch.Tensor:
    """Top-`keep` indices along the last dim, ascending; ties to the lower index; NaN and non-candidates rank last.

    A full sort (`torch.sort(stable=True)`) rather than `torch.topk`, whose tie order is unspecified on CUDA, on both
    backends: the scores are only [B, T], so this is a few microseconds on a GPU, and the kept set never depends on
    the backend or on the batch composition.
    """
    s = scores.float()
    s = torch.where(torch.isnan(s), torch.full_like(s, -torch.inf), s)
    if candidates is not None:
        s = s.masked_fill(~candidates, -torch.inf)
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :keep]
    return torch.sort(order, dim=-1).values


def select_per_group(scores: torch.Tensor, groups: torch.Tensor, budgets: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: for every row, the `budgets[b, g]` highest-scoring tokens of each group g (`groups[b, t]` = g,
    -1 for tokens that are no candidates). The same ranking as :func:`select` (one stable sort of the row: ties to
    the lower index, NaN last), so a group's kept set never depends on the other groups, the batch or the backend."""
    s = scores.float()
    s = torch.where(torch.isnan(s), torch.full_like(s, -torch.inf), s).masked_fill(groups < 0, -torch.inf)
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    group_sorted = torch.gather(groups, 1, order)
    rank_sorted = torch.zeros_like(order)
    for g in range(budgets.shape[1]):
        in_group = group_sorted == g
        rank_sorted = torch.where(in_group, torch.cumsum(in_group.long(), dim=1) - 1, rank_sorted)
    budget_sorted = torch.gather(budgets.to(order.device), 1, group_sorted.clamp(min=0))
    chosen_sorted = (group_sorted >= 0) & (rank_sorted < budget_sorted)
    return torch.zeros_like(groups, dtype=torch.bool).scatter(1, order, chosen_sorted)


def repeat_kv_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, Hkv, L, d] -> [B, num_heads, L, d] for grouped-query attention."""
    groups = num_heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)
