"""Searched and learned budgets vs fixed schedules at equal compute, on held-out toy-world questions (CPU, offline).

    python benchmarks/searched_vs_fixed.py --schedules runs/search/greedy.json,runs/search/psigmoid.json \\
        --vflowopt runs/search/vflowopt.json --heads dyvte=runs/heads/dyvte,atp=runs/heads/atp \\
        --fixed fastv,pdrop,sparsevlm --samples 400 --json benchmarks/results/searched_vs_fixed.json

Every searched schedule runs as written; each fixed strategy runs at the keep whose average visual tokens over
decoder layers is closest to the schedule's (vtokprune.search.compare.keep_for_average). Learned per-input
strategies (DyVTE, ATP) are matched to the average they actually reached on these questions. All configurations
answer the same questions: accuracy with a Wilson 95% interval, and the paired bootstrap 95% interval of
(searched - fixed). `--smoke` runs a tiny random model for seconds (what the tests check).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's vtokprune

import vtokprune  # noqa: E402
from vtokprune.reporting import wilson_interval  # noqa: E402
from vtokprune.search.calibration import Calibration  # noqa: E402
from vtokprune.search.compare import keep_for_average, measured_average  # noqa: E402


def heldout_set(processor: Any, n: int, batch: int) -> Calibration:
    """The benchmark's held-out questions (evaluation only: searches never see them)."""
    from vtokprune.embedded import build_prompt
    from vtokprune.toyworld import heldout, render

    samples = heldout(n)
    tok = processor.tokenizer
    side, tok.padding_side = getattr(tok, "padding_side", "left"), "left"
    batches = []
    try:
        for i in range(0, n, batch):
            chunk = samples[i : i + batch]
            images = [render(s.scene) for s in chunk]
            texts = [build_prompt(processor, s.qa.question) for s in chunk]
            batches.append(dict(processor(images=images, text=texts, return_tensors="pt", padding=True)))
    finally:
        tok.padding_side = side
    labels = [int(tok(s.qa.answer, add_special_tokens=False)["input_ids"][0]) for s in samples]
    return Calibration(batches, labels, f"toy world held-out: {n} questions")


@torch.inference_mode()
def run(model: Any, data: Calibration, strategy: Any, num_layers: int) -> tuple[list[int], float]:
    """(per-question correct 0/1, visual tokens averaged over layers and questions, measured)."""
    correct: list[int] = []
    averages: list[float] = []
    assert data.labels is not None
    for batch in data.batches:
        if strategy is None:
            preds = model(**batch).logits[:, -1].argmax(-1).tolist()
            averages.extend([float((batch["input_ids"][0] == model.config.image_token_id).sum())] * len(preds))
        else:
            with vtokprune.pruned(model, strategy):
                preds = model(**batch).logits[:, -1].argmax(-1).tolist()
                averages.extend(measured_average(vtokprune.last_selection(model), num_layers))
        start = len(correct)
        correct.extend(int(p == data.labels[start + i]) for i, p in enumerate(preds))
    return correct, sum(averages) / len(averages)


def paired_bootstrap(a: list[int], b: list[int], rounds: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = random.Random(seed)
    n = len(a)
    diffs = sorted(sum(a[j] - b[j] for j in (rng.randrange(n) for _ in range(n))) / n for _ in range(rounds))
    return diffs[int(0.025 * rounds)], diffs[int(0.975 * rounds) - 1]


def row(name: str, correct: list[int], avg: float, config: Any) -> dict[str, Any]:
    acc = sum(correct) / len(correct)
    low, high = wilson_interval(acc, len(correct))
    return {
        "config": name,
        "avg_tokens": round(avg, 2),
        "accuracy": acc,
        "ci": [low, high],
        "n": len(correct),
        "strategy": repr(config),
        "correct": correct,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--schedules", default="", help="comma-separated schedule files (vtokprune search --out)")
    p.add_argument("--vflowopt", default=None, help="a vtokprune search --method vflowopt output file")
    p.add_argument("--heads", default="", help="dyvte=DIR,atp=DIR")
    p.add_argument("--fixed", default="fastv,pdrop,sparsevlm")
    p.add_argument("--samples", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from vtokprune.cli import load_model

    model, processor, description = load_model(args.model)
    model.eval()
    data = heldout_set(processor, args.samples, args.batch_size)
    num_layers = int(model.config.get_text_config().num_hidden_layers)
    available = data.visual_and_text_tokens(int(model.config.image_token_id))[0]
    rows = [row("none (unpruned)", *run(model, data, None, num_layers), None)]
    candidates: list[tuple[str, Any]] = []
    for path in [s for s in args.schedules.split(",") if s]:
        candidates.append((f"scheduled {os.path.basename(path)}", vtokprune.get_strategy("scheduled", file=path)))
    if args.vflowopt:
        with open(args.vflowopt) as f:
            record = json.load(f)
        candidates.append(
            ("vflowopt (tuned)", vtokprune.get_strategy("vflowopt", **record["fixed"], **record["params"]))
        )
    for item in [h for h in args.heads.split(",") if h]:
        kind, _, path = item.partition("=")
        candidates.append((f"{kind} (learned)", vtokprune.get_strategy(kind, head=path)))
    comparisons = []
    for name, strategy in candidates:
        mine = row(name, *run(model, data, strategy, num_layers), strategy)
        rows.append(mine)
        for fixed in [f for f in args.fixed.split(",") if f]:
            try:
                keep, _ = keep_for_average(fixed, mine["avg_tokens"], num_layers, available)
            except vtokprune.BudgetError as e:
                print(f"{fixed} vs {name}: {e}", file=sys.stderr)
                continue
            other_strategy = vtokprune.get_strategy(fixed, keep=keep)
            other = row(
                f"{fixed} keep={keep} (matched to {name})",
                *run(model, data, other_strategy, num_layers),
                other_strategy,
            )
            rows.append(other)
            low, high = paired_bootstrap(mine["correct"], other["correct"])
            comparisons.append(
                {
                    "searched": name,
                    "fixed": other["config"],
                    "diff": mine["accuracy"] - other["accuracy"],
                    "ci": [low, high],
                    "avg_tokens": [mine["avg_tokens"], other["avg_tokens"]],
                }
            )
    print(f"model: {description}; {data.description}\n")
    print("| config | avg visual tokens over layers | accuracy | 95% CI | n |\n|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['config']} | {r['avg_tokens']} | {100 * r['accuracy']:.1f} | "
            f"[{100 * r['ci'][0]:.1f}, {100 * r['ci'][1]:.1f}] | {r['n']} |"
        )
    print("\n| searched / learned | fixed (equal compute) | difference | paired bootstrap 95% CI |\n|---|---|---|---|")
    for c in comparisons:
        print(
            f"| {c['searched']} | {c['fixed']} | {100 * c['diff']:+.1f} | "
            f"[{100 * c['ci'][0]:+.1f}, {100 * c['ci'][1]:+.1f}] |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"model": description, "samples": args.samples, "rows": rows, "comparisons": comparisons}, f, indent=1
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
