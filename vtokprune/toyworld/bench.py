"""Held-out accuracy of the toy LLaVA, unpruned, under an evidence oracle, and under every registered strategy at
several budgets, each with its n and a 95% Wilson interval, plus the validity checks and targets of the benchmark.

Speed: the frozen vision tower is the costly part on CPU, and every configuration sees the same pictures. The loop
runs image batch by image batch; :func:`tower_memo` runs the tower once per batch, records every attention layer's
q / k / v, and on later calls returns the recorded output and replays the recorded q / k / v to whatever attention
probes the current strategy has active, so each strategy sees exactly the signals an uncached run would give it.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ..reporting import wilson_interval
from ..strategies.base import VisionSelection, VisionSignals, VisionStrategy
from .model import load, prompt
from .scenes import NUM_PATCHES, QUESTION_TYPES, Sample, evidence_cover, heldout, render

DEFAULT_BUDGETS = (8, 28, 56, 84)  # 3 / 11 / 22 / 33% of 256: 11-33% is the literature's range; at 3% strategies part
CHECK_FRACTION = 64 / 576  # the validity checks and targets hold at 11%, LLaVA-1.5's 64 of 576
DEFAULT_SAMPLES = 600
BASELINES = ("cls", "random", "pool")
ORACLE = "oracle"


def wilson(correct: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of `correct` out of `n` (the same interval `sweep` reports)."""
    return wilson_interval(correct / n, n) if n else (0.0, 1.0)


@dataclass(frozen=True)
class EvidenceOracle(VisionStrategy):
    """Bench-only (not registered): keeps the patches the scene generator says hold the question's evidence, most
    covered first, then patches of other objects, then the rest in index order. Set `evidence` before each batch."""

    name: ClassVar[str] = ORACLE

    def select(self, signals: VisionSignals, k: int) -> VisionSelection:
        scores: torch.Tensor = self.evidence[: signals.features.shape[0]]  # type: ignore[attr-defined]
        idx = scores.topk(k, dim=1).indices.sort(dim=1).values.to(signals.features.device)
        feats = torch.gather(signals.features, 1, idx[..., None].expand(-1, -1, signals.features.shape[-1]))
        return VisionSelection(idx, feats)


def oracle_scores(samples: list[Sample]) -> torch.Tensor:
    """[N, 256] ranking scores for the oracle: evidence cover, then any object's cover, then a tiny index tiebreak."""
    rows = []
    for s in samples:
        all_objects = evidence_cover(s.scene, tuple(o.label for o in s.scene.objects))
        rows.append(evidence_cover(s.scene, s.qa.refs) * 10 + all_objects - np.arange(NUM_PATCHES) * 1e-6)
    return torch.from_numpy(np.stack(rows)).float()


@contextmanager
def tower_memo(model: Any) -> Iterator[dict[str, Any]]:
    """Run the vision tower once per distinct input; replay recorded attention q/k/v to active probes on repeats."""
    from ..adapters.vit_layout import block_attention, vision_blocks
    from ..probe import _ACTIVE, install_probe, probing, uninstall_probe

    tower = model.model.vision_tower
    attns = [block_attention(b) for b in vision_blocks(tower)]
    original = tower.forward
    memo: dict[str, Any] = {}

    def forward(pixel_values: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        flags = sorted((k, v) for k, v in kwargs.items() if isinstance(v, (bool, int, str)) or v is None)
        key = hashlib.sha1(pixel_values.detach().cpu().numpy().tobytes() + repr(flags).encode()).hexdigest()
        active = _ACTIVE.get() or {}
        if key in memo:
            cached_out, cached = memo[key]
            for attn, rec in zip(attns, cached):
                callback = active.get(id(attn))
                if callback is not None:
                    callback(attn, *rec)
            return cached_out
        records: list[Any] = [None] * len(attns)

        def recorder(i: int) -> Any:
            def record(module: Any, q: Any, k: Any, v: Any, mask: Any, kw: dict) -> None:
                records[i] = (q, k, v, mask, dict(kw))
                chained = active.get(id(module))
                if chained is not None:
                    chained(module, q, k, v, mask, kw)

            return record

        added = [a for a in attns if not hasattr(a, "_vtokprune_config")]
        for a in added:
            install_probe(a)
        try:
            with probing({id(a): recorder(i) for i, a in enumerate(attns)}):
                out = original(pixel_values, *args, **kwargs)
        finally:
            for a in added:
                uninstall_probe(a)
        memo.clear()  # one batch at a time keeps memory flat
        memo[key] = (out, records)
        return out

    tower.forward = forward
    try:
        yield memo
    finally:
        del tower.forward


@torch.no_grad()
def answers(model: Any, processor: Any, inputs: dict[str, Any]) -> list[str]:
    out = model.generate(**inputs, max_new_tokens=1, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1] :]
    return [processor.tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]


