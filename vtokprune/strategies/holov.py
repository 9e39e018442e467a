"""HoloV: spread the budget over spatial crops in proportion to their holistic score (vision side)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..errors import BudgetError
from ..registry import register_strategy
from ..selection import gather_tokens, topk_indices
from .base import VisionSelection, VisionSignals, VisionStrategy
from .cls_attention import cls_attention_scores


def grid_crops(grid: tuple[int, int], crops: tuple[int, int]) -> list[torch.Tensor]:
    """Token indices of the rectangular blocks of a rows x cols grid cut into (at most) crops[0] x crops[1] blocks."""
    rows, cols = grid
    cr, cc = min(crops[0], rows), min(crops[1], cols)
    r_edges = [i * rows // cr for i in range(cr + 1)]
    c_edges = [j * cols // cc for j in range(cc + 1)]
    out = []
    for i in range(cr):
        for j in range(cc):
            r = torch.arange(r_edges[i], r_edges[i + 1])
            c = torch.arange(c_edges[j], c_edges[j + 1])
            out.append((r[:, None] * cols + c[None, :]).reshape(-1))
    return out


def chunk_crops(t: int, n: int) -> list[torch.Tensor]:
    """No grid: `n` contiguous runs of near-equal length."""
    n = min(n, t)
    edges = [i * t // n for i in range(n + 1)]
    return [torch.arange(edges[i], edges[i + 1]) for i in range(n)]


def similarity_variance(x: torch.Tensor) -> torch.Tensor:
    """[m, D] tokens of one crop -> [m] variance of each token's cosine similarity to the other m - 1 (0 if m < 2)."""
    m = x.shape[0]
    if m < 2:
        return torch.zeros(m, device=x.device)
    xn = F.normalize(x.float(), dim=-1)
    sim = xn @ xn.T
    off = ~torch.eye(m, dtype=torch.bool, device=x.device)
    sim = sim[off].reshape(m, m - 1)
    return sim.var(dim=1, unbiased=False)


def holistic_scores(attn: torch.Tensor, features: torch.Tensor, alpha: float, eps: float = 1e-6) -> torch.Tensor:
    """s_i = a_i + alpha * v_i * mean(a) / mean(v) for the tokens of one crop (v: similarity variance)."""
    var = similarity_variance(features)
    scale = attn.abs().mean() / (var.abs().mean() + eps)
    return attn + alpha * var * scale


def allocate(weights: torch.Tensor, sizes: torch.Tensor, k: int) -> torch.Tensor:
    """Split k over crops in proportion to `weights`, never above a crop's size, summing to exactly k.

    floor(w_c * k) capped at the size first; the rest go one at a time to the non-full crop with the largest unmet
    quota (ties: larger weight, then lower crop index).
    """
    w = weights.double().clamp(min=0)
    w = w / w.sum() if float(w.sum()) > 0 else sizes.double() / sizes.sum()
    quota = w * k
    alloc = torch.minimum(quota.floor().long(), sizes)
    for _ in range(k - int(alloc.sum())):
        open_ = alloc < sizes
        deficit = torch.where(open_, quota - alloc, torch.full_like(quota, -math.inf))
        best = max(range(len(w)), key=lambda c: (float(deficit[c]), float(w[c]), -c))
        alloc[best] += 1
    return alloc


def holov_select_one(
    features: torch.Tensor, attn: torch.Tensor, crops: list[torch.Tensor], k: int, alpha: float
) -> torch.Tensor:
    """[T, D], [T] -> [k] ascending kept indices of one image."""
    device = features.device
    crops = [c.to(device) for c in crops if c.numel() > 0]
    token_scores = [holistic_scores(attn[c], features[c], alpha) for c in crops]
    crop_scores = torch.stack([s.mean() for s in token_scores])
    sizes = torch.tensor([c.numel() for c in crops], device=device)
    if int(sizes.sum()) < k:
        raise ValueError(f"holov: the crops hold {int(sizes.sum())} tokens, fewer than the budget {k}")
    alloc = allocate(crop_scores, sizes, k)
    kept = [c[topk_indices(s, int(a))] for c, s, a in zip(crops, token_scores, alloc.tolist()) if a > 0]
    return torch.sort(torch.cat(kept)).values


@register_strategy
@dataclass(frozen=True)
class HoloV(VisionStrategy):
    """HoloV: allocate the budget across spatial crops by a holistic score, then keep the top tokens of each crop.

    Zou et al., "Don't Just Chase 'Highlighted Tokens' in MLLMs: Revisiting Visual Holistic Context Retention"
    (HoloV, NeurIPS 2025). Within crop c, token i scores s_i = a_i + alpha * v_i * mean_c(a) / mean_c(v), where a is the
    head-averaged [CLS] attention at the feature layer and v_i = Var_{j != i} cos(x_i, x_j) the variance of its
    similarity to the crop's other tokens (projected features). Crop c gets k_c = k * S_c / sum S of the budget with
    S_c = mean_{i in c} s_i (rounded so sum k_c = k, capped at the crop size), and keeps its k_c best tokens.

    Crops are `crops` = (rows, cols) rectangular blocks of the patch grid; when the signals carry `tiles` (token
    indices per tile, e.g. LLaVA-NeXT / InternVL), each tile is a crop. Without either, rows*cols contiguous runs.
    The reference code ranks inside a crop by attention alone; here the full score s_i is used.
    """

    crops: tuple[int, int] = (4, 4)
    alpha: float = 0.09

    name: ClassVar[str] = "holov"
    paper: ClassVar[str] = "HoloV (Zou et al., NeurIPS 2025)"
    needs: ClassVar[frozenset[str]] = frozenset({"cls_attn"})

    def __post_init__(self) -> None:
        super().__post_init__()
        ok = len(self.crops) == 2 and all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in self.crops)
        if not ok:
            raise BudgetError(f"holov crops must be (rows, cols) of ints >= 1, got {self.crops!r}")
        object.__setattr__(self, "crops", tuple(self.crops))

    def crop_indices(self, signals: VisionSignals) -> list[torch.Tensor]:
        t = signals.features.shape[1]
        if signals.tiles:
            return [torch.as_tensor(tile, dtype=torch.long) for tile in signals.tiles]
        if signals.grid is not None:
            return grid_crops(signals.grid, self.crops)
        return chunk_crops(t, self.crops[0] * self.crops[1])

    def select(self, signals: VisionSignals, k: int) -> VisionSelection:
        feats = signals.features
        n, t = feats.shape[:2]
        if k >= t:
            return VisionSelection(torch.arange(t, device=feats.device).expand(n, t), feats)
        attn = cls_attention_scores(signals.cls_attn[max(signals.cls_attn)])
        crops = self.crop_indices(signals)
        idx = torch.stack([holov_select_one(feats[i], attn[i], crops, k, float(self.alpha)) for i in range(n)])
        return VisionSelection(idx, gather_tokens(feats, idx))
