"""Honest baselines: keep everything, keep a seeded random subset, or average-pool the grid."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..errors import CapabilityError
from ..selection import gather_tokens
from .base import VisionSelection, VisionSignals, VisionStrategy
from .registry import register_strategy


@register_strategy
@dataclass(frozen=True)
class NoPrune(VisionStrategy):
    """Keep every token (the reference every other strategy is compared against)."""

    name: ClassVar[str] = "none"
    paper: ClassVar[str] = "baseline"

    def has_budget(self) -> bool:
        return True  # "keep everything" is its budget

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
    """Output grid (r, c), r * c >= k, fitting inside rows x cols: an exact factorisation of k with an aspect ratio
    within 2x of the grid's when one exists, else the smallest near-square grid holding k cells."""
    best: tuple[float, int, int] | None = None
    for r in range(1, k + 1):
        c = k // r
        if k % r or r > rows or c > cols:
            continue
        err = abs(math.log((r / c) / (rows / cols)))
        if err <= math.log(2) + 1e-9 and (best is None or err < best[0]):
            best = (err, r, c)
    if best is not None:
        return best[1], best[2]
    r = min(rows, math.ceil(math.sqrt(k * rows / cols)))
    c = min(cols, math.ceil(k / r))
    return r, c


def pool_tokens(features: torch.Tensor, grid: tuple[int, int], k: int) -> VisionSelection:
    """Adaptive 2-D average pooling of [N, T, D] to k tokens; each pooled token sits at its cell's centre patch.

    When k has no grid-shaped factorisation, the pooled grid has a few more cells than k and k of them, evenly
    spaced in raster order, are kept.
    """
    n, t, d = features.shape
    rows, cols = grid
    r, c = pooled_grid(rows, cols, k)
    x = features.transpose(1, 2).reshape(n, d, rows, cols)
    pooled = F.adaptive_avg_pool2d(x.float(), (r, c)).to(features.dtype).reshape(n, d, r * c).transpose(1, 2)
    # centre patch of adaptive cell i: [floor(i*rows/r), ceil((i+1)*rows/r))
    ri = torch.tensor([(i * rows // r + (-(-(i + 1) * rows // r)) - 1) // 2 for i in range(r)])
    ci = torch.tensor([(j * cols // c + (-(-(j + 1) * cols // c)) - 1) // 2 for j in range(c)])
    centres = (ri[:, None] * cols + ci[None, :]).reshape(-1)
    cells = torch.linspace(0, r * c - 1, k).round().long() if r * c > k else torch.arange(k)
    idx = centres[cells].to(features.device).expand(n, k).contiguous()
    return VisionSelection(idx, pooled[:, cells.to(features.device)])


@register_strategy
@dataclass(frozen=True)
class Pool(VisionStrategy):
    """2-D average pooling of the patch grid down to the budget (the LLaVA-style 'pooling' baseline)."""

    name: ClassVar[str] = "pool"
    paper: ClassVar[str] = "baseline"
    needs: ClassVar[frozenset[str]] = frozenset({"grid"})

    def select(self, signals: VisionSignals, k: int) -> VisionSelection:
        if signals.grid is None:
            raise CapabilityError(
                "pool needs the image tokens to form one patch grid; these do not (several crops, tiles or video "
                "frames): use 'random', 'divprune' or 'holov' (which pools within crops) instead"
            )
        return pool_tokens(signals.features, signals.grid, k)
