"""Deterministic top-k selection and gathering helpers shared by every strategy."""

from __future__ import annotations

import torch


def topk_indices(scores: torch.Tensor, k: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the `k` highest scores along the last dim, returned in ascending (original) order.

    Ties are broken by the lower index (a stable sort), so the choice is deterministic and independent of batch
    composition. Entries where `valid` is False are never chosen; NaN scores rank last.
    """
    s = scores.float()
    s = torch.where(torch.isnan(s), torch.full_like(s, -torch.inf), s)
    if valid is not None:
        s = s.masked_fill(~valid, -torch.inf)
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.sort(order, dim=-1).values


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x: [N, T, D], idx: [N, k] -> [N, k, D]."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
