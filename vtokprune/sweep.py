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
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_STRATEGIES = ("cls", "visionzip", "random", "pool")
DEFAULT_BUDGETS = ("0.333", "0.222", "0.111")  # 192 / 128 / 64 of LLaVA-1.5's 576 tokens
DEFAULT_TASKS = ("vtokprune_toy",)
DEFAULT_LIMIT = 30
LOCAL_TASKS = ("vtokprune_toy", "vtokprune_toy_mc")
CSV_FIELDS = (
    "task",
    "strategy",
    "budget",
    "kept_tokens",
    "available_tokens",
    "accuracy",
    "ci_low",
    "ci_high",
    "metric",
    "samples",
    "avg_visual_tokens",
    "equivalent_keep",
    "prefill_tflops",
    "matched_to",
    "params",
    "ms_per_sample",
    "seconds",
    "model",
    "backend",
    "limit",
    "status",
    "error",
)


@dataclass(frozen=True)
class Budget:
    keep: int | None = None
    ratio: float | None = None

    @property
    def label(self) -> str:
        if self.keep is not None:
            return f"keep={self.keep}"
        if self.ratio is not None:
            return f"ratio={self.ratio:g}"
        return "full"

    def kwargs(self) -> dict[str, Any]:
        if self.keep is not None:
            return {"keep": self.keep}
        return {"ratio": self.ratio} if self.ratio is not None else {}


def parse_budget(text: str) -> Budget:
    """ "64" -> 64 tokens per image, "0.25" -> a quarter of them."""
    value = str(text).strip()
    if value.isdigit():
        if int(value) < 1:
            raise ValueError(f"budget {text!r}: keep at least 1 token")
        return Budget(keep=int(value))
    try:
        ratio = float(value)
    except ValueError:
        raise ValueError(f"budget {text!r} is neither a token count (64) nor a fraction (0.25)") from None
    if not 0 < ratio <= 1:
        raise ValueError(f"budget fraction {text!r} must be in (0, 1]")
    return Budget(ratio=ratio)


def cell_key(cell: dict[str, Any]) -> tuple[str, ...]:
    return tuple(str(cell.get(k)) for k in ("model", "backend", "task", "strategy", "budget", "limit", "params"))


# ---------------------------------------------------------------------------------------------------- results file


def load_results(path: Path) -> dict[str, Any]:
    if path.exists():
        data = json.loads(path.read_text())
        if isinstance(data, dict) and isinstance(data.get("cells"), list):
            return data
        raise ValueError(f"{path} is not a vtokprune sweep results file; choose another --out")
    return {"version": 1, "cells": []}


def save_results(path: Path, data: dict[str, Any]) -> None:
    """Atomic: an interrupted sweep leaves the previous complete file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=_jsonable))
    os.replace(tmp, path)


def _jsonable(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def write_csv(path: Path, cells: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(CSV_FIELDS), extrasaction="ignore")
        writer.writeheader()
        for cell in cells:
            writer.writerow({k: cell.get(k, "") for k in CSV_FIELDS})


def write_plots(out: Path, cells: list[dict[str, Any]]) -> list[Path]:
    """accuracy.png (accuracy vs kept tokens, one line per strategy, one panel per task) and latency.png."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullFormatter
    except ImportError:
        print("matplotlib is not installed: no plots (pip install 'vtokprune[sweep]')", file=sys.stderr)
        return []
    ok = [c for c in cells if c.get("status") == "ok" and c.get("kept_tokens") is not None]
    tasks = sorted({c["task"] for c in ok})
    written = []
    for name, field, ylabel in (
        ("accuracy.png", "accuracy", "accuracy"),
        ("latency.png", "ms_per_sample", "latency (ms / sample)"),
    ):
        if not tasks:
            break
        fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            rows = [c for c in ok if c["task"] == task and c.get(field) is not None]
            for strategy in sorted({c["strategy"] for c in rows if c["strategy"] != "none"}):
                pts = sorted(
                    (float(c["kept_tokens"]), float(c[field]), c.get("ci_low"), c.get("ci_high"))
                    for c in rows
                    if c["strategy"] == strategy
                )
                xs, ys = [p[0] for p in pts], [p[1] for p in pts]
                if field == "accuracy" and all(p[2] is not None for p in pts):
                    err = [
                        [y - float(p[2] or 0) for y, p in zip(ys, pts)],
                        [float(p[3] or 0) - y for y, p in zip(ys, pts)],
                    ]
                    ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=strategy)
                else:
                    ax.plot(xs, ys, marker="o", label=strategy)
            for c in rows:
                if c["strategy"] == "none":
                    y = float(c[field])
                    ax.axhline(y, color="black", linestyle="--", linewidth=1, label=f"unpruned (n={c.get('samples')})")
                    if field == "accuracy" and c.get("ci_low") is not None:
                        ax.axhspan(c["ci_low"], c["ci_high"], color="black", alpha=0.08)
                    break
            ax.set_xscale("log", base=2)
            budgets = sorted({float(c["kept_tokens"]) for c in rows if c["strategy"] != "none"})
            ax.set_xticks(budgets)
            ax.set_xticklabels([f"{b:g}" for b in budgets])
            ax.xaxis.set_minor_formatter(NullFormatter())
            if field == "accuracy" and all(0 <= float(c[field]) <= 1 for c in rows):
                ax.set_ylim(-0.02, 1.02)
            ax.set_xlabel("kept visual tokens per image")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{task}: {ylabel}" + (" (95% Wilson intervals)" if field == "accuracy" else ""))
            ax.grid(alpha=0.3)
            if rows:
                ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)
    return written


