"""Scores schedules on the calibration set, caching every evaluation in a state file (the resume log)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import BudgetError
from .calibration import Calibration, predict, score

OBJECTIVES = ("agreement", "accuracy")


class ScheduleEvaluator:
    """objective(counts) on the calibration set; every result is written to `state` right after it is computed,
    and a rerun with the same settings reads them back instead of recomputing (same answers, same search path)."""

    def __init__(
        self,
        model: Any,
        calibration: Calibration,
        objective: str,
        settings: dict[str, Any],
        state: str | Path | None = None,
        score_layer: str = "previous",
        make_strategy: Callable[[Sequence[int]], Any] | None = None,
        on_evaluation: Callable[[], None] | None = None,
    ) -> None:
        if objective not in OBJECTIVES:
            raise BudgetError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
        if objective == "accuracy" and calibration.labels is None:
            raise BudgetError("objective 'accuracy' needs labelled calibration data; use objective='agreement'")
        self.model, self.calibration, self.objective = model, calibration, objective
        self.score_layer = score_layer
        self.make_strategy = make_strategy or self._scheduled
        self.on_evaluation = on_evaluation
        self.path = Path(state) if state else None
        self.settings = json.loads(json.dumps(settings, sort_keys=True, default=str))
        self.data: dict[str, Any] = {"version": 1, "settings": self.settings, "evaluations": {}}
        if self.path is not None and self.path.exists():
            saved = json.loads(self.path.read_text())
            if saved.get("settings") != self.settings:
                raise BudgetError(
                    f"state file {str(self.path)!r} holds evaluations of another model, calibration set or family; "
                    "delete it, or pass another state path (--state), to start over"
                )
            self.data = saved
        self.computed = 0
        if "reference" not in self.data:
            self.data["reference"] = predict(model, calibration)
            self._save()
        self.reference: list[int] = self.data["reference"]
        self.full = score(self.reference, self.reference, calibration.labels)

    def _scheduled(self, counts: Sequence[int]) -> Any:
        from ..strategies.scheduled import Scheduled

        return Scheduled(counts=tuple(counts), score_layer=self.score_layer)

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.data, sort_keys=True))
        os.replace(tmp, self.path)

    def scores(self, key: str, counts: Sequence[int] | None = None, strategy: Any = None) -> dict[str, float]:
        """All metrics of one candidate (`key` names it in the cache); computed at most once."""
        cached = self.data["evaluations"].get(key)
        if cached is not None:
            return dict(cached)
        if strategy is None:
            assert counts is not None
            strategy = self.make_strategy(counts)
        result = score(predict(self.model, self.calibration, strategy), self.reference, self.calibration.labels)
        self.data["evaluations"][key] = result
        self.computed += 1
        self._save()
        if self.on_evaluation is not None:
            self.on_evaluation()
        return result

    def __call__(self, counts: Sequence[int]) -> float:
        return self.scores(",".join(map(str, counts)), counts)[self.objective]

    def set_result(self, settings: dict[str, Any], result: dict[str, Any]) -> None:
        """Record a finished search (one entry per distinct settings)."""
        key = json.dumps(settings, sort_keys=True, default=str)
        self.data.setdefault("results", {})[key] = result
        self._save()
