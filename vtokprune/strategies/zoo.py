"""ZOO-Prune: zeroth-order sensitivity of each visual token at the projector, combined with diversity."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BudgetError, CapabilityError
from ..selection import gather_tokens
from .base import VisionSelection, VisionSignals, VisionStrategy
from .registry import register_strategy


@torch.no_grad()
def zeroth_order_sensitivity(
    projector: Any, inputs: torch.Tensor, perturbations: int, epsilon: float, seed: int
) -> torch.Tensor:
    """[N, T, Dv] projector inputs -> [N, T] sensitivity, a zeroth-order estimate of each token's Jacobian norm.

    s_i = (1/S) sum_s ||P(h_i + eps u_s) - P(h_i - eps u_s)|| / (2 eps ||u_s||), u_s ~ N(0, I) drawn from a
    generator seeded with `seed` (on the CPU, so results do not depend on the device), the same directions for
    every token. The projector acts on each token alone, so all tokens are perturbed in one batched call.
    LLaVA's Linear -> activation -> Linear projector takes a shortcut with the same value up to float rounding
    (:func:`_mlp_sensitivity`) when one token confirms that structure; any other projector is called as a black box.
    """
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    directions = []
    for _ in range(perturbations):
        u = torch.randn(inputs.shape[-1], generator=gen).to(inputs.device)
        directions.append(u / u.norm().clamp(min=1e-12))
    mlp = _llava_mlp(projector)
    if mlp is not None and _mlp_matches(projector, mlp, inputs):
        return _mlp_sensitivity(*mlp, inputs, directions, epsilon)
    x = inputs.float()
    total = torch.zeros(x.shape[:2], dtype=torch.float32, device=x.device)
    for u in directions:
        delta = projector((x + epsilon * u).to(inputs.dtype)) - projector((x - epsilon * u).to(inputs.dtype))
        total += delta.float().norm(dim=-1) / (2.0 * epsilon)
    return total / perturbations


def _llava_mlp(projector: Any) -> tuple[nn.Linear, Any, nn.Linear] | None:
    """(linear_1, act, linear_2) of an unmodified LlavaMultiModalProjector, else None (a subclass may differ)."""
    try:
        from transformers.models.llava.modeling_llava import LlavaMultiModalProjector
    except ImportError:  # pragma: no cover - transformers without LLaVA
        return None
    if type(projector) is not LlavaMultiModalProjector:
        return None
    return projector.linear_1, projector.act, projector.linear_2


def _mlp_matches(projector: Any, mlp: tuple[nn.Linear, Any, nn.Linear], inputs: torch.Tensor) -> bool:
    """Does the projector still compute linear_2(act(linear_1(x)))? Checked on one token per call: the shortcut reads
    transformers internals, and a release that changed the projector's forward must not change our scores."""
    linear_1, act, linear_2 = mlp
    x = inputs[:1, :1]
    mine = linear_2(act(linear_1(x))).float()
    return bool(torch.allclose(projector(x).float(), mine, rtol=1e-3, atol=1e-3 * float(mine.abs().max()) + 1e-6))


def _mlp_sensitivity(
    linear_1: nn.Linear, act: Any, linear_2: nn.Linear, inputs: torch.Tensor, directions: list[torch.Tensor], eps: float
) -> torch.Tensor:
    """The same estimate for P(x) = W2 act(W1 x + b1) + b2, by linearity: W1 (x +- eps u) = W1 x +- eps W1 u and
    P(a) - P(b) = W2 (act(a') - act(b')), so one W1 matmul in all and one W2 matmul per direction instead of four
    (16 projector calls at the default 8 directions cost ~3x what this does). Computed in float32."""
    w1, w2 = linear_1.weight.float(), linear_2.weight.float()
    b1 = None if linear_1.bias is None else linear_1.bias.float()
    h = F.linear(inputs.float(), w1, b1)
    total = torch.zeros(h.shape[:2], dtype=torch.float32, device=h.device)
    for u in directions:
        v = eps * (w1 @ u.float())
        delta = F.linear(act(h + v) - act(h - v), w2)
        total += delta.norm(dim=-1) / (2.0 * eps)
    return total / len(directions)


