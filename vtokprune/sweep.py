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
the ``vtokprune`` model loaded once and re-pruned per cell). For many GPUs, run single cells with lmms-eval under
``accelerate launch`` (see :mod:`vtokprune.lmms.model`).
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
    "metric",
    "samples",
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
    return tuple(str(cell.get(k)) for k in ("model", "backend", "task", "strategy", "budget", "limit"))


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
        from matplotlib.ticker import ScalarFormatter
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
                pts = sorted((float(c["kept_tokens"]), float(c[field])) for c in rows if c["strategy"] == strategy)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=strategy)
            for c in rows:
                if c["strategy"] == "none":
                    ax.axhline(float(c[field]), color="black", linestyle="--", linewidth=1, label="unpruned")
                    break
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(ScalarFormatter())
            if field == "accuracy" and all(0 <= float(c[field]) <= 1 for c in rows):
                ax.set_ylim(-0.02, 1.02)
            ax.set_xlabel("kept visual tokens per image")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{task}: {ylabel}")
            ax.grid(alpha=0.3)
            if rows:
                ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)
    return written


def table(cells: list[dict[str, Any]]) -> str:
    """Markdown: one row per (task, strategy), one column per budget, accuracy in %."""
    ok = [c for c in cells if c.get("status") == "ok"]
    budgets = list(dict.fromkeys(c["budget"] for c in ok if c["strategy"] != "none"))
    lines = ["| task | strategy | " + " | ".join(budgets) + " |", "|" + "---|" * (len(budgets) + 2)]
    for task in dict.fromkeys(c["task"] for c in ok):
        rows = [c for c in ok if c["task"] == task]
        for strategy in dict.fromkeys(c["strategy"] for c in rows):
            by = {c["budget"]: c for c in rows if c["strategy"] == strategy}
            if strategy == "none":
                acc = f"{100 * float(next(iter(by.values()))['accuracy']):.1f}"
                lines.append(f"| {task} | none (all tokens) | " + " | ".join(acc for _ in budgets) + " |")
                continue
            vals = [f"{100 * float(by[b]['accuracy']):.1f}" if b in by else "-" for b in budgets]
            lines.append(f"| {task} | {strategy} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- backends


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
        try:
            from lmms_eval.tasks import TaskManager
        except ImportError:
            raise ImportError("the lmms-eval backend needs lmms-eval: pip install 'vtokprune[lmms-eval]'") from None
        from .lmms import tasks_path
        from .lmms.model import VTokPruneLMM

        self.lm = VTokPruneLMM(pretrained=model or "embedded", device=device, dtype=dtype, batch_size=batch_size)
        self.task_manager = TaskManager("WARNING", include_path=tasks_path())
        self.batch_size = batch_size

    def run(self, task: str, strategy: Any, limit: int | None) -> dict[str, Any]:
        from lmms_eval import evaluator

        self.lm.set_strategy(strategy)
        engine = self.lm.engine
        engine.reset_stats()
        results = evaluator.simple_evaluate(
            model=self.lm,
            tasks=[task],
            limit=limit,
            batch_size=self.batch_size,
            task_manager=self.task_manager,
            log_samples=False,
            verbosity="WARNING",
            bootstrap_iters=0,
        )
        if results is None:  # non-zero ranks under accelerate
            return {"accuracy": None, "metric": None, "samples": 0}
        metrics = dict(results["results"].get(task, {}))
        metric, accuracy = _primary_metric(metrics)
        stats = engine.stats.summary()
        samples = int(results.get("n-samples", {}).get(task, {}).get("effective", 0) or 0)
        if samples:
            stats["ms_per_sample"] = round(1e3 * engine.stats.seconds / samples, 3)
        return {
            "accuracy": accuracy,
            "metric": metric,
            "metrics": metrics,
            **stats,
            "samples": samples or stats["samples"],
        }


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
) -> dict[str, Any]:
    """Run every missing cell, then write results.json, results.csv and the plots under `out`; returns the report
    (``cells``, plus ``computed``: how many cells this call ran)."""
    from .errors import VTokPruneError
    from .registry import get_strategy

    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    out = Path(out)
    results_path = out / "results.json"
    data = load_results(results_path)
    model_name = model or "embedded"
    budget_list = [b if isinstance(b, Budget) else parse_budget(b) for b in budgets]
    names = [s.strip().lower() for s in strategies if s.strip() and s.strip().lower() != "none"]
    for name in names:
        get_strategy(name, **budget_list[0].kwargs())  # unknown names and bad budgets fail before any work
    plan = [(task, "none", Budget()) for task in tasks]
    plan += [(task, name, budget) for task in tasks for name in names for budget in budget_list]
    done = {cell_key(c): c for c in data["cells"]}
    todo = []
    for task, name, budget in plan:
        key_cell: dict[str, Any] = {
            "model": model_name,
            "backend": backend,
            "task": task,
            "strategy": name,
            "budget": budget.label,
            "limit": limit,
        }
        if force or cell_key(key_cell) not in done:
            todo.append((task, name, budget, key_cell))
    if not quiet:
        log(f"sweep: {len(plan)} cells, {len(plan) - len(todo)} already in {results_path}, {len(todo)} to run")
    runner = BACKENDS[backend](model, device, dtype, batch_size) if todo else None
    bar = _progress(len(todo), quiet)
    for i, (task, name, budget, key_cell) in enumerate(todo):
        start = time.time()
        cell: dict[str, Any] = dict(key_cell)
        try:
            strategy = None if name == "none" else get_strategy(name, **budget.kwargs())
            assert runner is not None
            cell.update(runner.run(task, strategy, limit), status="ok")
        except (VTokPruneError, NotImplementedError, ValueError, TypeError) as e:
            cell.update(status="error", error=f"{type(e).__name__}: {e}")
        cell["wall_seconds"] = round(time.time() - start, 3)
        cell["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        data["cells"] = [c for c in data["cells"] if cell_key(c) != cell_key(cell)] + [cell]
        engine = getattr(runner, "engine", None) or getattr(getattr(runner, "lm", None), "engine", None)
        data["description"] = getattr(engine, "description", data.get("description"))
        save_results(results_path, data)
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
    wanted = {
        cell_key({"model": model_name, "backend": backend, "task": t, "strategy": n, "budget": b.label, "limit": limit})
        for t, n, b in plan
    }
    cells = [c for c in data["cells"] if cell_key(c) in wanted]
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "results.csv", cells)
    pngs = write_plots(out, cells) if plots else []
    return {
        "cells": cells,
        "computed": len(todo),
        "results": str(results_path),
        "csv": str(out / "results.csv"),
        "plots": [str(p) for p in pngs],
    }


def main(argv: list[str] | None = None) -> int:
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
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv[1:] if argv[:1] == ["--"] else argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    report = run_sweep(
        model=args.model,
        strategies=[s for s in args.strategies.split(",") if s.strip()],
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
    )
    print()
    print(table(report["cells"]))
    print(f"\nwrote {report['results']}, {report['csv']}" + "".join(f", {p}" for p in report["plots"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
