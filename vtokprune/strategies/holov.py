"""HoloV: spread the budget over spatial crops in proportion to their holistic score (vision side)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import BudgetError
from ..selection import gather_tokens, topk_indices
from .base import VisionSelection, VisionSignals, VisionStrategy
from .cls_attention import cls_attention_scores
from .registry import register_strategy


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
    """`n` contiguous runs of the flattened tokens, the first t % n one token longer (the official split)."""
    n = min(n, t)
    base, extra = divmod(t, n)
    sizes = [base + (1 if i < extra else 0) for i in range(n)]
    starts = [sum(sizes[:i]) for i in range(n)]
    return [torch.arange(start, start + size) for start, size in zip(starts, sizes)]


def similarity_variance(x: torch.Tensor) -> torch.Tensor:
    """[m, D] tokens of one crop -> [m] the official similarity variance (0 if m < 2).

    With S the cosine similarities and its diagonal zeroed: mu_i = sum_j S_ij / (m - 1) and
    v_i = sum_j (S_ij - mu_i)^2 / (m - 1), the zeroed diagonal term (0 - mu_i)^2 included, as the official code.
    """
    m = x.shape[0]
    if m < 2:
        return torch.zeros(m, device=x.device)
    xn = x.float() / (x.float().norm(dim=1, keepdim=True) + 1e-6)
    sim = (xn @ xn.T) * (1.0 - torch.eye(m, device=x.device))
    mean = sim.sum(dim=1) / (m - 1)
    return ((sim - mean[:, None]) ** 2).sum(dim=1) / (m - 1)


def holistic_scores(attn: torch.Tensor, features: torch.Tensor, alpha: float, eps: float = 1e-6) -> torch.Tensor:
    """Official token scores of one crop: 1e3 a_i + alpha v_i mean|1e3 a| / (mean|v| + eps); a crop of one token
    scores its plain attention (the official code skips the 1e3 there)."""
    if attn.numel() < 2:
        return attn.float()
    a = attn.float() * 1e3
    var = similarity_variance(features)
    return a + alpha * var * (a.abs().mean() / (var.abs().mean() + eps))


def allocate(weights: torch.Tensor, sizes: torch.Tensor, k: int, eps: float = 1e-6) -> torch.Tensor:
    """The official allocation: floor(w_c k) with w = S / (sum S + eps); the leftover goes one each to the crops with
    the largest weights (stable ties); a crop allocated more than its size keeps all (the excess is not moved).
    Returns the tokens each crop keeps (the sum may be below k; see :func:`holov_select_one`)."""
    w = weights.double() / (weights.double().sum() + eps)
    alloc = (w * k).floor().long()
    remaining = k - int(alloc.sum())
    if remaining > 0:
        top = torch.sort(w, descending=True, stable=True).indices[: min(remaining, len(w))]
        alloc[top] += 1
    return torch.minimum(alloc, sizes)


def holov_select_one(
    features: torch.Tensor, attn: torch.Tensor, crops: list[torch.Tensor], k: int, alpha: float, rank_by: str
) -> torch.Tensor:
    """[T, D], [T] -> [k] ascending kept indices of one image."""
    device = features.device
    crops = [c.to(device) for c in crops if c.numel() > 0]
    token_scores = [holistic_scores(attn[c], features[c], alpha) for c in crops]
    crop_scores = torch.stack([s.mean() for s in token_scores])
    sizes = torch.tensor([c.numel() for c in crops], device=device)
    alloc = allocate(crop_scores, sizes, k)
    rank = [attn[c] if rank_by == "attention" else s for c, s in zip(crops, token_scores)]
    kept = torch.cat([c[topk_indices(r, int(a))] for c, r, a in zip(crops, rank, alloc.tolist()) if a > 0])
    short = k - kept.numel()
    if short > 0:  # the official code pads with zero vectors; here the best remaining tokens by attention fill in
        free = torch.ones(features.shape[0], dtype=torch.bool, device=device)
        free[kept] = False
        kept = torch.cat([kept, topk_indices(attn, short, free)])
    return torch.sort(kept).values


@register_strategy
@dataclass(frozen=True)
class HoloV(VisionStrategy):
    """HoloV: allocate the budget across crops by a holistic score, then keep the top tokens of each crop.

    Zou et al., "Don't Just Chase 'Highlighted Tokens' in MLLMs: Revisiting Visual Holistic Context Retention"
    (HoloV, NeurIPS 2025), following the official code (obananas/HoloV, `llava/model/utils.py`). Within crop c,
    token i scores s_i = 1e3 a_i + alpha v_i mean_c|1e3 a| / mean_c|v| (:func:`holistic_scores`), a the head-averaged
    [CLS] attention at the feature layer and v_i the variance of its cosine similarity to the crop's tokens with the
    diagonal zeroed (:func:`similarity_variance`). Crop c gets floor(k w_c), w = S / sum S, S_c = mean_{i in c} s_i,
    plus one of the leftover for each of the largest weights (:func:`allocate`), and keeps that many of its tokens
    with the largest attention (`rank_by="attention"`, as the official code; "score" ranks by s_i).

    Crops (`crop_layout="runs"`, official): rows*cols contiguous runs of the flattened tokens, the first ones one
    longer when uneven. "grid": rectangular blocks of the patch grid, or each tile when the signals carry `tiles`
    (LLaVA-NeXT / InternVL), contiguous runs when neither exists. Departures: a crop allocated more than its size
    keeps all and the excess is lost in the official code, which then pads the image with zero vectors; here the
    allocation is the same but the shortfall is filled with the best remaining tokens by attention, so k real
    tokens always reach the model. Kept tokens are in index order (the official code: crop order, then by
    attention within a crop).
    """

    positions: str = "contiguous"  # as the official code (see Strategy.positions)

    crops: tuple[int, int] = (4, 4)
    alpha: float = 0.09
    crop_layout: str = "runs"
    rank_by: str = "attention"

    name: ClassVar[str] = "holov"
    paper: ClassVar[str] = "HoloV (Zou et al., NeurIPS 2025)"
    needs: ClassVar[frozenset[str]] = frozenset({"cls_attn"})

    def __post_init__(self) -> None:
        super().__post_init__()
        ok = len(self.crops) == 2 and all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in self.crops)
        if not ok:
            raise BudgetError(f"holov crops must be (rows, cols) of ints >= 1, got {self.crops!r}")
        object.__setattr__(self, "crops", tuple(self.crops))
        if self.crop_layout not in ("runs", "grid"):
            raise BudgetError(f"holov crop_layout must be 'runs' or 'grid', got {self.crop_layout!r}")
        if self.rank_by not in ("attention", "score"):
            raise BudgetError(f"holov rank_by must be 'attention' or 'score', got {self.rank_by!r}")

    def crop_indices(self, signals: VisionSignals) -> list[torch.Tensor]:
        t = signals.features.shape[1]
        if self.crop_layout == "runs":
            return chunk_crops(t, self.crops[0] * self.crops[1])
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
        idx = torch.stack(
            [holov_select_one(feats[i], attn[i], crops, k, float(self.alpha), self.rank_by) for i in range(n)]
        )
        return VisionSelection(idx, gather_tokens(feats, idx))
