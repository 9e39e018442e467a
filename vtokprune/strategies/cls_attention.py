"""[CLS]-attention strategies (vision side)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..selection import gather_tokens, topk_indices
from .base import VisionSelection, VisionSignals, VisionStrategy
from .registry import register_strategy


def cls_attention_scores(cls_attn: torch.Tensor) -> torch.Tensor:
    """[N, H, T] [CLS]->patch attention -> [N, T] head-averaged score."""
    return cls_attn.float().mean(dim=1)


@register_strategy
@dataclass(frozen=True)
class CLSAttention(VisionStrategy):
    """FasterVLM: keep the top-k patches by [CLS] attention.

    Zhang et al., "[CLS] Attention is All You Need for Training-Free Visual Token Pruning: Make VLM Inference
    Faster" (FasterVLM, 2024). score_j = (1/H) sum_h softmax(q_cls^h K^h^T / sqrt(d))_j at the vision layer that
    produces the features the projector reads (the penultimate layer for LLaVA); keep the k largest.
    """

    positions: str = "contiguous"  # as the official code (see Strategy.positions)

    name: ClassVar[str] = "cls"
    paper: ClassVar[str] = "FasterVLM (Zhang et al., 2024)"
    needs: ClassVar[frozenset[str]] = frozenset({"cls_attn"})

    def select(self, signals: VisionSignals, k: int) -> VisionSelection:
        layer = max(signals.cls_attn)
        idx = topk_indices(cls_attention_scores(signals.cls_attn[layer]), k)
        return VisionSelection(idx, gather_tokens(signals.features, idx))
