"""Searched per-layer budgets: G-Search (greedy) and P-Sigmoid (Bayesian optimisation), written as schedule files
that the `scheduled` strategy applies (`vtokprune.apply(model, "scheduled", file="s.json")`)."""

from .api import METHODS, SearchResult, search
from .calibration import Calibration, predict, score, toy_calibration
from .lmms_tasks import lmms_calibration
from .schedule_file import fit_counts, read_schedule, stages, write_schedule

__all__ = [
    "METHODS",
    "Calibration",
    "SearchResult",
    "fit_counts",
    "lmms_calibration",
    "predict",
    "read_schedule",
    "score",
    "search",
    "stages",
    "toy_calibration",
    "write_schedule",
]
