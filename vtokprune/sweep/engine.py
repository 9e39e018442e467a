"""The sweep itself: budgets, the plan of cells (task x strategy x budget), resuming from results.json, the
equal-compute re-runs, and the report."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .backends import BACKENDS, LOCAL_TASKS, LmmsEvalBackend
from .results import load_results, save_results, write_csv, write_plots

DEFAULT_STRATEGIES = ("cls", "visionzip", "random", "pool")
DEFAULT_BUDGETS = ("0.333", "0.222", "0.111")  # 192 / 128 / 64 of LLaVA-1.5's 576 tokens
DEFAULT_TASKS = ("vtokprune_toy",)
DEFAULT_LIMIT = 30


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


def _progress(total: int, quiet: bool) -> Any:
    if quiet:
        return None
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc="sweep", unit="cell")
    except ImportError:
        return None


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

    from ..registry import available_strategies

    fields = {f.name for f in dataclasses.fields(available_strategies()[name])}
    return {k: v for k, v in params.items() if k.partition(".")[0] == name or ("." not in k and k in fields)}


def _compute_fields(engine: Any, strategy: Any, cell: dict[str, Any]) -> dict[str, Any]:
    from ..compute import compute_record

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
    from ..cli import build_strategies
    from ..errors import VTokPruneError
    from ..registry import available_strategies
    from ..reporting import add_interval, environment, random_floor_check

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
