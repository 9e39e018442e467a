"""`vtokprune sweep`: accuracy and latency of strategies x token budgets x tasks, as JSON, CSV and PNG plots.

With no arguments it runs offline on the embedded model and the local toy-world task (a few strategies, 3 budgets,
30 questions: a few minutes on a laptop CPU)::

    vtokprune sweep                                   # -> runs/sweep/{results.json,results.csv,accuracy.png,latency.png}
    vtokprune sweep --model llava-hf/llava-1.5-7b-hf --strategies cls,visionzip,fastv,divprune \\
        --budgets 192,128,64 --backend lmms-eval --tasks pope,gqa --limit 500 --batch-size 8 --dtype bfloat16

The results file is the resume log: every finished (model, backend, task, strategy, budget, limit) cell is written
as soon as it is done, and a second run with the same file recomputes none of them (``--force`` does). Budgets are
token counts (``64``) or fractions of each image's tokens (``0.25``). The unpruned model is always measured too.

Backends: ``inprocess`` (default; vtokprune's own loop, local tasks ``vtokprune_toy`` and ``vtokprune_toy_mc`` only,
no lmms-eval needed) and ``lmms-eval`` (any lmms-eval task, through ``lmms_eval.evaluator.simple_evaluate`` with
the ``vtokprune`` model loaded once and re-pruned per cell). ``--processes N`` runs the lmms-eval backend
data-parallel under torchrun (or start ``torchrun ... -m vtokprune.cli sweep ...`` yourself, multi-node included);
only rank 0 writes files.

Every accuracy carries its 95% Wilson interval and n; every result its equal-compute fields (average visual tokens
over decoder layers, analytic prefill TFLOPs: :mod:`vtokprune.compute`), and ``--match-compute`` re-runs the pre-LLM
strategies at each in-LLM result's equivalent keep. ``results.json`` records the environment and the random-floor
check (:mod:`vtokprune.reporting`). A sweep in which no pruned cell succeeded exits 1.

Modules: `engine.py` (budgets, the plan of cells, resuming, the report), `backends.py` (in-process and lmms-eval),
`results.py` (results.json, CSV, plots, table), `command.py` (the command line and its torchrun relaunch).
"""

from . import backends, command, engine, results
from .backends import BACKENDS, LOCAL_TASKS, InProcessBackend, LmmsEvalBackend, lmms_task_manager
from .command import main
from .engine import (
    DEFAULT_BUDGETS,
    DEFAULT_LIMIT,
    DEFAULT_STRATEGIES,
    DEFAULT_TASKS,
    Budget,
    cell_key,
    check_tasks,
    failure_reason,
    parse_budget,
    run_sweep,
)
from .results import CSV_FIELDS, load_results, save_results, table, write_csv, write_plots

__all__ = [
    "BACKENDS",
    "CSV_FIELDS",
    "DEFAULT_BUDGETS",
    "DEFAULT_LIMIT",
    "DEFAULT_STRATEGIES",
    "DEFAULT_TASKS",
    "LOCAL_TASKS",
    "Budget",
    "InProcessBackend",
    "LmmsEvalBackend",
    "backends",
    "cell_key",
    "check_tasks",
    "command",
    "engine",
    "failure_reason",
    "lmms_task_manager",
    "load_results",
    "main",
    "parse_budget",
    "results",
    "run_sweep",
    "save_results",
    "table",
    "write_csv",
    "write_plots",
]
