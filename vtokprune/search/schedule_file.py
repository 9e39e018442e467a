"""Per-layer schedules as data: counts per decoder layer, fitting them to a compute target, and the schedule file.

A schedule here is the full list ``counts[l]`` = visual tokens per image entering decoder layer ``l`` (length
``num_layers``; ``counts[0]`` is every token, since a stage needs the layer before it to score the tokens; never
increasing with depth). :func:`stages` turns it into the ``{layer: kept}`` form strategies return.

The schedule file (JSON) records what produced it, so that a result can be traced and re-run::

    {"format": "vtokprune-schedule", "format_version": 1, "vtokprune_version": "0.1.0",
     "model_type": "llava", "num_layers": 4, "visual_tokens": 576, "counts": [576, 288, 96, 40],
     "score_layer": "previous", "method": "greedy", "settings": {...}, "seed": 0,
     "compute": {"avg_visual_tokens": 250.0, "prefill_tflops": ...}, "objective": {...}}
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import BudgetError

FORMAT = "vtokprune-schedule"
FORMAT_VERSION = 1


def validate_counts(counts: Sequence[int], tokens: int, what: str = "schedule") -> tuple[int, ...]:
    """Counts as a tuple of ints: counts[0] == tokens, each in [1, tokens], never increasing (BudgetError otherwise)."""
    out = tuple(counts)
    if len(out) < 2:
        raise BudgetError(f"{what}: needs one count per decoder layer (at least 2 layers), got {list(out)}")
    for c in out:
        if isinstance(c, bool) or not isinstance(c, int) or not 1 <= c <= tokens:
            raise BudgetError(f"{what}: counts must be ints in [1, {tokens}] (visual tokens per image), got {c!r}")
    if out[0] != tokens:
        raise BudgetError(
            f"{what}: layer 0 must see all {tokens} visual tokens (a stage is scored by the layer before it), "
            f"got {out[0]}"
        )
    if any(b > a for a, b in zip(out, out[1:])):
        raise BudgetError(f"{what}: counts must never increase with depth (pruned tokens do not come back), got {out}")
    return out


def stages(counts: Sequence[int]) -> dict[int, int]:
    """{layer: kept} at every layer where the count drops (the form `LLMStrategy.schedule` returns)."""
    return {layer: c for layer, c in enumerate(counts) if layer > 0 and c < counts[layer - 1]}


def average(counts: Sequence[int]) -> float:
    return sum(counts) / len(counts)


def _scaled(shape: Sequence[float], available: int, factor: float) -> list[int]:
    out = [available]
    for frac in shape[1:]:
        out.append(min(out[-1], max(1, math.floor(frac * available * factor))))
    return out


def fit_counts(
    shape: Sequence[float], available: int, measure: Callable[[list[int]], float], target: float
) -> list[int]:
    """Counts following `shape` (fraction kept per layer, shape[0] = 1, non-increasing) scaled by one factor to the
    largest cost `measure(counts)` not above `target`, then topped up one token at a time, shallowest layer first.

    Raises BudgetError if even one token per layer after layer 0 costs more than `target`.
    """
    floor_counts = [available] + [1] * (len(shape) - 1)
    if measure(floor_counts) > target + 1e-9:
        raise BudgetError(
            f"compute target {target:g} is below the cheapest schedule ({measure(floor_counts):g}: layer 0 always "
            f"sees all {available} visual tokens, later layers at least 1); raise the target"
        )
    low, high = 0.0, 1.0 / max(min(f for f in shape[1:]), 1e-6)
    if measure(_scaled(shape, available, high)) <= target:
        low = high
    else:
        for _ in range(50):
            mid = (low + high) / 2
            low, high = (mid, high) if measure(_scaled(shape, available, mid)) <= target else (low, mid)
    counts = _scaled(shape, available, low)
    for layer in range(1, len(counts)):  # spend what is left, shallowest first, keeping counts non-increasing
        while counts[layer] < counts[layer - 1]:
            counts[layer] += 1
            if measure(counts) > target + 1e-9:
                counts[layer] -= 1
                break
    return counts


def scale_to_last(counts: Sequence[int], available: int, last: int) -> list[int]:
    """`counts` (for `available` tokens) multiplied by one factor so the deepest layer keeps exactly `last`."""
    factor = last / counts[-1]
    out = [available]
    for c in counts[1:-1]:
        out.append(min(out[-1], max(last, math.floor(c * factor + 0.5))))
    return [*out, min(out[-1], last)] if len(counts) > 1 else out


def for_available(counts: Sequence[int], tokens: int, available: int) -> list[int]:
    """A schedule searched for `tokens` visual tokens, applied to an image of `available`: same fractions kept."""
    if available == tokens:
        return list(counts)
    out = [available]
    for c in counts[1:]:
        out.append(min(out[-1], max(1, math.ceil(c * available / tokens - 1e-9))))
    return out


# ------------------------------------------------------------------------------------------------------- the file


def write_schedule(path: str | Path, record: dict[str, Any]) -> Path:
    """Validate and write a schedule file atomically; returns its path."""
    from .. import __version__

    data = {"format": FORMAT, "format_version": FORMAT_VERSION, "vtokprune_version": __version__, **record}
    validate_counts(data["counts"], int(data["visual_tokens"]), "schedule file")
    if len(data["counts"]) != int(data["num_layers"]):
        raise BudgetError(f"schedule file: {len(data['counts'])} counts for {data['num_layers']} layers")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)
    return path


def read_schedule(path: str | Path) -> dict[str, Any]:
    """The schedule file's record, checked (BudgetError naming the problem otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise BudgetError(f"schedule file {str(path)!r} does not exist; write one with `vtokprune search --out FILE`")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BudgetError(
            f"schedule file {str(path)!r} is not valid JSON ({e}); rewrite it with `vtokprune search`"
        ) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise BudgetError(f'{str(path)!r} is not a vtokprune schedule file (no "format": "{FORMAT}")')
    if int(data.get("format_version", 0)) > FORMAT_VERSION:
        raise BudgetError(f"schedule file {str(path)!r} has format_version {data['format_version']}; upgrade vtokprune")
    for key in ("num_layers", "visual_tokens", "counts"):
        if key not in data:
            raise BudgetError(f"schedule file {str(path)!r} has no {key!r}")
    data["counts"] = list(validate_counts(data["counts"], int(data["visual_tokens"]), f"schedule file {path}"))
    if len(data["counts"]) != int(data["num_layers"]):
        raise BudgetError(f"schedule file {str(path)!r}: {len(data['counts'])} counts for {data['num_layers']} layers")
    return data