def table(cells: list[dict[str, Any]]) -> str:
    """Markdown: one row per (task, strategy), one column per budget, accuracy in % with its 95% interval and n."""
    from .reporting import format_accuracy

    ok = [c for c in cells if c.get("status") == "ok"]
    budgets = list(dict.fromkeys(c["budget"] for c in ok if c["strategy"] != "none" and not c.get("matched_to")))
    lines = ["| task | strategy | n | " + " | ".join(budgets) + " |", "|" + "---|" * (len(budgets) + 3)]
    for task in dict.fromkeys(c["task"] for c in ok):
        rows = [c for c in ok if c["task"] == task and not c.get("matched_to")]
        for strategy in dict.fromkeys(c["strategy"] for c in rows):
            by = {c["budget"]: c for c in rows if c["strategy"] == strategy}
            n = "/".join(sorted({str(c.get("samples")) for c in by.values()}))
            if strategy == "none":
                acc = format_accuracy(next(iter(by.values())))
                lines.append(f"| {task} | none (all tokens) | {n} | " + " | ".join(acc for _ in budgets) + " |")
                continue
            vals = [format_accuracy(by[b]) if b in by else "-" for b in budgets]
            lines.append(f"| {task} | {strategy} | {n} | " + " | ".join(vals) + " |")
    matched = [c for c in ok if c.get("matched_to")]
    if matched:
        lines += [
            "",
            "| task | pre-LLM strategy | keep (equal compute) | matched to | n | accuracy |",
            "|---|---|---|---|---|---|",
        ]
        for c in matched:
            lines.append(
                f"| {c['task']} | {c['strategy']} | {c['budget']} | {c['matched_to']} | {c.get('samples')} | "
                f"{format_accuracy(c)} |"
            )
    return "\n".join(lines)


class InProcessBackend:
    """vtokprune's own evaluation loop over the local toy-world tasks (no lmms-eval)."""

    name = "inprocess"

    def __init__(self, model: str | None, device: str | None, dtype: str, batch_size: int) -> None:
        from .lmms.engine import Engine, load_model

        m, processor, description = load_model(model, dtype=dtype, device=device)
        self.engine = Engine(m, processor, description)
        self.batch_size = batch_size

    def run(self, task: str, strategy: Any, limit: int | None) -> dict[str, Any]:
        from .lmms.tasks import load_docs
        from .lmms.tasks.vtokprune_toy import utils

        if task not in LOCAL_TASKS:
            raise ValueError(
                f"the inprocess backend runs the local tasks {', '.join(LOCAL_TASKS)}; use --backend lmms-eval "
                f"for {task!r}"
            )
        docs = load_docs(task, limit)
        self.engine.set_strategy(strategy)
        self.engine.reset_stats()
        correct = 0.0
        for i in range(0, len(docs), self.batch_size):
            chunk = docs[i : i + self.batch_size]
            texts = [utils.doc_to_text(d) for d in chunk]
            images = [utils.doc_to_visual(d) for d in chunk]
            if task == "vtokprune_toy":
                answers = self.engine.generate(texts, images, {"max_new_tokens": 4, "until": ["\n"]})
                correct += sum(utils.exact_match(a, d["answer"]) for a, d in zip(answers, chunk))
            else:
                for text, image, doc in zip(texts, images, chunk):
                    choices = utils.doc_to_choice(doc)
                    scores: list[float] = []
                    for j in range(0, len(choices), self.batch_size):
                        part = choices[j : j + self.batch_size]
                        res = self.engine.loglikelihood(
                            [text] * len(part), [" " + c for c in part], [image] * len(part)
                        )
                        scores.extend(r[0] for r in res)
                    best = max(range(len(choices)), key=lambda k: scores[k])
                    correct += float(best == utils.doc_to_choice_index(doc))
        stats = self.engine.stats.summary()
        stats["ms_per_sample"] = round(1e3 * self.engine.stats.seconds / max(1, len(docs)), 3)
        metric = "exact_match" if task == "vtokprune_toy" else "acc"
        return {"accuracy": correct / max(1, len(docs)), "metric": metric, "samples": len(docs), **stats}