def strategy_names(requested: list[str] | None = None) -> list[str]:
    import vtokprune

    names = [n for n in vtokprune.available_strategies() if n != "none"]
    if requested:
        return [n for n in requested if n in names]
    return [n for n in BASELINES if n in names] + [n for n in names if n not in BASELINES]


def run_benchmark(
    model_path: str | Path | None = None,
    samples: int = DEFAULT_SAMPLES,
    budgets: tuple[int, ...] = DEFAULT_BUDGETS,
    strategies: list[str] | None = None,
    batch: int = 24,
    log: Any = print,
    memo: bool = True,
    positions: str | None = None,
) -> dict[str, Any]:
    """Every configuration on the first `samples` held-out questions. Strategies that cannot run on this model
    (CapabilityError, e.g. text_clip without its CLIP weights) are listed under "skipped". `positions` overrides every
    strategy's `positions` ("original" / "contiguous"; None: each strategy's default, its official code's)."""
    import vtokprune

    model, processor = load(model_path)
    data = heldout(samples)
    configs: list[tuple[str, int, Any]] = [("none", NUM_PATCHES, None)]
    configs += [(ORACLE, k, EvidenceOracle(keep=k)) for k in budgets]
    skipped: dict[str, str] = {}
    for name in strategy_names(strategies):
        try:
            for k in budgets:
                extra = {} if positions is None else {"positions": positions}
                strategy = vtokprune.get_strategy(name, keep=k, **extra)
                vtokprune.apply(model, strategy)
                vtokprune.remove(model)
                configs.append((name, k, strategy))
        except (vtokprune.CapabilityError, ImportError, OSError) as e:
            skipped[name] = str(e).splitlines()[0]
            log(f"{name:<14} skipped: {skipped[name]}")
            configs = [c for c in configs if c[0] != name]
    correct = {(n, k): np.zeros(len(data), dtype=bool) for n, k, _ in configs}
    seconds = {(n, k): 0.0 for n, k, _ in configs}
    start = time.time()
    with tower_memo(model) if memo else _nothing():
        for i in range(0, len(data), batch):
            chunk = data[i : i + batch]
            inputs = dict(
                processor(
                    images=[render(s.scene) for s in chunk],
                    text=[prompt(s.qa.question) for s in chunk],
                    return_tensors="pt",
                    padding=True,
                )
            )
            evidence = oracle_scores(chunk)
            for name, k, strategy in list(configs):
                t0 = time.time()
                if strategy is None:
                    preds = answers(model, processor, inputs)
                else:
                    if isinstance(strategy, EvidenceOracle):
                        object.__setattr__(strategy, "evidence", evidence)
                    try:
                        with vtokprune.pruned(model, strategy):
                            preds = answers(model, processor, inputs)
                    except (vtokprune.CapabilityError, ImportError, OSError) as e:  # needs what is not here
                        skipped[name] = str(e).splitlines()[0]
                        log(f"{name:<14} skipped: {skipped[name]}")
                        configs = [c for c in configs if c[0] != name]
                        continue
                seconds[(name, k)] += time.time() - t0
                correct[(name, k)][i : i + len(chunk)] = [p == s.qa.answer for p, s in zip(preds, chunk)]
            log(f"{i + len(chunk)}/{len(data)} questions, {time.time() - start:.0f}s")
    from ..compute import DecoderShape, average_visual_tokens

    layers = DecoderShape.from_config(model.config).num_layers
    results = [_result(n, k, correct[(n, k)], data, seconds[(n, k)]) for n, k, _ in configs]
    for r, (_, _, strategy) in zip(results, configs):
        # equal-compute view: in-LLM strategies keep every token up to their layer (see vtokprune.compute)
        r["avg_visual_tokens"] = round(average_visual_tokens(strategy, layers, NUM_PATCHES), 1)
        r["config"] = repr(strategy) if strategy is not None else "none"
    report = {
        "model": str(model_path) if model_path else "vtokprune/assets/toy-dinov2-llava",
        "split": "held-out (seeds from 1e9)",
        "samples": len(data),
        "budgets": list(budgets),
        "visual_tokens": NUM_PATCHES,
        "interval": "95% Wilson",
        "positions": positions or "each strategy's default",
        "torch_threads": torch.get_num_threads(),
        "seconds": round(time.time() - start, 1),
        "results": results,
        "skipped": skipped,
    }
    report["checks"] = validity_checks(report)
    return report


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


