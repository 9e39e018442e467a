"""CDPruner: keep the visual tokens that maximise conditional diversity, a DPP over relevance-weighted similarity."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..errors import BudgetError, CapabilityError
from ..selection import gather_tokens
from .base import VisionSelection, VisionSignals, VisionStrategy
from .registry import register_strategy
from .text_clip import TextCLIP


def dpp_greedy_map(kernel: torch.Tensor, k: int, tol: float = 1e-6) -> torch.Tensor:
    """Greedy MAP of a DPP, batched: [N, T, T] PSD kernels -> [N, k] ascending indices.

    Chen et al., "Fast Greedy MAP Inference for Determinantal Point Process" (NeurIPS 2018): each step adds the item
    j maximising the marginal gain d_j^2 = L_jj - ||c_j||^2 of log det L_S, with the Cholesky rows c updated
    incrementally, e_i = (L_{j i} - <c_j, c_i>) / d_j, d_i^2 -= e_i^2. Equal to picking argmax_j det(L_{S+j}) at
    every step. Ties -> the lower index; chosen items are never picked again. Once no gain is above `tol` times the
    image's largest L_jj (the kernel's rank is used up, e.g. k above the feature width, or exact duplicates), the
    rest are taken by L_jj, the quality term alone, where the official code would divide by ~0 (NaN). In float64.
    """
    n, t, _ = kernel.shape
    kern = kernel.double()
    rows = torch.arange(n, device=kernel.device)
    chol = torch.zeros(k, n, t, dtype=kern.dtype, device=kernel.device)
    quality = torch.diagonal(kern, dim1=1, dim2=2).clone()
    gain = quality.clone()
    eps = (tol * quality.max(dim=-1).values).clamp(min=1e-30)
    chosen = torch.zeros(n, t, dtype=torch.bool, device=kernel.device)
    picks = []
    for i in range(k):
        best = gain.masked_fill(chosen, -torch.inf)
        j = best.argmax(dim=-1)
        ok = best[rows, j] > eps
        j = torch.where(ok, j, quality.masked_fill(chosen, -torch.inf).argmax(dim=-1))
        picks.append(j)
        proj = torch.einsum("in,int->nt", chol[:i, rows, j], chol[:i])
        e = (kern[rows, j] - proj) / torch.maximum(gain[rows, j], eps).sqrt()[:, None]
        e = torch.where(ok[:, None], e, torch.zeros_like(e))
        chol[i] = e
        gain = gain - e.square()
        chosen[rows, j] = True
    return torch.sort(torch.stack(picks, dim=1), dim=1).values


def minmax(x: torch.Tensor) -> torch.Tensor:
    """Per row of [N, T]: (x - min + 1e-6) / (max - min), the official normalisation (per image here)."""
    lo = x.min(dim=-1, keepdim=True).values
    hi = x.max(dim=-1, keepdim=True).values
    return (x - lo + 1e-6) / (hi - lo).clamp(min=1e-6)


def conditional_kernel(features: torch.Tensor, relevance: torch.Tensor, theta: float | None) -> torch.Tensor:
    """[N, T, D], [N, T] -> [N, T, T] kernel r_i cos(x_i, x_j) r_j (r = exp(theta / (2 (1 - theta)) r) if theta)."""
    xn = F.normalize(features.float(), dim=-1)
    sim = xn @ xn.transpose(1, 2)
    r = relevance.float()
    if theta is not None:
        r = torch.exp(theta / (2.0 * (1.0 - theta)) * r)
    return r[:, :, None] * sim * r[:, None, :]


def embedding_relevance(features: torch.Tensor, prompt_embeds: list[torch.Tensor]) -> torch.Tensor:
    """[N, T, D] features and per-image [M_i, D] prompt token embeddings -> [N, T] mean_m cos(x_j, e_m)."""
    xn = F.normalize(features.float(), dim=-1)
    return torch.stack([(xn[i] @ F.normalize(e.float(), dim=-1).T).mean(dim=-1) for i, e in enumerate(prompt_embeds)])


@register_strategy
@dataclass(frozen=True)
class CDPruner(VisionStrategy):
    """CDPruner: a conditional DPP over the visual tokens, greedy MAP with incremental Cholesky.

    Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in MLLMs"
    (NeurIPS 2025). With x the projected features, S_ij = cos(x_i, x_j), and r_i the relevance of token i to the
    instruction, min-max normalised per image, the kernel is L = diag(r) S diag(r); the kept set is the greedy MAP
    of det(L_S) (:func:`dpp_greedy_map`). `theta` (default None, as the official code, where the exponential
    re-weighting is commented out) sets r <- exp(theta / (2 (1 - theta)) r) as in the paper.

    Relevance here comes from the language model's own input embeddings of the prompt: r_i = mean_m cos(x_i, e_m)
    over the prompt's token embeddings e_m. Why: it exists in every family (Qwen2-VL and InternVL have no CLIP text
    tower) and x already lives in that space, so no second model is loaded. The official LLaVA code uses a CLIP text
    tower instead; that is `cdpruner_clip`. Departures: the prompt is every real text token of the sample (the
    chat template included), not only the question; the min-max is per image (the official code normalises over
    the whole batch, so a batch changes each image's kernel).
    """

    positions: str = "contiguous"  # as the official code (see Strategy.positions)

    theta: float | None = None

    name: ClassVar[str] = "cdpruner"
    paper: ClassVar[str] = "CDPruner (Zhang et al., NeurIPS 2025)"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.theta is not None and (
            isinstance(self.theta, bool) or not isinstance(self.theta, (int, float)) or not 0.0 <= self.theta < 1.0
        ):
            raise BudgetError(f"cdpruner theta must be None or in [0, 1), got {self.theta!r}")

    def relevance(self, signals: VisionSignals) -> torch.Tensor:
        if signals.prompt_ids is None or signals.embed_tokens is None:
            raise CapabilityError("cdpruner needs the prompt and the language model's input embeddings")
        embeds = [signals.embed_tokens(ids.to(signals.features.device)) for ids in signals.prompt_ids]
        return embedding_relevance(signals.features, embeds)

    def select(self, signals: VisionSignals, k: int) -> VisionSelection:
        feats = signals.features
        n, t = feats.shape[:2]
        if k >= t:
            return VisionSelection(torch.arange(t, device=feats.device).expand(n, t), feats)
        with torch.no_grad():
            relevance = minmax(self.relevance(signals))
            kernel = conditional_kernel(feats, relevance, None if self.theta is None else float(self.theta))
            idx = dpp_greedy_map(kernel, k)
        return VisionSelection(idx, gather_tokens(feats, idx))


@register_strategy
@dataclass(frozen=True)
class CDPrunerCLIP(CDPruner, TextCLIP):
    """CDPruner with the official LLaVA relevance: from the CLIP the vision tower came from.

    r_i = -cos(W_proj LN_post(h_i), E_text(prompt)), h_i the vision tower's feature-layer output for patch i, as in
    the official code (which negates the similarity), then min-max normalised per image; kernel and selection as in
    :class:`CDPruner`. Needs `clip=` and `tokenizer=` as `text_clip` does (loaded with its machinery). The official
    code splits long prompts into 77-token segments and averages over them; here the prompt is truncated to the
    CLIP's context.
    """

    name: ClassVar[str] = "cdpruner_clip"
    paper: ClassVar[str] = "CDPruner (Zhang et al., NeurIPS 2025), CLIP relevance"
    needs: ClassVar[frozenset[str]] = frozenset({"hidden"})

    def relevance(self, signals: VisionSignals) -> torch.Tensor:
        return -self.scores(signals)
