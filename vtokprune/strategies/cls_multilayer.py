"""VTC-CLS: [CLS] attention summed over several vision layers (vision side)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import BudgetError
from ..selection import gather_tokens, topk_indices
from .base import VisionSelection, VisionSignals, VisionStrategy
from .cls_attention import cls_attention_scores
from .registry import register_strategy


def multilayer_cls_scores(cls_attn: dict[int, torch.Tensor], layers: tuple[int, ...]) -> torch.Tensor:
    """sum over `layers` of the head-averaged [CLS] attention: {layer: [N, H, T]} -> [N, T]."""
    return torch.stack([cls_attention_scores(cls_attn[layer]) for layer in layers]).sum(dim=0)


def layer_range(num_layers: int, feature_layer: int, start: int | None, depth: int) -> tuple[int, ...]:
    """Layers `start..feature_layer` (negative `start` counts from the tower's end), or the last `depth` of them."""
    if start is None:
        first = feature_layer - depth + 1
    else:
        first = start if start >= 0 else num_layers + start
    first = max(0, min(first, feature_layer))
    return tuple(range(first, feature_layer + 1))


@register_strategy
@dataclass(frozen=True)
class CLSMultiLayer(VisionStrategy):
    """VTC-CLS: keep the top-k patches by [CLS] attention accumulated over several vision layers.

    Wang et al., "[CLS] Token Tells Everything Needed for Training-free Efficient MLLMs" (VTC-CLS, 2024).
    score_j = sum_{l = start}^{f} (1/H) sum_h A^l_h[cls, j], where f is the vision layer that produces the features
    (the penultimate one for LLaVA) and A^l the softmax attention of layer l; keep the k largest.

    `start` is the first layer (0-based; negative counts from the end of the tower, e.g. -6); when it is None the
    last `depth` layers up to the feature layer are used.
    """

    positions: str = "contiguous"  # as the official code (see Strategy.positions)

    start: int | None = None
    depth: int = 4

    name: ClassVar[str] = "cls_multilayer"
    paper: ClassVar[str] = "VTC-CLS (Wang et al., 2024)"
    needs: ClassVar[frozenset[str]] = frozenset({"cls_attn"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.depth, bool) or not isinstance(self.depth, int) or self.depth < 1:
            raise BudgetError(f"cls_multilayer depth must be an int >= 1, got {self.depth!r}")
        if self.start is not None and (isinstance(self.start, bool) or not isinstance(self.start, int)):
            raise BudgetError(f"cls_multilayer start must be an int layer index or None, got {self.start!r}")

    def vision_layers(self, num_layers: int, feature_layer: int) -> tuple[int, ...]:
        return layer_range(num_layers, feature_layer, self.start, self.depth)

    def select(self, signals: VisionSignals, k: int) -> VisionSelection:
        n, t = signals.features.shape[:2]
        if k >= t:
            return VisionSelection(torch.arange(t, device=signals.features.device).expand(n, t), signals.features)
        idx = topk_indices(multilayer_cls_scores(signals.cls_attn, tuple(sorted(signals.cls_attn))), k)
        return VisionSelection(idx, gather_tokens(signals.features, idx))
