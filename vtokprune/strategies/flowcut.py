"""FlowCut: information-flow scores accumulated across vision layers, pruned in entropy-adaptive steps."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import BudgetError
from ..selection import gather_tokens, topk_indices
from .base import VisionSelection, VisionSignals, VisionStrategy
from .registry import register_strategy


def flow_scores(cls_attn: torch.Tensor, values: torch.Tensor, cls_value: torch.Tensor) -> torch.Tensor:
    """One image, one layer, the current candidates: [H, C], [H, C, d], [H, d] -> [C].

    (a_j / sum a + s_j / sum s) * ||v_j||_1 with a_j the head-averaged [CLS] attention, v_j = mean_h v_j^h, and
    s_j = mean_h softmax(v_cls^h . [v_cls^h, v_1^h, ..., v_C^h])_j: the softmax includes the [CLS] itself, which is
    dropped after the head mean (the official `compute_score`).
    """
    a = cls_attn.float().mean(dim=0)
    relation = a / a.sum().clamp(min=1e-12)
    v = values.float()
    cls_v = cls_value.float()
    logits = torch.cat([(cls_v * cls_v).sum(dim=-1, keepdim=True), torch.einsum("hd,hcd->hc", cls_v, v)], dim=-1)
    semantic = torch.softmax(logits, dim=-1).mean(dim=0)[1:]
    semantic = semantic / semantic.sum().clamp(min=1e-12)
    return (relation + semantic) * v.mean(dim=0).abs().sum(dim=-1)


def adaptive_prune_count(cls_attn: torch.Tensor, target: int, remaining_layers: int) -> int:
    """Tokens to drop now: round((C - target) / sqrt(r) * (1 - (H / log C)^2)), H the entropy of the [CLS] attention."""
    c = cls_attn.shape[-1]
    if remaining_layers <= 0:
        return c - target
    p = cls_attn.float().mean(dim=0)
    p = p / p.sum().clamp(min=1e-12)
    ratio = float(-torch.special.xlogy(p, p).sum()) / math.log(c) if c > 1 else 1.0
    return max(0, int(round((c - target) / math.sqrt(remaining_layers) * (1.0 - ratio**2))))


def flowcut_select_one(
    cls_attn: dict[int, torch.Tensor],
    values: dict[int, torch.Tensor],
    cls_values: dict[int, torch.Tensor],
    k: int,
    stride: int,
    smoothing: float,
) -> torch.Tensor:
    """Per-layer signals of one image ({layer: [H, T]}, {layer: [H, T, d]}, {layer: [H, d]}) -> [k] kept indices."""
    layers = sorted(cls_attn)
    last = layers[-1]
    t = cls_attn[last].shape[-1]
    cand = torch.arange(t, device=cls_attn[last].device)
    cum: torch.Tensor | None = None
    for layer in layers:
        if cand.numel() <= k:
            break
        attn = cls_attn[layer][:, cand]
        score = flow_scores(attn, values[layer][:, cand], cls_values[layer])
        cum = score if cum is None else smoothing * cum + (1.0 - smoothing) * score
        remaining = last - layer
        if remaining % stride == 0:
            size = max(cand.numel() - adaptive_prune_count(attn, k, remaining), k)
            keep = topk_indices(cum, size)
            cand, cum = cand[keep], cum[keep]
    return cand


@register_strategy
@dataclass(frozen=True)
class FlowCut(VisionStrategy):
    """FlowCut: prune by information flow, accumulated over vision layers, in entropy-adaptive steps.

    Tong et al., "FlowCut: Rethinking Redundancy via Information Flow for Efficient Vision-Language Models" (2025),
    following the official code (TungChintao/FlowCut, `flowcut/modeling_clip_flowcut.py`). At vision layer l, over the
    surviving candidates: f_j = (a_j / sum a + s_j / sum s) * ||v_j||_1 (:func:`flow_scores`: a the head-averaged
    [CLS] attention, s the head-averaged softmax of v_cls . v over the [CLS] and the candidates, [CLS] dropped after,
    v the head-averaged value); the running score is F <- smoothing * F + (1 - smoothing) * f. With
    r = (feature layer - 1) - l, at layers where r is even (`stride` 2) the candidates shrink by
    round((C - k) / sqrt(r) * (1 - (H / log C)^2)) (H: entropy of the [CLS] attention over them), keeping the largest
    F; at r = 0, the layer before the feature layer, exactly k remain (the official schedule).

    Departures: the official code drops tokens inside the vision tower, so later layers (the feature layer
    included) run on the survivors only; the runtime here cannot, so every layer runs on all tokens and only the
    candidate set shrinks, with attention and value similarity renormalised over the candidates. The official code
    also uses one prune count for a whole batch (the largest); here each image has its own. `start` is the first
    layer scored (0-based, negative counts from the end of the tower).
    """

    positions: str = "contiguous"  # as the official code (see Strategy.positions)

    start: int = 0
    stride: int = 2
    smoothing: float = 0.5

    name: ClassVar[str] = "flowcut"
    paper: ClassVar[str] = "FlowCut (Tong et al., 2025)"
    needs: ClassVar[frozenset[str]] = frozenset({"cls_attn", "values"})

    def __post_init__(self) -> None:
        super().__post_init__()
        for field_name in ("start", "stride"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise BudgetError(f"flowcut {field_name} must be an int, got {value!r}")
        if self.stride < 1:
            raise BudgetError(f"flowcut stride must be >= 1, got {self.stride}")
        if not isinstance(self.smoothing, (int, float)) or not 0.0 <= float(self.smoothing) < 1.0:
            raise BudgetError(f"flowcut smoothing must be in [0, 1), got {self.smoothing!r}")

    def vision_layers(self, num_layers: int, feature_layer: int) -> tuple[int, ...]:
        last = max(feature_layer - 1, 0)  # the final cut is after the layer before the feature layer
        first = self.start if self.start >= 0 else num_layers + self.start
        return tuple(range(max(0, min(first, last)), last + 1))

    def select(self, signals: VisionSignals, k: int) -> VisionSelection:
        feats = signals.features
        n, t = feats.shape[:2]
        if k >= t:
            return VisionSelection(torch.arange(t, device=feats.device).expand(n, t), feats)
        rows = []
        for i in range(n):
            # with the [CLS] kept among the features (no cls_values), token 0 is the [CLS]
            cls_v = {
                layer: signals.cls_values.get(layer, signals.values[layer][:, :, 0])[i] for layer in signals.values
            }
            per_layer = {layer: a[i] for layer, a in signals.cls_attn.items()}
            vals = {layer: v[i] for layer, v in signals.values.items()}
            rows.append(flowcut_select_one(per_layer, vals, cls_v, k, self.stride, float(self.smoothing)))
        idx = torch.stack([torch.sort(r).values for r in rows])
        return VisionSelection(idx, gather_tokens(feats, idx))