class LmmsEvalBackend:
    """Any lmms-eval task, through lmms-eval's evaluator, with the `vtokprune` lmms-eval model loaded once."""

    name = "lmms-eval"

    def __init__(self, model: str | None, device: str | None, dtype: str, batch_size: int) -> None:
        from .lmms.model import VTokPruneLMM

        self.task_manager = lmms_task_manager()
        self.lm = VTokPruneLMM(pretrained=model or "embedded", device=device, dtype=dtype, batch_size=batch_size)
        self.engine = self.lm.engine
        self.batch_size = batch_size

    @staticmethod
    def check_tasks(tasks: list[str]) -> None:
        known = set(lmms_task_manager().all_tasks)
        unknown = [t for t in tasks if t not in known]
        if unknown:
            import difflib

            hints = [
                f"{t!r}"
                + (f" (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(t, known, 1)) else "")
                for t in unknown
            ]
            raise ValueError(f"unknown lmms-eval task {', '.join(hints)}; `lmms-eval --tasks list` lists them")

    def run(self, task: str, strategy: Any, limit: int | None) -> dict[str, Any]:
        from lmms_eval import evaluator

        self.lm.set_strategy(strategy)
        engine = self.lm.engine
        engine.reset_stats()
        try:
            from lmms_eval.models.model_utils.gen_metrics import reset_logged_metrics

            reset_logged_metrics()  # throughput (kept visual tokens over every rank) per cell, not cumulative
        except ImportError:  # pragma: no cover
            pass
        results = evaluator.simple_evaluate(
            model=self.lm,
            tasks=[task],
            limit=limit,
            batch_size=self.batch_size,
            task_manager=self.task_manager,
            log_samples=False,
            verbosity="WARNING",
            bootstrap_iters=0,
            distributed_executor_backend="torchrun" if _distributed() else "accelerate",  # as lmms-eval's CLI does
        )
        if results is None:  # non-zero ranks under accelerate
            return {"accuracy": None, "metric": None, "samples": 0}
        metrics = dict(results["results"].get(task, {}))
        metric, accuracy = _primary_metric(metrics)
        stats = engine.stats.summary()
        samples = int(results.get("n-samples", {}).get(task, {}).get("effective", 0) or 0)
        if engine.stats.samples:  # this process's own samples: per-sample latency of one model copy
            stats["ms_per_sample"] = round(1e3 * engine.stats.seconds / engine.stats.samples, 3)
        kept = results.get("throughput", {}).get("avg_visual_tokens_kept")
        if kept is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            stats["kept_tokens"] = round(float(kept), 2)  # every rank's samples, not only this one's
        return {
            "accuracy": accuracy,
            "metric": metric,
            "metrics": metrics,
            **stats,
            "samples": samples or stats["samples"],
        }


_TASK_MANAGER: list[Any] = []


def lmms_task_manager() -> Any:
    """lmms-eval's task index with vtokprune's local tasks, built once per process."""
    if not _TASK_MANAGER:
        try:
            from lmms_eval.tasks import TaskManager
        except ImportError:
            raise ImportError("the lmms-eval backend needs lmms-eval: pip install 'vtokprune[lmms-eval]'") from None
        from .lmms import tasks_path

        _TASK_MANAGER.append(TaskManager("WARNING", include_path=tasks_path()))
    return _TASK_MANAGER[0]


def _primary_metric(metrics: dict[str, Any]) -> tuple[str | None, float | None]:
    for key, value in metrics.items():
        if key == "alias" or "stderr" in key:
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            return key.split(",")[0], number  # as lmms-eval reports it (some tasks use 0-100 or other scales)
    return None, None


BACKENDS: dict[str, Callable[..., Any]] = {"inprocess": InProcessBackend, "lmms-eval": LmmsEvalBackend}


# ---------------------------------------------------------------------------------------------------- the sweep


def _progress(total: int, quiet: bool) -> Any:
    if quiet:
        return None
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc="sweep", unit="cell")
    except ImportError:
        return None


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def check_tasks(tasks: list[str], backend: str) -> None:
    """Unknown task names fail before any model is loaded."""
    if not tasks:
        raise ValueError("--tasks names no task; e.g. --tasks vtokprune_toy")
    if backend == "inprocess":
        unknown = [t for t in tasks if t not in LOCAL_TASKS]
        if unknown:
            raise ValueError(
                f"unknown task {', '.join(map(repr, unknown))} for the inprocess backend, which runs "
                f"{', '.join(LOCAL_TASKS)}; use --backend lmms-eval for lmms-eval's tasks"
            )
    elif backend == "lmms-eval":
        LmmsEvalBackend.check_tasks(tasks)


