"""PyramidDrop (decoder side), and the multi-stage schedule helpers the other staged in-LLM strategies share."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch

from ..errors import BudgetError
from .base import LLMContext, LLMStrategy
from .fastv import last_token_attention_scores
from .registry import register_strategy

# ---------------------------------------------------------------------------------------------- schedule helpers


def scale_layer(layer: int, num_layers: int, reference: int) -> int:
    """Map a layer index given for a `reference`-layer model onto a `num_layers`-layer one.

    round-half-up(layer * num_layers / reference), clamped to [1, num_layers - 1] (a stage before layer 0 or at the
    end of the model would prune nothing useful). E.g. 8 / 16 / 24 of 32 -> 1 / 2 / 3 of 4.
    """
    scaled = math.floor(layer * num_layers / reference + 0.5)
    return min(max(scaled, 1), max(num_layers - 1, 1))


def geometric_counts(available: int, stages: int, final: int) -> list[int]:
    """Tokens per image after each of `stages` stages, shrinking by a constant factor from `available` to `final`.

    count_i = round(available * (final / available) ** ((i + 1) / stages)); the last is exactly `final`, and the
    sequence never increases nor drops below `final`.
    """
    if stages < 1:
        return []
    factor = final / available
    counts = [math.floor(available * factor ** ((i + 1) / stages) + 0.5) for i in range(stages - 1)] + [final]
    out: list[int] = []
    prev = available
    for c in counts:
        c = min(max(c, final), prev)
        out.append(c)
        prev = c
    return out


def place_stages(
    layers: Sequence[int], counts: Sequence[int], num_layers: int, reference: int | None
) -> dict[int, int]:
    """{scaled layer: count}; stages that land on the same layer merge, keeping the smaller (later) count."""
    out: dict[int, int] = {}
    for layer, count in zip(layers, counts):
        at = layer if reference is None else scale_layer(layer, num_layers, reference)
        out[at] = min(count, out.get(at, count))
    return dict(sorted(out.items()))


def validate_layers(layers: Any, what: str) -> tuple[int, ...]:
    """Layers as a strictly increasing tuple of ints >= 1 (raises BudgetError otherwise)."""
    try:
        out = tuple(layers)
    except TypeError:
        raise BudgetError(f"{what} must be a sequence of layer indices, got {layers!r}") from None
    if not out:
        raise BudgetError(f"{what} must name at least one layer")
    for layer in out:
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 1:
            raise BudgetError(f"{what} must hold ints >= 1 (prune before that decoder layer), got {layer!r}")
    if any(b <= a for a, b in zip(out, out[1:])):
        raise BudgetError(f"{what} must be strictly increasing, got {out}")
    return out


def validate_reference(reference: Any) -> None:
    if reference is not None and (isinstance(reference, bool) or not isinstance(reference, int) or reference < 2):
        raise BudgetError(f"reference_layers must be an int >= 2 or None (layers are absolute), got {reference!r}")


# ---------------------------------------------------------------------------------------------- PyramidDrop


def pyramid_counts(available: int, stages: int, lam: float, rounding: str = "floor") -> list[int]:
    """[max(1, int(available * lam ** (i + 1))) for each stage]: 576 tokens, lam 0.5 -> 288, 144, 72.

    rounding="floor" is the official `int()`; "half_up" rounds to nearest (this library's earlier choice)."""
    shift = 0.5 if rounding == "half_up" else 0.0
    return [max(1, math.floor(available * lam ** (i + 1) + shift)) for i in range(stages)]


@register_strategy
@dataclass(frozen=True)
class PyramidDrop(LLMStrategy):
    """PyramidDrop: split the decoder into stages and, at the end of each, keep a fraction lambda of the visual tokens.

    Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual Redundancy
    Reduction" (2024). Before stage layer K, score_j = (1/H) sum_h A_h[last, j], the head-averaged attention the last
    instruction token pays to visual token j; the top lambda fraction of the remaining visual tokens go on. Paper
    default (LLaVA-1.5, 32 layers): stages before layers 8, 16, 24 and lambda = 0.5, so 576 -> 288 -> 144 -> 72.

    Official behaviour (Cooperx521/PyramidDrop, `modeling_llama_pdrop.py`), the default here:
    * `score_layer="stage"`: A is recomputed with layer K's own q/k projections on the stage input (the runtime runs
      layer K's attention once more on the unpruned input, cache untouched); "previous" uses layer K-1's attention
      (this library's earlier behaviour, one attention pass cheaper);
    * `rounding="floor"`: stage i keeps int(T * lam^(i+1)) tokens; "half_up" rounds to nearest (earlier behaviour);
    * the official code renumbers the kept tokens' positions; see `positions`.

    The schedule is data:

    * `layers` (default (8, 16, 24)) are given for a `reference_layers`-deep model (default 32) and scaled to the
      model's depth (see :func:`scale_layer`); stages landing on the same layer merge, keeping the smaller count.
      `reference_layers=None` takes the layers as absolute indices.
    * Budget, one of:
        - `lam` (default 0.5 when nothing else is given): stage i keeps round(T * lam^(i+1)) of an image's T tokens;
        - `keep` / `ratio`: the budget of the *last* stage; lambda is derived as (final / T)^(1/n) over the n stages,
          so intermediate stages shrink geometrically and the last reaches exactly `keep` (or ceil(ratio * T));
        - `fractions`: an explicit mapping {layer (in reference depth): fraction of T kept from that layer on}, which
          replaces `layers` and must be non-increasing (count = ceil(fraction * T), at least 1).
      These are mutually exclusive.
    """

    positions: str = "contiguous"  # as the official code (see Strategy.positions)

    layers: tuple[int, ...] | None = None
    lam: float | None = None
    fractions: Mapping[int, float] | tuple[tuple[int, float], ...] | None = None
    reference_layers: int | None = 32
    score_layer: str = "stage"
    rounding: str = "floor"

    name: ClassVar[str] = "pdrop"
    paper: ClassVar[str] = "PyramidDrop (Xing et al., 2024)"
    default_layers: ClassVar[tuple[int, ...]] = (8, 16, 24)
    default_lam: ClassVar[float] = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_reference(self.reference_layers)
        if self.score_layer not in ("stage", "previous"):
            raise BudgetError(f"pdrop score_layer must be 'stage' or 'previous', got {self.score_layer!r}")
        if self.rounding not in ("floor", "half_up"):
            raise BudgetError(f"pdrop rounding must be 'floor' or 'half_up', got {self.rounding!r}")
        given = [n for n, v in (("keep", self.keep), ("ratio", self.ratio), ("lam", self.lam)) if v is not None]
        if self.fractions is not None:
            if given:
                raise BudgetError(f"pdrop: give fractions= or {'/'.join(given)}=, not both")
            if self.layers is not None:
                raise BudgetError("pdrop: fractions= names its own layers; do not also give layers=")
            items = dict(self.fractions).items() if not isinstance(self.fractions, tuple) else self.fractions
            pairs = tuple(sorted((layer, frac) for layer, frac in items))
            validate_layers([layer for layer, _ in pairs], "pdrop fractions' layers")
            prev = 1.0
            for layer, frac in pairs:
                if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0.0 < float(frac) <= prev:
                    raise BudgetError(
                        f"pdrop fractions must be in (0, 1] and non-increasing with depth; got {frac!r} at layer {layer}"
                    )
                prev = float(frac)
            object.__setattr__(self, "fractions", tuple((layer, float(frac)) for layer, frac in pairs))
        if self.layers is not None:
            object.__setattr__(self, "layers", validate_layers(self.layers, "pdrop layers"))
        if self.lam is not None:
            if len(given) > 1:
                raise BudgetError(f"pdrop: give one of keep=, ratio=, lam=; got {', '.join(given)}")
            if isinstance(self.lam, bool) or not isinstance(self.lam, (int, float)) or not 0.0 < self.lam <= 1.0:
                raise BudgetError(f"pdrop lam must be in (0, 1], got {self.lam!r}")

    def has_budget(self) -> bool:
        return True  # nothing given means the paper's lambda = 0.5 (see stage_counts)

    def with_default_budget(self) -> PyramidDrop:
        given = (self.keep, self.ratio, self.lam, self.fractions)
        return self if any(v is not None for v in given) else dataclasses.replace(self, lam=self.default_lam)

    def stage_counts(self, available: int) -> tuple[tuple[int, ...], list[int]]:
        """(layers in reference depth, tokens per image kept from each on), before scaling to the model."""
        if self.fractions is not None:
            pairs = cast("tuple[tuple[int, float], ...]", self.fractions)  # normalised by __post_init__
            layers = tuple(layer for layer, _ in pairs)
            counts = [max(1, min(available, math.ceil(f * available - 1e-9))) for _, f in pairs]
            return layers, counts
        layers = self.layers if self.layers is not None else self.default_layers
        if self.keep is not None or self.ratio is not None:
            return layers, geometric_counts(available, len(layers), self.budget(available))
        lam = self.lam if self.lam is not None else self.default_lam
        return layers, pyramid_counts(available, len(layers), float(lam), self.rounding)

    def schedule(self, num_layers: int, available: int) -> dict[int, int]:
        layers, counts = self.stage_counts(available)
        return place_stages(layers, counts, num_layers, self.reference_layers)

    def probe_layer(self, stage: int) -> int:
        return stage if self.score_layer == "stage" else stage - 1

    def score(self, probs: torch.Tensor, row_valid: torch.Tensor, ctx: LLMContext) -> torch.Tensor:
        return last_token_attention_scores(probs)