def _result(name: str, keep: int, ok: np.ndarray, data: list[Sample], seconds: float) -> dict[str, Any]:
    n, c = len(ok), int(ok.sum())
    lo, hi = wilson(c, n)
    per_type = {}
    for kind in QUESTION_TYPES:
        mask = np.array([s.qa.kind == kind for s in data])
        if mask.any():
            kc, kn = int(ok[mask].sum()), int(mask.sum())
            per_type[kind] = {"accuracy": kc / kn, "n": kn, "ci95": list(wilson(kc, kn))}
    return {
        "strategy": name,
        "keep": keep,
        "n": n,
        "correct": c,
        "accuracy": c / n,
        "ci95": [lo, hi],
        "per_type": per_type,
        "seconds": round(seconds, 2),
    }


def _acc(report: dict[str, Any], name: str, keep: int | None = None) -> float | None:
    for r in report["results"]:
        if r["strategy"] == name and (keep is None or r["keep"] == keep):
            return float(r["accuracy"])
    return None


def validity_checks(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The benchmark's validity checks and targets at the budget nearest 11%, each with its numbers and pass/fail."""
    k = check_budget(report["budgets"], report.get("visual_tokens", NUM_PATCHES))
    full = _acc(report, "none")
    oracle, random = _acc(report, ORACLE, k), _acc(report, "random", k)
    cls = _acc(report, "cls", k)
    pruned = [r for r in report["results"] if r["keep"] == k and r["strategy"] not in ("none", ORACLE)]
    best = max(pruned, key=lambda r: r["accuracy"]) if pruned else None
    checks: list[dict[str, Any]] = []

    def add(kind: str, what: str, value: float | None, threshold: float | None) -> None:
        ok = value is not None and threshold is not None and value >= threshold - 1e-12
        checks.append({"kind": kind, "check": what, "value": value, "threshold": threshold, "pass": ok})

    if full is not None:
        add("validity", f"oracle@{k} >= 95% of unpruned", oracle, 0.95 * full)
        add("validity", f"random@{k} <= unpruned - 10 points (value: unpruned - random)", _diff(full, random), 0.10)
        add("target", "unpruned >= 90%", full, 0.90)
        if best is not None:
            add("target", f"best strategy@{k} ({best['strategy']}) >= 95% of unpruned", best["accuracy"], 0.95 * full)
    if cls is not None and random is not None:
        add("target", f"cls@{k} >= random@{k} + 5 points (value: cls - random)", cls - random, 0.05)
    return checks


def check_budget(budgets: list[int], total: int) -> int:
    """The budget the checks use: the one nearest 11% of the visual tokens (28 of 256)."""
    return min(budgets, key=lambda b: abs(b - CHECK_FRACTION * total))


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def fmt(r: dict[str, Any]) -> str:
    lo, hi = r["ci95"]
    return f"{100 * r['accuracy']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def table(report: dict[str, Any]) -> str:
    """Markdown table: one row per strategy, one column per budget; accuracy % [95% Wilson interval], n per cell."""
    budgets = report["budgets"]
    total = report.get("visual_tokens", NUM_PATCHES)
    rows: dict[str, dict[int, dict[str, Any]]] = {}
    full = None
    for r in report["results"]:
        if r["strategy"] == "none":
            full = r
        else:
            rows.setdefault(r["strategy"], {})[r["keep"]] = r
    head = "| strategy | " + " | ".join(f"keep {k} ({100 * k / total:.0f}%)" for k in budgets) + " |"
    lines = [
        f"n = {report['samples']} held-out questions per cell; accuracy % [95% Wilson interval]; (average visual tokens "
        "over decoder layers, the equal-compute count, where it differs from keep)",
        "",
        head,
    ]
    lines.append("|" + "---|" * (len(budgets) + 1))
    if full is not None:
        lines.append(f"| none (all {total}) | " + " | ".join(fmt(full) for _ in budgets) + " |")
    for name, cells in rows.items():
        lines.append(f"| {name} | " + " | ".join(_cell(cells[k]) if k in cells else "-" for k in budgets) + " |")
    return "\n".join(lines)


def _cell(r: dict[str, Any]) -> str:
    avg = r.get("avg_visual_tokens")
    return fmt(r) + ("" if avg is None or abs(avg - r["keep"]) < 0.05 else f" ({avg:g})")


def checks_table(report: dict[str, Any]) -> str:
    lines = ["| check | value | threshold | pass |", "|---|---|---|---|"]
    for c in report["checks"]:
        v = "-" if c["value"] is None else f"{100 * c['value']:.1f}"
        t = "-" if c["threshold"] is None else f"{100 * c['threshold']:.1f}"
        lines.append(f"| {c['kind']}: {c['check']} | {v} | {t} | {'yes' if c['pass'] else 'NO'} |")
    return "\n".join(lines)


def per_type_table(report: dict[str, Any], keep: int) -> str:
    """Per question type: unpruned and every configuration at `keep` (accuracy % [95% interval])."""
    rows = [r for r in report["results"] if r["strategy"] == "none" or r["keep"] == keep]
    lines = ["| strategy | " + " | ".join(f"{k} (n)" for k in QUESTION_TYPES) + " |"]
    lines.append("|" + "---|" * (len(QUESTION_TYPES) + 1))
    for r in rows:
        label = "none" if r["strategy"] == "none" else f"{r['strategy']} @{keep}"
        cells = [f"{fmt(r['per_type'][k])} ({r['per_type'][k]['n']})" for k in QUESTION_TYPES if k in r["per_type"]]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(report: dict[str, Any], path: str | Path) -> None:
    lines = ["strategy,keep,fraction,n,correct,accuracy,ci95_low,ci95_high"]
    total = report.get("visual_tokens", NUM_PATCHES)
    for r in report["results"]:
        lo, hi = r["ci95"]
        lines.append(
            f"{r['strategy']},{r['keep']},{r['keep'] / total:.4f},{r['n']},{r['correct']},"
            f"{r['accuracy']:.4f},{lo:.4f},{hi:.4f}"
        )
    Path(path).write_text("\n".join(lines) + "\n")


def plot(report: dict[str, Any], path: str | Path) -> None:
    """Accuracy vs kept tokens with 95% error bars; every budget labelled on x; unpruned as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = report["budgets"]
    total = report.get("visual_tokens", NUM_PATCHES)
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in report["results"]:
        if r["strategy"] == "none":
            lo, hi = r["ci95"]
            ax.axhspan(100 * lo, 100 * hi, color="grey", alpha=0.25, label=f"unpruned (n={r['n']})")
    names = list(dict.fromkeys(r["strategy"] for r in report["results"] if r["strategy"] != "none"))
    for j, name in enumerate(names):
        rs = sorted((r for r in report["results"] if r["strategy"] == name), key=lambda r: r["keep"])
        x = [r["keep"] + (j - len(names) / 2) * 0.6 for r in rs]  # small dodge so the bars do not overlap
        y = [100 * r["accuracy"] for r in rs]
        err = [[100 * (r["accuracy"] - r["ci95"][0]) for r in rs], [100 * (r["ci95"][1] - r["accuracy"]) for r in rs]]
        style = "--" if name == ORACLE else "-"
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, linestyle=style, label=name)
    ax.set_xticks(budgets, [f"{k}\n({100 * k / total:.0f}%)" for k in budgets])
    ax.set_xlabel(f"visual tokens kept (of {total})")
    ax.set_ylabel(f"held-out accuracy, % (n={report['samples']}, 95% Wilson)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
