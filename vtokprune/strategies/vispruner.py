"""VisPruner: important tokens by [CLS] attention, plus diverse tokens left after removing near-duplicates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..errors import BudgetError
from ..selection import gather_tokens
from .base import VisionSelection, VisionSignals, VisionStrategy
from .cls_attention import cls_attention_scores
from .registry import register_strategy


def remove_duplicates(metric: torch.Tensor, residual: torch.Tensor, keep: int, step: int) -> torch.Tensor:
    """One image: shrink `residual` ([R] token indices) to `keep` by iterative matching and pruning.

    Each round, with the residual tokens in their current order split alternately into A (even slots) and B (odd),
    every a in A gets m_a = max_b cos(a, b); the min(step, R - keep) tokens of A with the largest m_a (stable: ties
    go to the earlier slot) are dropped, and the order becomes [survivors of A by descending m_a, then B]. Repeats
    until `keep` remain. Returns the remaining indices (in that final order).
    """
    if keep <= 0:
        return residual[:0]  # the official loop would end on an empty B; nothing diverse is asked for
    while True:
        r = min(step, residual.shape[0] - keep)
        if r <= 0:
            return residual
        tokens = metric[residual]
        a, b = tokens[0::2], tokens[1::2]
        best = (a @ b.T).max(dim=-1).values
        survivors = torch.sort(best, descending=True, stable=True).indices[r:]
        residual = torch.cat([residual[0::2][survivors], residual[1::2]])


def vispruner_select(
    scores: torch.Tensor, metric: torch.Tensor, k: int, important_ratio: float, step: int
) -> torch.Tensor:
    """scores [N, T], L2-normalised metric [N, T, d] -> [N, k] ascending kept indices."""
    important = int(k * important_ratio)
    rows = []
    for i in range(scores.shape[0]):
        order = torch.sort(scores[i].float(), descending=True, stable=True).indices
        diverse = remove_duplicates(metric[i], order[important:], k - important, step)
        rows.append(torch.sort(torch.cat([order[:important], diverse])).values)
    return torch.stack(rows)


@register_strategy
@dataclass(frozen=True)
class VisPruner(VisionStrategy):
    """VisPruner: keep important tokens by [CLS] attention, then diverse ones among the rest.

    Zhang et al., "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning in VLMs"
    (VisPruner, ICCV 2025). Of a budget k, k_imp = floor(k * important_ratio) tokens are the top by head-averaged
    [CLS] attention at the feature layer; the other N - k_imp are reduced to k - k_imp by rounds of bipartite
    duplicate removal (:func:`remove_duplicates`, at most `step` = 8 per round, as the official code) with cosine
    similarity of the vision tower's hidden states at the feature layer (the official code's pre-projector
    features). Paper/code default important_ratio: the `--important_ratio` argument, 0.5 used here.

    Departures: the similarity uses the feature layer's input hidden states when the signal is only exposed as
    layer inputs (see `vision_layers`); towers without [CLS] (Qwen2-VL) would use mean attention received, which
    no adapter here exposes, so they raise CapabilityError.
    """

    positions: str = "contiguous"  # as the official code (see Strategy.positions)

    important_ratio: float = 0.5
    step: int = 8

    name: ClassVar[str] = "vispruner"
    paper: ClassVar[str] = "VisPruner (Zhang et al., ICCV 2025)"
    needs: ClassVar[frozenset[str]] = frozenset({"cls_attn", "hidden"})

    def __post_init__(self) -> None:
        super().__post_init__()
        r = self.important_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= r <= 1.0:
            raise BudgetError(f"vispruner important_ratio must be in [0, 1], got {r!r}")
        if isinstance(self.step, bool) or not isinstance(self.step, int) or self.step < 1:
            raise BudgetError(f"vispruner step must be an int >= 1, got {self.step!r}")

    def vision_layers(self, num_layers: int, feature_layer: int) -> tuple[int, ...]:
        # hidden[l] is the input of layer l: the feature layer's output is the next layer's input, where one exists
        return tuple(sorted({feature_layer, min(feature_layer + 1, num_layers - 1)}))

    def select(self, signals: VisionSignals, k: int) -> VisionSelection:
        feats = signals.features
        n, t = feats.shape[:2]
        if k >= t:
            return VisionSelection(torch.arange(t, device=feats.device).expand(n, t), feats)
        scores = cls_attention_scores(signals.cls_attn[min(signals.cls_attn)])
        metric = F.normalize(signals.hidden[max(signals.hidden)].float(), dim=-1)
        idx = vispruner_select(scores, metric, k, float(self.important_ratio), self.step)
        return VisionSelection(idx, gather_tokens(feats, idx))
