"""VisionZip: dominant tokens by [CLS] attention plus contextual tokens merged by key similarity (vision side)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..errors import BudgetError
from ..selection import topk_indices
from .base import VisionSelection, VisionSignals, VisionStrategy
from .cls_attention import cls_attention_scores
from .registry import register_strategy


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
    features: torch.Tensor, metric: torch.Tensor, rest: torch.Tensor, c: int, merge: str = "official"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the tokens `rest` ([R], ascending) of one image into `c` contextual tokens.

    Targets are `c` evenly spaced tokens of `rest` (every max(1, R // c)-th); every other token joins the target it
    is most similar to (cosine of `metric`, ties -> lower target). A contextual token is, with merge="official",
    target + mean(tokens that joined it) (the target alone when none did), as the official code; with merge="mean",
    the mean of the target and the tokens that joined it. Returns ([c] target indices, [c, D] merged features).
    """
    r = rest.shape[0]
    step = max(1, r // c)
    pos = torch.arange(0, r, step, device=rest.device)[:c]
    is_target = torch.zeros(r, dtype=torch.bool, device=rest.device)
    is_target[pos] = True
    targets, others = rest[pos], rest[~is_target]
    sim = metric[others] @ metric[targets].T  # [R - c, c]
    assign = sim.argmax(dim=1)
    if merge == "mean":
        assign = torch.cat([assign, torch.arange(c, device=rest.device)])  # each target joins itself
        members = torch.cat([others, targets])
    else:
        members = others
    sums = torch.zeros(c, features.shape[-1], dtype=torch.float32, device=features.device)
    sums.index_add_(0, assign, features[members].float())
    counts = torch.bincount(assign, minlength=c).clamp(min=1).unsqueeze(-1)
    merged = sums / counts
    if merge != "mean":
        merged = features[targets].float() + merged
    return targets, merged.to(features.dtype)


def visionzip_select(
    features: torch.Tensor,
    scores: torch.Tensor,
    metric: torch.Tensor,
    dominant: int,
    contextual: int,
    merge: str = "official",
    cls_feature: torch.Tensor | None = None,
) -> tuple[VisionSelection, torch.Tensor | None]:
    """features [N, T, D], scores [N, T], metric [N, T, d] -> k = dominant + contextual tokens per image.

    With `cls_feature` ([N, D]), the [CLS] is one of the dominant tokens (dominant - 1 patches are chosen); having no
    patch index, it takes the lowest patch index nothing else kept as its placeholder; the second result gives its
    row in each image's output (None without it). `features` may be pre-projector hidden states (then the caller
    projects the result).
    """
    n, t, _ = features.shape
    cls_rows = []
    patches = dominant - 1 if cls_feature is not None else dominant
    dom = topk_indices(scores, patches)
    all_idx, all_feat = [], []
    for i in range(n):
        keep = torch.zeros(t, dtype=torch.bool, device=features.device)
        keep[dom[i]] = True
        idx, feat = dom[i], features[i, dom[i]]
        if contextual > 0:
            rest = torch.nonzero(~keep, as_tuple=True)[0]
            targets, merged = merge_contextual(features[i], metric[i], rest, contextual, merge)
            keep[targets] = True
            idx, feat = torch.cat([idx, targets]), torch.cat([feat, merged])
        if cls_feature is not None:
            slot = torch.nonzero(~keep, as_tuple=True)[0][:1]
            idx, feat = torch.cat([slot, idx]), torch.cat([cls_feature[i : i + 1].to(feat.dtype), feat])
        order = torch.argsort(idx)
        all_idx.append(idx[order])
        all_feat.append(feat[order])
        cls_rows.append(int(torch.nonzero(order == 0)[0]) if cls_feature is not None else -1)
    rows = torch.tensor(cls_rows, device=features.device) if cls_feature is not None else None
    return VisionSelection(torch.stack(all_idx), torch.stack(all_feat)), rows


@register_strategy
@dataclass(frozen=True)
class VisionZip(VisionStrategy):
    """VisionZip: keep dominant tokens by [CLS] attention and merge the rest into a few contextual tokens.

    Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models" (CVPR 2025).
    Dominant: the k_d tokens with the largest (1/H) sum_h A_h[cls, j] at the feature layer. Contextual: among the
    remaining R tokens, every floor(R / k_c)-th one is a target; each other token joins the target maximising
    cos(k_i, k_t), with k the feature layer's keys (heads averaged, or concatenated); a contextual token is
    target + mean(tokens that joined it) (merge="official", as dvlab-research/VisionZip `clip_encoder.py`) or the
    mean of the group (merge="mean", this library's earlier behaviour). k_c = round(k * contextual_ratio) (paper:
    54+10, 108+20, 162+30 for 64/128/192).

    Like the official code, the [CLS] token's own hidden state is one of the k_d dominant tokens (54 = [CLS] + 53
    patches) where the adapter exposes it (`cls_token=True`, LLaVA-1.5); it takes the lowest patch index nothing else
    kept as its placeholder. There, merging also happens on the feature layer's hidden states before the projector,
    as in the official code. Elsewhere (LLaVA-NeXT, InternVL) all k_d dominant tokens are patches and the projected
    features are merged: exact for a linear projector without bias, an approximation for LLaVA's MLP. A contextual
    token reports its target's index as its position, and tokens keep patch order (the official code puts [CLS],
    then the dominant, then the contextual tokens).
    """

    positions: str = "contiguous"  # as the official code (see Strategy.positions)

    contextual_ratio: float = 10 / 64
    key_reduce: str = "mean"
    merge: str = "official"
    cls_token: bool = True

    name: ClassVar[str] = "visionzip"
    paper: ClassVar[str] = "VisionZip (Yang et al., CVPR 2025)"
    needs: ClassVar[frozenset[str]] = frozenset({"cls_attn", "keys"})
    wants: ClassVar[frozenset[str]] = frozenset({"cls_feature", "projector"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.contextual_ratio, (int, float)) or not 0.0 <= float(self.contextual_ratio) < 1.0:
            raise BudgetError(f"visionzip contextual_ratio must be in [0, 1), got {self.contextual_ratio!r}")
        if self.key_reduce not in ("mean", "concat"):
            raise BudgetError(f"visionzip key_reduce must be 'mean' or 'concat', got {self.key_reduce!r}")
        if self.merge not in ("official", "mean"):
            raise BudgetError(f"visionzip merge must be 'official' or 'mean', got {self.merge!r}")
        if not isinstance(self.cls_token, bool):
            raise BudgetError(f"visionzip cls_token must be a bool, got {self.cls_token!r}")

    def select(self, signals: VisionSignals, k: int) -> VisionSelection:
        n, t = signals.features.shape[:2]
        if k >= t:
            return VisionSelection(torch.arange(t, device=signals.features.device).expand(n, t), signals.features)
        layer = max(signals.cls_attn)
        dominant, contextual = split_budget(k, float(self.contextual_ratio))
        if dominant == 0:  # a tiny budget: keep at least one dominant token
            dominant, contextual = 1, k - 1
        cls_feature = signals.cls_feature if self.cls_token and dominant >= 2 else None
        scores = cls_attention_scores(signals.cls_attn[layer])
        metric = key_metric(signals.keys[layer], self.key_reduce)
        pre_projector = signals.projector is not None and signals.projector_input is not None
        if not pre_projector:
            return visionzip_select(signals.features, scores, metric, dominant, contextual, self.merge, cls_feature)[0]
        assert signals.projector_input is not None
        # official order of work: choose and merge hidden states, then project; the [CLS] slot gets its own feature
        placeholder = None if cls_feature is None else torch.zeros_like(signals.projector_input[:, 0])
        hidden, cls_rows = visionzip_select(
            signals.projector_input, scores, metric, dominant, contextual, self.merge, placeholder
        )
        feats = signals.projector(hidden.features).to(signals.features.dtype)
        if cls_feature is not None and cls_rows is not None:
            rows = torch.arange(n, device=feats.device)
            feats[rows, cls_rows] = cls_feature.to(feats.dtype)
        return VisionSelection(hidden.indices, feats)
