"""Fit a strategy's hyper-parameters (VFlowOpt's) on calibration data against the unpruned model's answers."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from ..errors import BudgetError
from .api import _bar, _ticker
from .calibration import Calibration
from .evaluator import ScheduleEvaluator
from .psigmoid import optimise

# strategy name -> {parameter: (low, high)} that the optimiser searches
TUNABLE: dict[str, dict[str, tuple[float, float]]] = {
    "vflowopt": {"entropy_weight": (0.0, 1.0), "recycle_top": (0.05, 1.0)},
}


@dataclasses.dataclass
class TuneResult:
    strategy: Any
    params: dict[str, float]
    scores: dict[str, float]
    unpruned: dict[str, float]
    computed: int
    path: Path | None = None


def tune(
    model: Any,
    calibration: Calibration,
    name: str = "vflowopt",
    objective: str = "agreement",
    trials: int = 20,
    seed: int = 0,
    state: str | Path | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    **fixed: Any,
) -> TuneResult:
    """TPE over `TUNABLE[name]` with the other fields `fixed` (budget, layers...); the default parameters are tried
    first. Writes {"strategy", "params", "fixed", "scores", ...} to `out`: `--set` values for sweep and run."""
    from ..registry import get_strategy

    if name not in TUNABLE:
        raise BudgetError(f"no tunable parameters known for {name!r}; tunable: {', '.join(TUNABLE)}")
    ranges = TUNABLE[name]
    clash = sorted(set(ranges) & set(fixed))
    if clash:
        raise BudgetError(f"{', '.join(clash)} are what tune() fits; do not also fix them")
    base: Any = get_strategy(name, **fixed).with_default_budget()  # bad fixed parameters fail before any evaluation
    identity = {
        "model": str(getattr(model.config, "_name_or_path", "")),
        "strategy": name,
        "fixed": {k: repr(v) for k, v in sorted(fixed.items())},
        "calibration": calibration.description,
        "samples": calibration.size,
    }
    bar = _bar(progress, trials)
    evaluator = ScheduleEvaluator(model, calibration, objective, identity, state, on_evaluation=_ticker(bar))

    def value(params: dict[str, float]) -> float:
        strategy = dataclasses.replace(base, **params)
        return evaluator.scores(json.dumps(params, sort_keys=True), strategy=strategy)[objective]

    start = {k: float(getattr(base, k)) for k in ranges}
    params, _ = optimise(value, ranges, trials, seed, start=start)
    if bar is not None:
        bar.close()
    best = dataclasses.replace(base, **params)
    scores = evaluator.scores(json.dumps(params, sort_keys=True), strategy=best)
    result = TuneResult(best, params, scores, evaluator.full, evaluator.computed)
    if out is not None:
        from .. import __version__

        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "strategy": name,
            "params": params,
            "fixed": {k: v for k, v in fixed.items()},
            "objective": {"name": objective, "pruned": scores, "unpruned": evaluator.full},
            "calibration": calibration.description,
            "trials": trials,
            "seed": seed,
            "model_type": getattr(model.config, "model_type", None),
            "vtokprune_version": __version__,
            "set": [f"{name}.{k}={v!r}" for k, v in params.items()],
        }
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(record, indent=1, sort_keys=True, default=repr))
        os.replace(tmp, path)
        result.path = path
    return result
