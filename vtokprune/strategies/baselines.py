"""Honest baselines: keep everything, keep a seeded random subset, or average-pool the grid."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..registry import register_strategy
from ..selection import gather_tokens
from .base import VisionSelection, VisionSignals, VisionStrategy


@register_strategy
@dataclass(frozen=True)
class NoPrune(VisionStrategy):
    """Keep every token (the reference every other strategy is compared against)."""

    name: ClassVar[str] = "none"
    paper: ClassVar[str] = "baseline"

    def budget(self, available: int) -> int:
        return available

    def select(self, signals: VisionSignals, k: int) -> VisionSelection:
        n, t = signals.features.shape[:2]
        idx = torch.arange(t, device=signals.features.device).expand(n, t)
        return VisionSelection(idx, signals.features)


def random_indices(n: int, t: int, k: int, seed: int, device: torch.device) -> torch.Tensor:
    """[n, k] ascending indices; every image gets the same seeded draw, so results never depend on the batch."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.sort(torch.randperm(t, generator=gen)[:k]).values
    return idx.to(device).expand(n, k)


@register_strategy
@dataclass(frozen=True)
class RandomPrune(VisionStrategy):
    """Keep k tokens chosen uniformly at random (seeded, deterministic)."""

    seed: int = 0

    name: ClassVar[str] = "random"
    paper: ClassVar[str] = "baseline"

    def select(self, signals: VisionSignals, k: int) -> VisionSelection:
        n, t = signals.features.shape[:2]
        idx = random_indices(n, t, k, self.seed, signals.features.device)
        return VisionSelection(idx, gather_tokens(signals.features, idx))


def pooled_grid(rows: int, cols: int, k: int) -> tuple[int, int]:
    """Output grid (r, c) with r * c == k whose aspect ratio is closest to rows:cols (and fits inside it)."""
    best: tuple[float, int, int] | None = None
    for r in range(1, k + 1):
        if k % r:
            continue
        c = k // r
        if r > rows or c > cols:
            continue
        err = abs(math.log((r / c) / (rows / cols)))
        if best is None or err < best[0]:
            best = (err, r, c)
    if best is None:
        raise ValueError(f"cannot pool a {rows}x{cols} grid to exactly {k} tokens")
    return best[1], best[2]


def pool_tokens(features: torch.Tensor, grid: tuple[int, int], k: int) -> VisionSelection:
    """Adaptive 2-D average pooling of [N, T, D] to k tokens; each pooled token sits at its cell's centre patch."""
    n, t, d = features.shape
    rows, cols = grid
    r, c = pooled_grid(rows, cols, k)
    x = features.transpose(1, 2).reshape(n, d, rows, cols)
    pooled = F.adaptive_avg_pool2d(x.float(), (r, c)).to(features.dtype).reshape(n, d, k).transpose(1, 2)
    # centre patch of adaptive cell i: [floor(i*rows/r), ceil((i+1)*rows/r))
    ri = torch.tensor([(i * rows // r + (-(-(i + 1) * rows // r)) - 1) // 2 for i in range(r)])
    ci = torch.tensor([(j * cols // c + (-(-(j + 1) * cols // c)) - 1) // 2 for j in range(c)])
    idx = (ri[:, None] * cols + ci[None, :]).reshape(-1).to(features.device).expand(n, k)
    return VisionSelection(idx.contiguous(), pooled)


@register_strategy
@dataclass(frozen=True)
class Pool(VisionStrategy):
    """2-D average pooling of the patch grid down to the budget (the LLaVA-style 'pooling' baseline)."""

    name: ClassVar[str] = "pool"
    paper: ClassVar[str] = "baseline"

    def select(self, signals: VisionSignals, k: int) -> VisionSelection:
        if signals.grid is None:
            raise ValueError("pool needs a square patch grid; this model's image tokens do not form one")
        return pool_tokens(signals.features, signals.grid, k)
