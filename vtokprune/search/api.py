"""`vtokprune.search.search`: find a per-layer schedule for a model and write it as a schedule file."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BudgetError
from .calibration import Calibration
from .evaluator import ScheduleEvaluator
from .greedy import greedy_evaluations, greedy_search
from .psigmoid import RANGES, optimise, sigmoid_shape
from .schedule_file import average, fit_counts, write_schedule

METHODS = ("greedy", "psigmoid")
# strategy family -> how a stage scores the tokens (both rank by the last token's attention)
FAMILIES = {"fastv": "previous", "pdrop": "stage"}


@dataclass
class SearchResult:
    counts: list[int]
    scores: dict[str, float]
    unpruned: dict[str, float]
    compute: dict[str, float]
    evaluations: int
    computed: int
    params: dict[str, float] = field(default_factory=dict)
    path: Path | None = None
    greedy_counts: list[int] | None = None


def compute_measures(model: Any, visual: int, text: int) -> dict[str, Callable[[list[int]], float]]:
    from ..compute import DecoderShape, prefill_flops

    shape = DecoderShape.from_config(model.config)
    return {"avg_tokens": average, "tflops": lambda counts: prefill_flops(shape, text, list(counts)) / 1e12}


def search(
    model: Any,
    calibration: Calibration,
    method: str = "greedy",
    family: str = "fastv",
    objective: str = "agreement",
    avg_tokens: float | None = None,
    tflops: float | None = None,
    tolerance: float = 0.02,
    levels: int = 16,
    trials: int = 20,
    seed: int = 0,
    state: str | Path | None = None,
    out: str | Path | None = None,
    progress: bool = True,
) -> SearchResult:
    """Search a schedule; write it to `out` (a schedule file `apply` and `sweep` take via the `scheduled` strategy).

    method "greedy" (G-Search): the fewest tokens per layer, shallow to deep, with the objective within `tolerance`
    of the unpruned model's; then, if a compute target is given, the schedule is scaled to meet it exactly.
    method "psigmoid": a sigmoid schedule at the compute target (required), its shape fitted by `trials` TPE trials.
    Compute target: `avg_tokens` (visual tokens averaged over decoder layers) or `tflops` (analytic prefill, one
    sample with the calibration set's mean text length). `state`: resume log (rerun = same result, nothing redone).
    """
    if method not in METHODS:
        raise BudgetError(f"unknown search method {method!r}; choose one of {', '.join(METHODS)}")
    if family not in FAMILIES:
        raise BudgetError(f"unknown strategy family {family!r} for the per-layer scores; choose {', '.join(FAMILIES)}")
    if avg_tokens is not None and tflops is not None:
        raise BudgetError("give one compute target: avg_tokens= or tflops=, not both")
    if method == "psigmoid" and avg_tokens is None and tflops is None:
        raise BudgetError("psigmoid needs a compute target: avg_tokens= (e.g. 96) or tflops=")
    if not 0 <= tolerance < 1:
        raise BudgetError(f"tolerance must be in [0, 1), got {tolerance}")
    if levels < 2 or trials < 1:
        raise BudgetError(f"need levels >= 2 and trials >= 1, got levels={levels}, trials={trials}")
    from ..compute import DecoderShape

    num_layers = DecoderShape.from_config(model.config).num_layers
    image_token_id = getattr(model.config, "image_token_id", None)
    if image_token_id is None:
        raise BudgetError("the model's config names no image_token_id; search needs a VLM with image placeholders")
    visual, text = calibration.visual_and_text_tokens(int(image_token_id))
    if visual < 2:
        raise BudgetError("the calibration inputs carry no image tokens; build them with images")
    measures = compute_measures(model, visual, text)
    target_kind, target = ("avg_tokens", avg_tokens) if tflops is None else ("tflops", tflops)
    measure = measures[target_kind]
    if target is not None:  # an unreachable target fails before any evaluation
        fit_counts([1.0] * num_layers, visual, measure, float(target))
    settings = {
        "method": method,
        "family": family,
        "objective": objective,
        "target": {target_kind: target},
        "tolerance": tolerance,
        "levels": levels,
        "trials": trials,
        "seed": seed,
        "calibration": calibration.description,
        "samples": calibration.size,
        "num_layers": num_layers,
        "visual_tokens": visual,
    }
    bar = _bar(progress, greedy_evaluations(num_layers, levels) + 1 if method == "greedy" else trials)
    # what the cached evaluations depend on: a rerun with another method, target or tolerance reuses them
    identity = {
        "model": str(getattr(model.config, "_name_or_path", "")),
        "family": family,
        "calibration": calibration.description,
        "samples": calibration.size,
        "num_layers": num_layers,
        "visual_tokens": visual,
    }
    evaluator = ScheduleEvaluator(
        model, calibration, objective, identity, state, FAMILIES[family], on_evaluation=_ticker(bar)
    )
    params: dict[str, float] = {}
    found: list[int] | None = None  # greedy: the schedule before scaling to the target
    if method == "greedy":
        threshold = evaluator.full[objective] - tolerance
        counts = greedy_search(evaluator, num_layers, visual, threshold, levels)
        found = counts
        if target is not None:
            counts = fit_counts([c / visual for c in counts], visual, measure, float(target))
    else:
        assert target is not None

        def counts_for(p: dict[str, float]) -> list[int]:
            shape = sigmoid_shape(num_layers, p["steepness"], p["center"], p["floor"])
            return fit_counts(shape, visual, measure, float(target))

        params, _ = optimise(lambda p: evaluator(counts_for(p)), RANGES, trials, seed)
        counts = counts_for(params)
    scores = evaluator.scores(",".join(map(str, counts)), counts)
    if bar is not None:
        bar.close()
    compute = {"avg_visual_tokens": round(average(counts), 3), "prefill_tflops": measures["tflops"](counts)}
    result = SearchResult(
        counts=counts,
        scores=scores,
        unpruned=evaluator.full,
        compute=compute,
        evaluations=len(evaluator.data["evaluations"]),
        computed=evaluator.computed,
        params=params,
        greedy_counts=found,
    )
    evaluator.set_result(settings, {"counts": counts, "scores": scores, "params": params})
    if out is not None:
        result.path = write_schedule(
            out,
            {
                "model_type": getattr(model.config, "model_type", None),
                "num_layers": num_layers,
                "visual_tokens": visual,
                "counts": counts,
                "score_layer": FAMILIES[family],
                "method": method,
                "family": family,
                "settings": settings,
                "seed": seed,
                "params": params,
                "greedy_counts": found,
                "compute": {**compute, "text_tokens": text},
                "objective": {"name": objective, "pruned": scores, "unpruned": evaluator.full},
            },
        )
    return result


def _bar(progress: bool, total: int) -> Any:
    if not progress:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="search", unit="eval")


def _ticker(bar: Any) -> Callable[[], None] | None:
    return None if bar is None else (lambda: bar.update(1))
