"""The sweep's outputs: results.json (the resume log, written atomically), results.csv, the accuracy and latency
plots, and the Markdown table printed at the end."""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path
from typing import Any

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
    from ..reporting import format_accuracy

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