def sensitivity_diversity_select(sensitivity: torch.Tensor, features: torch.Tensor, k: int) -> torch.Tensor:
    """One image: [T] sensitivity, [T, D] features -> [k] ascending indices.

    Greedy: first the most sensitive token; then argmax_j s_j * min_{i in S} (1 - cos(x_j, x_i)) over the rest
    (ties -> lower index), so a sensitive token that duplicates a kept one scores ~0.
    """
    xn = F.normalize(features.float(), dim=-1)
    t = xn.shape[0]
    chosen = torch.zeros(t, dtype=torch.bool, device=xn.device)
    first = int(sensitivity.float().argmax())
    picks = [first]
    chosen[first] = True
    nearest = 1.0 - xn @ xn[first]
    for _ in range(k - 1):
        hybrid = (sensitivity.float() * nearest.clamp(min=0)).masked_fill(chosen, -torch.inf)
        nxt = int(hybrid.argmax())
        picks.append(nxt)
        chosen[nxt] = True
        nearest = torch.minimum(nearest, 1.0 - xn @ xn[nxt])
    return torch.sort(torch.tensor(picks, device=xn.device)).values


@register_strategy
@dataclass(frozen=True)
class ZOOPrune(VisionStrategy):
    """ZOO-Prune: rank visual tokens by zeroth-order sensitivity at the projector, picked greedily with diversity.

    Kim et al., "ZOO-Prune: Training-Free Token Pruning via Zeroth-Order Gradient Estimation in Vision-Language
    Models" (arXiv 2509.24837, CVPR 2026). Sensitivity s_i: how much the projected feature of token i moves under
    small random perturbations of its projector input (:func:`zeroth_order_sensitivity`, `perturbations` directions
    of size `epsilon`, deterministic under `seed`); selection: the most sensitive token, then greedily the token
    maximising sensitivity x cosine distance to the kept set (:func:`sensitivity_diversity_select`).

    Written from the paper's description (no official code was found): the hybrid product, central differences,
    unit-norm Gaussian directions and the defaults (8 perturbations, epsilon 1e-2) are this implementation's choices.
    Needs the projector and its per-token input, which only the LLaVA-1.5 adapter exposes (elsewhere the projector
    mixes several patches per token, or the tokens are re-arranged after it): other families raise CapabilityError.
    """

    positions: str = "contiguous"  # as the official code (see Strategy.positions)

    perturbations: int = 8
    epsilon: float = 1e-2
    seed: int = 0

    name: ClassVar[str] = "zoo"
    paper: ClassVar[str] = "ZOO-Prune (Kim et al., CVPR 2026)"
    needs: ClassVar[frozenset[str]] = frozenset({"projector"})

    def __post_init__(self) -> None:
        super().__post_init__()
        for field_name in ("perturbations", "seed"):
            value = getattr(self, field_name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or value < (1 if field_name == "perturbations" else 0)
            ):
                raise BudgetError(f"zoo {field_name} must be a non-negative int (perturbations >= 1), got {value!r}")
        eps = self.epsilon
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise BudgetError(f"zoo epsilon must be > 0, got {eps!r}")

    def select(self, signals: VisionSignals, k: int) -> VisionSelection:
        feats = signals.features
        n, t = feats.shape[:2]
        if k >= t:
            return VisionSelection(torch.arange(t, device=feats.device).expand(n, t), feats)
        if signals.projector is None or signals.projector_input is None:
            raise CapabilityError("zoo needs the projector and its input; this adapter does not expose them")
        sens = zeroth_order_sensitivity(
            signals.projector, signals.projector_input, self.perturbations, float(self.epsilon), self.seed
        )
        idx = torch.stack([sensitivity_diversity_select(sens[i], feats[i], k) for i in range(n)])
        return VisionSelection(idx, gather_tokens(feats, idx))
