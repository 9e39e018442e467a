"""VisionZip: dominant tokens by [CLS] attention plus contextual tokens merged by key similarity (vision side)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..errors import BudgetError
from ..registry import register_strategy
from ..selection import topk_indices
from .base import VisionSelection, VisionSignals, VisionStrategy
from .cls_attention import cls_attention_scores


def split_budget(k: int, contextual_ratio: float) -> tuple[int, int]:
    """(dominant, contextual) with contextual = round(k * ratio): 64 -> 54+10, 128 -> 108+20, 192 -> 162+30."""
    contextual = min(k, int(round(k * contextual_ratio)))
    return k - contextual, contextual


def key_metric(keys: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
    """[N, H, T, d] keys -> [N, T, d'] L2-normalised similarity metric (heads averaged or concatenated)."""
    k = keys.float()
    metric = k.mean(dim=1) if reduce == "mean" else k.permute(0, 2, 1, 3).flatten(2)
    return F.normalize(metric, dim=-1)


def merge_contextual(
    features: torch.Tensor, metric: torch.Tensor, rest: torch.Tensor, c: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the tokens `rest` ([R], ascending) of one image into `c` contextual tokens.

    Targets are `c` evenly spaced tokens of `rest` (every max(1, R // c)-th); every other token joins the target it
    is most similar to (cosine of `metric`, ties -> lower target); a contextual token is the mean of its target and
    the tokens that joined it. Returns ([c] target indices, [c, D] merged features).
    """
    r = rest.shape[0]
    step = max(1, r // c)
    pos = torch.arange(0, r, step, device=rest.device)[:c]
    is_target = torch.zeros(r, dtype=torch.bool, device=rest.device)
    is_target[pos] = True
    targets, others = rest[pos], rest[~is_target]
    sim = metric[others] @ metric[targets].T  # [R - c, c]
    assign = torch.cat([sim.argmax(dim=1), torch.arange(c, device=rest.device)])  # each target joins itself
    members = torch.cat([others, targets])
    sums = torch.zeros(c, features.shape[-1], dtype=torch.float32, device=features.device)
    sums.index_add_(0, assign, features[members].float())
    counts = torch.bincount(assign, minlength=c).clamp(min=1).unsqueeze(-1)
    return targets, (sums / counts).to(features.dtype)


def visionzip_select(
    features: torch.Tensor, scores: torch.Tensor, metric: torch.Tensor, dominant: int, contextual: int
) -> VisionSelection:
    """features [N, T, D], scores [N, T], metric [N, T, d] -> k = dominant + contextual tokens per image."""
    n, t, _ = features.shape
    dom = topk_indices(scores, dominant)
    all_idx, all_feat = [], []
    for i in range(n):
        if contextual == 0:
            idx, feat = dom[i], features[i, dom[i]]
        else:
            keep = torch.zeros(t, dtype=torch.bool, device=features.device)
            keep[dom[i]] = True
            rest = torch.nonzero(~keep, as_tuple=True)[0]
            targets, merged = merge_contextual(features[i], metric[i], rest, contextual)
            idx = torch.cat([dom[i], targets])
            feat = torch.cat([features[i, dom[i]], merged])
            order = torch.argsort(idx)
            idx, feat = idx[order], feat[order]
        all_idx.append(idx)
        all_feat.append(feat)
    return VisionSelection(torch.stack(all_idx), torch.stack(all_feat))


@register_strategy
@dataclass(frozen=True)
class VisionZip(VisionStrategy):
    """VisionZip: keep dominant tokens by [CLS] attention and merge the rest into a few contextual tokens.

    Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models" (CVPR 2025).
    Dominant: the k_d tokens with the largest (1/H) sum_h A_h[cls, j] at the feature layer. Contextual: among the
    remaining R tokens, every floor(R / k_c)-th one is a target; each other token joins the target maximising
    cos(k_i, k_t), with k the feature layer's keys (heads averaged, or concatenated); a contextual token is the mean
    of its group. k_c = round(k * contextual_ratio) (paper: 54+10, 108+20, 162+30 for 64/128/192).

    The paper merges vision-tower hidden states before the projector; here the projected features are averaged
    (identical for a linear projector, an approximation for LLaVA's MLP). A contextual token reports its target's
    index as its position.
    """

    contextual_ratio: float = 10 / 64
    key_reduce: str = "mean"

    name: ClassVar[str] = "visionzip"
    paper: ClassVar[str] = "VisionZip (Yang et al., CVPR 2025)"
    needs: ClassVar[frozenset[str]] = frozenset({"cls_attn", "keys"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.contextual_ratio, (int, float)) or not 0.0 <= float(self.contextual_ratio) < 1.0:
            raise BudgetError(f"visionzip contextual_ratio must be in [0, 1), got {self.contextual_ratio!r}")
        if self.key_reduce not in ("mean", "concat"):
            raise BudgetError(f"visionzip key_reduce must be 'mean' or 'concat', got {self.key_reduce!r}")

    def select(self, signals: VisionSignals, k: int) -> VisionSelection:
        n, t = signals.features.shape[:2]
        if k >= t:
            return VisionSelection(torch.arange(t, device=signals.features.device).expand(n, t), signals.features)
        layer = max(signals.cls_attn)
        dominant, contextual = split_budget(k, float(self.contextual_ratio))
        if dominant == 0:  # a tiny budget: keep at least one dominant token
            dominant, contextual = 1, k - 1
        scores = cls_attention_scores(signals.cls_attn[layer])
        metric = key_metric(signals.keys[layer], self.key_reduce)
        return visionzip_select(signals.features, scores, metric, dominant, contextual)