def _params_for(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """The --set parameters that apply to strategy `name` alone (for cells added after the plan, e.g. matched)."""
    import dataclasses

    from .registry import available_strategies

    fields = {f.name for f in dataclasses.fields(available_strategies()[name])}
    return {k: v for k, v in params.items() if k.partition(".")[0] == name or ("." not in k and k in fields)}


def _compute_fields(engine: Any, strategy: Any, cell: dict[str, Any]) -> dict[str, Any]:
    from .compute import compute_record

    available, text = cell.get("available_tokens"), cell.get("text_tokens")
    if engine is None or not available:
        return {}
    try:
        return compute_record(engine.model.config, strategy, round(float(available)), round(float(text or 0)))
    except (AttributeError, TypeError, ValueError):  # a config without a decoder shape: no compute fields
        return {}


def run_sweep(
    model: str | None = None,
    strategies: Iterable[str] = DEFAULT_STRATEGIES,
    budgets: Iterable[str | Budget] = DEFAULT_BUDGETS,
    tasks: Iterable[str] = DEFAULT_TASKS,
    limit: int | None = DEFAULT_LIMIT,
    out: str | Path = "runs/sweep",
    backend: str = "inprocess",
    batch_size: int = 8,
    device: str | None = None,
    dtype: str = "auto",
    force: bool = False,
    plots: bool = True,
    quiet: bool = False,
    log: Callable[[str], None] = print,
    params: dict[str, Any] | None = None,
    match_compute: bool = False,
) -> dict[str, Any]:
    """Run every missing cell, then write results.json, results.csv and the plots under `out`; returns the report
    (``cells``; ``computed``: how many cells this call ran; ``checks``: the random-floor check per task).

    `params`: strategy parameters (`{"layer": 3}` for every strategy that has one, `{"fastv.layer": 3}` for one).
    `match_compute`: after the plan, run every pre-LLM strategy again at the keep that matches each in-LLM /
    multi-stage result's average visual tokens over decoder layers (see :mod:`vtokprune.compute`).
    Under torchrun (WORLD_SIZE > 1, lmms-eval backend) every rank runs the cells; only rank 0 writes files.
    """
    from .cli import build_strategies
    from .errors import VTokPruneError
    from .registry import available_strategies
    from .reporting import add_interval, environment, random_floor_check

    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and backend != "lmms-eval":
        raise ValueError("a multi-process sweep (torchrun / --processes) needs --backend lmms-eval")
    main_rank = _rank() == 0
    quiet = quiet or not main_rank
    out = Path(out)
    results_path = out / "results.json"
    data = load_results(results_path)
    model_name = model or "embedded"
    task_list = [str(t).strip() for t in tasks if str(t).strip()]
    budget_list = [b if isinstance(b, Budget) else parse_budget(b) for b in budgets]
    if not budget_list:
        raise ValueError("--budgets names no budget; e.g. --budgets 192,128,64 or 0.25")
    names = [s.strip().lower() for s in strategies if s.strip() and s.strip().lower() != "none"]
    params = dict(params or {})
    params_label = ",".join(f"{k}={v!r}" for k, v in sorted(params.items())) or None
    built = {b: build_strategies(names, b.kwargs(), params) for b in budget_list}  # every error before any work
    check_tasks(task_list, backend)
    plan: list[tuple[str, str, Budget, str | None]] = [(task, "none", Budget(), None) for task in task_list]
    plan += [(task, name, budget, None) for task in task_list for name in names for budget in budget_list]
    strategy_of = {(name, budget): built[budget][name] for name in names for budget in budget_list}
    wanted: set[tuple[str, ...]] = set()
    state: dict[str, Any] = {"runner": None, "computed": 0}

    def key_for(task: str, name: str, budget: Budget, matched: str | None) -> dict[str, Any]:
        return {
            "model": model_name,
            "backend": backend,
            "task": task,
            "strategy": name,
            "budget": budget.label,
            "limit": limit,
            "params": params_label if name != "none" else None,
            **({"matched_to": matched} if matched else {}),
        }

    def run_cells(cells_plan: list[tuple[str, str, Budget, str | None]]) -> None:
        done = {cell_key(c): c for c in data["cells"]}
        todo = []
        for task, name, budget, matched in cells_plan:
            key_cell = key_for(task, name, budget, matched)
            wanted.add(cell_key(key_cell))
            if force or cell_key(key_cell) not in done:
                todo.append((task, name, budget, key_cell))
        if not quiet:
            log(
                f"sweep: {len(cells_plan)} cells, {len(cells_plan) - len(todo)} already in {results_path}, "
                f"{len(todo)} to run"
            )
        if todo and state["runner"] is None:
            state["runner"] = BACKENDS[backend](model, device, dtype, batch_size)
        runner = state["runner"]
        engine = getattr(runner, "engine", None)
        bar = _progress(len(todo), quiet)
        for i, (task, name, budget, key_cell) in enumerate(todo):
            start = time.time()
            cell: dict[str, Any] = dict(key_cell)
            strategy = None
            try:
                strategy = (
                    None
                    if name == "none"
                    else strategy_of.get((name, budget))
                    or build_strategies([name], budget.kwargs(), _params_for(name, params))[name]
                )
                cell.update(runner.run(task, strategy, limit), status="ok")
                add_interval(cell)
                cell.update(_compute_fields(engine, strategy, cell))
            except (VTokPruneError, NotImplementedError, ValueError, TypeError) as e:
                cell.update(status="error", error=f"{type(e).__name__}: {e}")
            if strategy is not None:
                cell["strategy_config"] = repr(strategy)
            cell["wall_seconds"] = round(time.time() - start, 3)
            cell["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
            data["cells"] = [c for c in data["cells"] if cell_key(c) != cell_key(cell)] + [cell]
            data["description"] = getattr(engine, "description", data.get("description"))
            model_obj = getattr(engine, "model", None)
            data["environment"] = environment(getattr(engine, "device", device), getattr(model_obj, "dtype", dtype))
            if main_rank:
                save_results(results_path, data)
            state["computed"] += 1
            line = f"{task} {name} {budget.label}: " + (
                f"acc={cell['accuracy']:.3f} kept={cell.get('kept_tokens')} {cell.get('ms_per_sample')} ms/sample"
                if cell["status"] == "ok" and cell.get("accuracy") is not None
                else cell.get("error", "no result")
            )
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"{task} {name} {budget.label}")
                if cell["status"] != "ok":
                    bar.write(line)
            elif not quiet:
                log(f"[{i + 1}/{len(todo)}] {line}")
        if bar is not None:
            bar.close()

    run_cells(plan)
    if match_compute:
        kinds = available_strategies()
        pre_llm = [n for n in names if kinds[n].acts == "vision"]
        extra: list[tuple[str, str, Budget, str | None]] = []
        for c in list(data["cells"]):
            if cell_key(c) not in wanted or c.get("status") != "ok" or c.get("matched_to"):
                continue
            if c["strategy"] == "none" or kinds[c["strategy"]].acts != "llm" or not c.get("equivalent_keep"):
                continue
            for name in pre_llm:
                extra.append(
                    (c["task"], name, Budget(keep=int(c["equivalent_keep"])), f"{c['strategy']} {c['budget']}")
                )
        run_cells(extra)
    cells = [c for c in data["cells"] if cell_key(c) in wanted]
    checks = random_floor_check(cells)
    report: dict[str, Any] = {"cells": cells, "computed": state["computed"], "checks": checks, "plots": []}
    report.update(results=str(results_path), csv=str(out / "results.csv"))
    if main_rank:
        data["checks"] = checks
        data.setdefault("environment", environment(device, dtype))
        save_results(results_path, data)
        write_csv(out / "results.csv", cells)
        report["plots"] = [str(p) for p in (write_plots(out, cells) if plots else [])]
    return report


def failure_reason(cells: list[dict[str, Any]]) -> str | None:
    """Why a sweep produced nothing to compare: no pruned cell succeeded (None when at least one did)."""
    pruned = [c for c in cells if c.get("strategy") != "none"]
    if not pruned or any(c.get("status") == "ok" for c in pruned):
        return None
    errors = list(dict.fromkeys(str(c.get("error")) for c in pruned))
    return f"no pruned cell succeeded ({len(pruned)} failed): " + "; ".join(errors[:5])


def _relaunch(argv: list[str], processes: int) -> int:
    """Run this same sweep under torchrun with `processes` processes (lmms-eval shards each cell's documents)."""
    import socket
    import subprocess

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--processes":
            skip = True
        elif not arg.startswith("--processes="):
            rest.append(arg)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    cmd += ["--master_port", str(port), "-m", "vtokprune.cli", "sweep", *rest]
    print("running: " + " ".join(cmd), file=sys.stderr)
    return subprocess.call(cmd)


def main(argv: list[str] | None = None) -> int:
    from .cli import parse_sets, strategy_names

    parser = argparse.ArgumentParser(
        prog="vtokprune sweep",
        description="Accuracy and latency of pruning strategies x token budgets x tasks; resumable; JSON, CSV, PNG.",
    )
    parser.add_argument("--model", default=None, help="HF model id or local path (default: the embedded model)")
    parser.add_argument("--strategies", default=",".join(DEFAULT_STRATEGIES), help="comma-separated strategy names")
    parser.add_argument(
        "--budgets",
        default=",".join(DEFAULT_BUDGETS),
        help="comma-separated token counts (64) or fractions (0.25) per image",
    )
    parser.add_argument(
        "--tasks",
        default=",".join(DEFAULT_TASKS),
        help=f"comma-separated tasks (inprocess: {', '.join(LOCAL_TASKS)}; lmms-eval: any)",
    )
    parser.add_argument("--limit", type=int, default=DEFAULT_LIMIT, help="documents per task (0: all)")
    parser.add_argument("--backend", choices=sorted(BACKENDS), default="inprocess")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", help="auto, float32, float16, bfloat16")
    parser.add_argument("--out", default="runs/sweep", help="output directory (results.json is the resume log)")
    parser.add_argument("--force", action="store_true", help="recompute cells already in the results file")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="strategy parameter, repeatable: --set layer=3 (every strategy that has it) or --set fastv.layer=3",
    )
    parser.add_argument(
        "--match-compute",
        action="store_true",
        help="also run each pre-LLM strategy at the keep matching every in-LLM result's average visual tokens",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="lmms-eval backend: data-parallel processes on this machine (relaunches itself under torchrun)",
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = argv[1:] if argv[:1] == ["--"] else argv
    args = parser.parse_args(argv)
    names = strategy_names(args.strategies)
    params = parse_sets(args.set)
    if args.processes > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        if args.backend != "lmms-eval":
            raise ValueError("--processes needs --backend lmms-eval (lmms-eval shards the documents by rank)")
        return _relaunch(argv, args.processes)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    report = run_sweep(
        model=args.model,
        strategies=names,
        budgets=[b for b in args.budgets.split(",") if b.strip()],
        tasks=[t.strip() for t in args.tasks.split(",") if t.strip()],
        limit=args.limit or None,
        out=args.out,
        backend=args.backend,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        force=args.force,
        plots=not args.no_plots,
        params=params,
        match_compute=args.match_compute,
    )
    if _rank() != 0:
        return 0
    print()
    print(table(report["cells"]))
    for check in report["checks"]:
        verdict = "passed" if check["passed"] else "FAILED"
        print(
            f"\nrandom-floor check ({check['task']}): random at {check['budget']} {100 * check['random']:.1f}% vs "
            f"unpruned {100 * check['unpruned']:.1f}% (drop {100 * check['drop']:.1f} points, needs >= "
            f"{100 * check['min_drop']:.0f} with separate 95% intervals): {verdict}"
        )
    print(f"\nwrote {report['results']}, {report['csv']}" + "".join(f", {p}" for p in report["plots"]))
    reason = failure_reason(report["cells"])
    if reason:
        print(f"vtokprune sweep: error: {reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
