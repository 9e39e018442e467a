"""P-Sigmoid: a parametric sigmoid schedule over decoder depth, its parameters fitted by Bayesian optimisation.

Zhao et al., "Accelerating Multimodal Large Language Models by Searching Optimal Vision Token Reduction" (CVPR 2025,
arXiv 2412.00556): G-Search finds the fewest tokens per layer; under a fixed budget, a parametric sigmoid over the
layers sets each layer's keep rate, its parameters tuned by Bayesian optimisation. The paper's full text could not
be read here; its abstract and a third-party summary give a sigmoid of the layer index with a steepness k, a
midpoint alpha and a ratio b for what the deepest layers keep. The parameterisation below has those three
parameters (steepness, center, floor); the normalisation (s(0) = 1, depth scaled to [0, 1]) and the rescaling that
meets the budget exactly are this library's, so the curves may differ from the paper's in detail.

Fraction of an image's tokens kept at layer l (x = l / (L - 1) in [0, 1])::

    s(x) = floor + (1 - floor) * sigmoid(steepness * (center - x)) / sigmoid(steepness * center)

so s(0) = 1, s falls around `center`, `steepness` sets how sharply, and `floor` is what the deepest layers keep
relative to the rest. The shape is then scaled by one factor to meet the compute target exactly
(:func:`~vtokprune.search.schedule_file.fit_counts`), so every trial costs the same and the optimiser only chooses the
shape. The optimiser is Optuna's TPE sampler (seeded; `pip install 'vtokprune[search]'`), maximising the
calibration objective.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from ..errors import VTokPruneError

RANGES = {"steepness": (0.5, 30.0), "center": (0.0, 1.0), "floor": (0.0, 0.9)}


def sigmoid_shape(num_layers: int, steepness: float, center: float, floor: float) -> list[float]:
    """Fraction kept per layer (non-increasing, first 1.0)."""

    def sig(z: float) -> float:
        return 1.0 / (1.0 + math.exp(-max(min(z, 60.0), -60.0)))

    top = sig(steepness * center)
    out = []
    for layer in range(num_layers):
        x = layer / max(num_layers - 1, 1)
        out.append(floor + (1.0 - floor) * sig(steepness * (center - x)) / top)
    return [1.0] + [min(1.0, max(f, 1e-4)) for f in out[1:]]


def require_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise VTokPruneError(
            "P-Sigmoid and VFlowOpt fit their parameters with Optuna, which is not installed: "
            "pip install 'vtokprune[search]' (or use the greedy search: --method greedy)"
        ) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def optimise(
    objective: Callable[[dict[str, float]], float],
    ranges: dict[str, tuple[float, float]],
    trials: int,
    seed: int,
    start: dict[str, float] | None = None,
) -> tuple[dict[str, float], float]:
    """(best parameters, best value) of `objective` over `ranges` after `trials` TPE trials (deterministic by seed;
    `start` is tried first). Ties go to the earlier trial."""
    optuna = require_optuna()
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(5, max(1, trials // 3)))
    study = optuna.create_study(direction="maximize", sampler=sampler)
    if start is not None:
        study.enqueue_trial(start)

    def run(trial: Any) -> float:
        params = {name: trial.suggest_float(name, low, high) for name, (low, high) in ranges.items()}
        return objective(params)

    study.optimize(run, n_trials=trials)
    best = max(study.trials, key=lambda t: (t.value, -t.number))
    return dict(best.params), float(best.value)
