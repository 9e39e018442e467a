"""DivPrune: keep the most diverse subset of the projected features (vision side, no [CLS] needed)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..selection import gather_tokens
from .base import VisionSelection, VisionSignals, VisionStrategy
from .registry import register_strategy


def cosine_distance(x: torch.Tensor) -> torch.Tensor:
    """[T, D] -> [T, T] pairwise 1 - cos(x_i, x_j)."""
    xn = F.normalize(x.float(), dim=-1)
    return 1.0 - xn @ xn.T


def max_min_diverse(dist: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy max-min diversity on a [T, T] distance matrix -> [k] ascending indices.

    First: the token whose nearest other token is farthest, argmax_i min_{j != i} d_ij. Then repeatedly the token
    farthest from the chosen set, argmax_i min_{s in S} d_is. Ties -> lowest index; chosen tokens are never re-picked.
    """
    t = dist.shape[0]
    chosen = torch.zeros(t, dtype=torch.bool, device=dist.device)
    eye = torch.eye(t, dtype=torch.bool, device=dist.device)
    first = int(dist.masked_fill(eye, torch.inf).min(dim=1).values.argmax()) if t > 1 else 0
    picks = [first]
    chosen[first] = True
    nearest = dist[first].clone()  # distance of every token to the chosen set
    for _ in range(k - 1):
        nxt = int(nearest.masked_fill(chosen, -torch.inf).argmax())
        picks.append(nxt)
        chosen[nxt] = True
        nearest = torch.minimum(nearest, dist[nxt])
    return torch.sort(torch.tensor(picks, device=dist.device)).values


@register_strategy
@dataclass(frozen=True)
class DivPrune(VisionStrategy):
    """DivPrune: select the k visual tokens that solve the Max-Min Diversity Problem greedily.

    Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models" (CVPR 2025).
    With d_ij = 1 - cos(x_i, x_j) over the projected features x: S = {argmax_i min_{j != i} d_ij}, then
    S <- S + {argmax_{i not in S} min_{s in S} d_is} until |S| = k. Works on any model (no [CLS] needed).
    """

    positions: str = "contiguous"  # as the official code (see Strategy.positions)

    name: ClassVar[str] = "divprune"
    paper: ClassVar[str] = "DivPrune (Alvar et al., CVPR 2025)"

    def select(self, signals: VisionSignals, k: int) -> VisionSelection:
        feats = signals.features
        n, t = feats.shape[:2]
        if k >= t:
            return VisionSelection(torch.arange(t, device=feats.device).expand(n, t), feats)
        idx = torch.stack([max_min_diverse(cosine_distance(feats[i]), k) for i in range(n)])
        return VisionSelection(idx, gather_tokens(feats, idx))
