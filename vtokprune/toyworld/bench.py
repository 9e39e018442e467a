"""Held-out accuracy of the toy LLaVA, unpruned and under every registered strategy at several budgets."""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from .model import answer, load
from .scenes import QUESTION_TYPES, Sample, heldout, render

DEFAULT_BUDGETS = (192, 128, 64)
BASELINES = ("none", "cls", "random", "pool")


def evaluate(model: Any, processor: Any, samples: list[Sample], batch: int = 16) -> dict[str, Any]:
    """Accuracy overall and per question type, answers produced by `model.generate` (greedy, one word)."""
    per_type: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    correct = 0
    start = time.time()
    for i in range(0, len(samples), batch):
        chunk = samples[i : i + batch]
        preds = answer(model, processor, [render(s.scene) for s in chunk], [s.qa.question for s in chunk])
        for p, s in zip(preds, chunk):
            ok = int(p == s.qa.answer)
            correct += ok
            per_type[s.qa.kind][0] += ok
            per_type[s.qa.kind][1] += 1
    return {
        "accuracy": correct / len(samples),
        "per_type": {k: per_type[k][0] / per_type[k][1] for k in QUESTION_TYPES if per_type[k][1]},
        "seconds": round(time.time() - start, 2),
    }


def strategy_names(requested: list[str] | None = None) -> list[str]:
    import vtokprune

    names = list(vtokprune.available_strategies())
    if requested:
        return [n for n in requested if n in names or n == "none"]
    return [n for n in BASELINES if n in names] + [n for n in names if n not in BASELINES]


def run_benchmark(
    model_path: str | Path | None = None,
    samples: int = 300,
    budgets: tuple[int, ...] = DEFAULT_BUDGETS,
    strategies: list[str] | None = None,
    batch: int = 16,
    log: Any = print,
) -> dict[str, Any]:
    """Every (strategy, budget) on the first `samples` held-out questions. Strategies that cannot run on this model
    (CapabilityError) are listed under "skipped"."""
    import vtokprune

    model, processor = load(model_path)
    data = heldout(samples)
    results: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    ref = evaluate(model, processor, data, batch)
    results.append({"strategy": "none", "keep": 576, **ref})
    log(f"none      576  {ref['accuracy']:.3f}")
    for name in strategy_names(strategies):
        if name == "none":
            continue
        for keep in budgets:
            try:
                strategy = vtokprune.get_strategy(name, keep=keep)
                with vtokprune.pruned(model, strategy):
                    res = evaluate(model, processor, data, batch)
            except vtokprune.CapabilityError as e:
                skipped[name] = str(e)
                log(f"{name:<9} skipped: {e}")
                break
            results.append({"strategy": name, "keep": keep, **res})
            log(f"{name:<9} {keep:<4} {res['accuracy']:.3f}")
    return {
        "model": str(model_path) if model_path else "vtokprune/assets/toy-llava",
        "samples": samples,
        "budgets": list(budgets),
        "torch_threads": torch.get_num_threads(),
        "results": results,
        "skipped": skipped,
    }


def table(report: dict[str, Any]) -> str:
    """Markdown table: one row per strategy, one column per budget."""
    budgets = report["budgets"]
    rows: dict[str, dict[int, float]] = defaultdict(dict)
    full = None
    for r in report["results"]:
        if r["strategy"] == "none":
            full = r["accuracy"]
        else:
            rows[r["strategy"]][r["keep"]] = r["accuracy"]
    head = "| strategy | " + " | ".join(f"keep {k}" for k in budgets) + " |"
    lines = [head, "|" + "---|" * (len(budgets) + 1)]
    if full is not None:
        lines.append("| none (576) | " + " | ".join(f"{100 * full:.1f}" for _ in budgets) + " |")
    for name, accs in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * accs[k]:.1f}" if k in accs else "-" for k in budgets) + " |")
    return "\n".join(lines)


def per_type_table(report: dict[str, Any], keep: int = 64) -> str:
    """Markdown table of per-question-type accuracy: unpruned and every strategy at `keep`."""
    rows = [r for r in report["results"] if r["strategy"] == "none" or r["keep"] == keep]
    kinds = [k for k in QUESTION_TYPES if any(k in r["per_type"] for r in rows)]
    lines = ["| strategy | " + " | ".join(kinds) + " |", "|" + "---|" * (len(kinds) + 1)]
    for r in rows:
        label = "none (576)" if r["strategy"] == "none" else f"{r['strategy']} @{keep}"
        lines.append(f"| {label} | " + " | ".join(f"{100 * r['per_type'].get(k, 0):.0f}" for k in kinds) + " |")
    return "\n".join(lines)
