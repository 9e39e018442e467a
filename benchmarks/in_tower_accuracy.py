"""Accuracy trade-off of pruning inside the vision tower vs after it, on the shipped toy LLaVA (CPU, offline).

    python benchmarks/in_tower_accuracy.py --samples 400 --keep 28 --layers 3,6,9 --json benchmarks/results/in_tower_accuracy.json

`--layers` takes in-tower specs (bench_utils.in_tower_spec): "3" selects after vision layer 3, "2-4" in two stages
(after layers 2 and 4), "+fuse" adds the fused context token. Choose variants on `--split validation` (questions from
the validation range of scenes) and report them on the held-out split (the default), never the other way round.

Every configuration answers the same held-out questions, so differences are paired: besides each accuracy (Wilson
95% interval) the table gives the difference to the post-tower run of the same strategy with a paired bootstrap 95%
interval. Configurations: unpruned; each strategy after the tower; each strategy at every in-tower layer that
comes before the feature layer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's vtokprune

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_utils

from bench_utils import in_tower_spec  # noqa: E402

import vtokprune  # noqa: E402
from vtokprune.reporting import wilson_interval  # noqa: E402
from vtokprune.toyworld.model import answer, load  # noqa: E402
from vtokprune.toyworld.scenes import heldout, render, validation  # noqa: E402

MODEL = "vtokprune/assets/toy-dinov2-llava"


def wilson(correct: int, n: int) -> tuple[float, float]:
    return wilson_interval(correct / n, n) if n else (0.0, 1.0)


def paired_bootstrap(a: list[int], b: list[int], rounds: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% interval of mean(a) - mean(b) over questions resampled with replacement (a, b: 0/1 per question)."""
    g = torch.Generator().manual_seed(seed)
    diff = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    idx = torch.randint(0, len(a), (rounds, len(a)), generator=g)
    means = diff[idx].mean(dim=1).sort().values
    return (float(means[int(0.025 * rounds)]), float(means[int(0.975 * rounds) - 1]))


def correctness(model: Any, processor: Any, samples: list[Any], batch: int) -> list[int]:
    out: list[int] = []
    for i in range(0, len(samples), batch):
        chunk = samples[i : i + batch]
        preds = answer(model, processor, [render(s.scene) for s in chunk], [s.qa.question for s in chunk])
        out += [int(p == s.qa.answer) for p, s in zip(preds, chunk)]
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=400)
    p.add_argument("--keep", type=int, default=28)
    p.add_argument("--strategies", default="cls,visionzip,flowcut")
    p.add_argument(
        "--layers",
        default=None,
        help='in-tower specs, e.g. "3,6,2-4+fuse" (default: every layer before the feature layer)',
    )
    p.add_argument("--split", choices=("heldout", "validation"), default="heldout")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    cfg = p.parse_args(argv)
    torch.set_num_threads(cfg.threads)
    model, processor = load()
    adapter = vtokprune.get_adapter(model)
    feature = adapter.feature_layer()
    patches = 0  # visual tokens per image, read off the first pruned run
    layers = cfg.layers.split(",") if cfg.layers else [str(i) for i in range(feature)]
    data = heldout(cfg.samples) if cfg.split == "heldout" else validation(cfg.samples)
    runs: dict[str, list[int]] = {}
    start = time.time()
    runs["none"] = correctness(model, processor, data, cfg.batch)
    print(f"none: {sum(runs['none']) / len(data):.3f} ({time.time() - start:.0f} s)", flush=True)
    for name in cfg.strategies.split(","):
        for layer in [None, *layers]:
            label = f"{name}" if layer is None else f"{name}@L{layer}"
            extra = {} if layer is None else in_tower_spec(layer)
            with vtokprune.pruned(model, vtokprune.get_strategy(name, keep=cfg.keep, **extra)):
                runs[label] = correctness(model, processor, data, cfg.batch)
                patches = patches or int(vtokprune.last_selection(model).available[0])
            print(f"{label}: {sum(runs[label]) / len(data):.3f} ({time.time() - start:.0f} s)", flush=True)
    rows = []
    for label, res in runs.items():
        base = label.split("@")[0]
        row: dict[str, Any] = {"config": label, "keep": patches if label == "none" else cfg.keep}
        row["accuracy"] = sum(res) / len(res)
        row["ci95"] = wilson(sum(res), len(res))
        if "@" in label:
            ref = runs[base]
            row["diff_vs_post"] = row["accuracy"] - sum(ref) / len(ref)
            row["diff_ci95"] = paired_bootstrap(res, ref)
        rows.append(row)
    print(
        f"\n{MODEL} ({len(data)} {cfg.split} questions, vision feature layer {feature}, keep {cfg.keep} of {patches})"
    )
    print("| config | accuracy | 95% CI | vs post-tower (paired 95% CI) |")
    print("|---|---|---|---|")
    for r in rows:
        lo, hi = r["ci95"]
        diff = ""
        if "diff_vs_post" in r:
            dlo, dhi = r["diff_ci95"]
            diff = f"{100 * r['diff_vs_post']:+.1f} pts [{100 * dlo:+.1f}, {100 * dhi:+.1f}]"
        print(f"| {r['config']} | {100 * r['accuracy']:.1f}% | [{100 * lo:.1f}, {100 * hi:.1f}] | {diff} |")
    payload = {
        "model": MODEL,
        "split": cfg.split,
        "samples": len(data),
        "keep": cfg.keep,
        "feature_layer": feature,
        "vision_layers": adapter.vision_num_layers(),
        "torch_threads": torch.get_num_threads(),
        "results": rows,
    }
    if cfg.json:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.json)), exist_ok=True)
        with open(cfg.json, "w") as f:
            json.dump(payload, f, indent=2)
    return payload


if __name__ == "__main__":
    main()
