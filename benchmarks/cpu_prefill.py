"""CPU prefill latency of every strategy against its compute-equivalent ideal, post-tower and inside the vision tower.

    python benchmarks/cpu_prefill.py --threads 2 --rounds 5 --json benchmarks/results/cpu_prefill.json
    python benchmarks/cpu_prefill.py --smoke                  # tiny model, seconds (a test)

Model (random fp32 weights, built from a config, SDPA): the mid-size LLaVA geometry of issue 15, a CLIP ViT-B/14 at
336 px (576 patches, 12 layers, width 768, features from layer -2) and a 24-layer Llama of width 896 with 14 query
and 2 KV heads; one image and 48 text tokens per prompt; batch 1 and 8. Time: one prefill (model forward with a
cache, logits of the last token), after one untimed prefill of the same configuration; median over interleaved
rounds (every configuration once per round, so load changes on a shared machine hit all of them alike), with a
bootstrap 95% interval of the median.

Rows:

* ``none``: unpruned; ``ideal``: the same model fed only the first K image tokens (vision tower on all patches, no
  scoring: a selection that costs nothing), the compute-equivalent ideal of every post-tower strategy;
* ``ideal@L<l>``: the same in-tower (the first K patches kept after vision layer l), ideal of the in-tower rows;
* ``ideal/<s>``: for an in-LLM strategy, the first K image tokens kept at the strategy's own stage layers;
* ``<s>``: every registered strategy at K (but SKIP); ``<s>@L<l>``: in-tower variants (``in_tower_layer=l``).

Columns: ms (median), x_unpruned (unpruned / row), share_of_ideal (its ideal's ms / its ms, paired by round: 100% =
selection is free; what a strategy's own scoring costs, e.g. ZOO-Prune's projector perturbations, shows here),
overhead (the strategy at keep = all tokens minus the unpruned prefill, each keep-all run paired with an unpruned run
beside it, order alternating by round; as a share of the unpruned prefill). Strategies that skip scoring when asked
to keep everything (cdpruner, divprune, zoo, ...) show only the hook and compaction cost in the overhead column.
pruning_steps (ms and % of the unpruned prefill): the time the timed prefill at K spent in the pruning steps
themselves (vision-side selection, sequence compaction, each in-LLM stage; not the attention-row probes, which run
inside the attention calls, nor an in-tower selection, which runs inside the vision tower), timed in place: a
direct measure that the prefill-to-prefill noise does not swamp.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's vtokprune
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_utils import in_tower_spec, llava_inputs, llava_model, machine, median_ci, table, write_json  # noqa: E402

import vtokprune  # noqa: E402
from vtokprune import runtime  # noqa: E402
from vtokprune.adapters.base import Adapter  # noqa: E402
from vtokprune.adapters.sequence import SequenceBookkeeping  # noqa: E402
from vtokprune.errors import VTokPruneError  # noqa: E402
from vtokprune.strategies.base import (  # noqa: E402
    LLMContext,
    LLMStrategy,
    Strategy,
    VisionSelection,
    VisionSignals,
    VisionStrategy,  # noqa: E402
)

GEOMETRIES: dict[str, dict[str, Any]] = {
    "mid": {
        "vision": dict(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=336,
            patch_size=14, projection_dim=768,
        ),
        "text": dict(
            hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
            num_key_value_heads=2, vocab_size=32064, max_position_embeddings=4096,
        ),
        "keep": 64,
        "in_tower_layers": ("2", "3", "6"),
    },
    "smoke": {
        "vision": dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=84,
            patch_size=14, projection_dim=32,
        ),
        "text": dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128, max_position_embeddings=512,
        ),
        "keep": 8,
        "in_tower_layers": ("0",),
    },
}  # fmt: skip
# Left out, with the reason (each needs something a random-weight model cannot have).
SKIP = {
    "none": "the unpruned row",
    "text_clip": "needs a CLIP checkpoint",
    "cdpruner_clip": "needs a CLIP checkpoint",
    "scheduled": "needs a schedule file",
    "dyvte": "needs a trained head",
    "atp": "needs a trained head",
}
IN_TOWER = ("cls", "cls_multilayer", "visionzip", "holov", "flowcut")


# ------------------------------------------------------------------ the ideals: selections that cost nothing


@dataclasses.dataclass(frozen=True)
class FirstK(VisionStrategy):
    """Keeps the first k tokens: no scoring. Reads the [CLS] signal only so it may run in-tower (one probe row)."""

    name: ClassVar[str] = "ideal"
    needs: ClassVar[frozenset[str]] = frozenset()

    def select(self, signals: VisionSignals, k: int) -> VisionSelection:
        n = signals.features.shape[0]
        idx = torch.arange(k, device=signals.features.device).expand(n, k)
        return VisionSelection(idx, signals.features[:, :k])


@dataclasses.dataclass(frozen=True)
class FirstKInTower(FirstK):
    needs: ClassVar[frozenset[str]] = frozenset({"cls_attn"})


@dataclasses.dataclass(frozen=True)
class FirstKInLLM(LLMStrategy):
    """The stages of `like` with the first image tokens kept (a constant score: only the compaction costs)."""

    like: Any = None

    name: ClassVar[str] = "ideal_llm"

    def schedule(self, num_layers: int, available: int) -> dict[int, int]:
        return self.like.schedule(num_layers, available)  # type: ignore[no-any-return]

    def score(self, probs: torch.Tensor, row_valid: torch.Tensor, ctx: LLMContext) -> torch.Tensor:
        length = ctx.image_mask.shape[1]
        return -torch.arange(length, dtype=torch.float32, device=ctx.image_mask.device).expand_as(ctx.image_mask)


# ------------------------------------------------------------------ configurations and timing


@dataclasses.dataclass
class Config:
    label: str
    strategy: Strategy | None
    ideal: str | None = None  # label of its compute-equivalent ideal
    overhead_of: str | None = None  # this row is the keep-all run of that label


def configs(keep: int, available: int, in_tower_layers: tuple[str, ...], overhead: bool) -> list[Config]:
    """Every row; in-tower variants from their specs (bench_utils.in_tower_spec: "3", "2-4", "2-4+fuse")."""
    out = [Config("none", None), Config("ideal", FirstK(keep=keep))]
    out += [Config(f"ideal@L{i}", FirstKInTower(keep=keep, **in_tower_spec(i))) for i in in_tower_layers]
    for name in vtokprune.available_strategies():
        if name in SKIP:
            continue
        strategy = vtokprune.get_strategy(name, keep=keep)
        ideal = "ideal"
        if isinstance(strategy, LLMStrategy):
            ideal = f"ideal/{name}"
            out.append(Config(ideal, FirstKInLLM(keep=keep, like=strategy)))
        out.append(Config(name, strategy, ideal))
        if overhead:
            out.append(Config(f"{name}/keep-all", vtokprune.get_strategy(name, keep=available), overhead_of=name))
    for name in IN_TOWER:
        for layer in in_tower_layers:
            strategy = vtokprune.get_strategy(name, keep=keep, **in_tower_spec(layer))
            out.append(Config(f"{name}@L{layer}", strategy, f"ideal@L{layer}"))
    if overhead:
        layer = in_tower_layers[0]
        keep_all = vtokprune.get_strategy("cls", keep=available, **in_tower_spec(layer))
        out.append(Config(f"cls@L{layer}/keep-all", keep_all, overhead_of=f"cls@L{layer}"))
    return out


def prefill_fn(model: Any, inputs: dict[str, torch.Tensor]) -> Callable[[], Any]:
    def run() -> Any:
        with torch.no_grad():
            return model(**inputs, use_cache=True, logits_to_keep=1)

    return run


# The pruning work inside a prefill: vision-side selection (scores, top-k, gather) and the sequence compaction, and
# each in-LLM stage (PyramidDrop's extra attention on the stage input, score, top-k, compaction of the hidden states)
# and the per-layer masks and positions of the compacted sequence.
TIMED_STEPS = [
    (Adapter, "_select"),
    (SequenceBookkeeping, "compact_args"),
    (runtime, "_score_with_own_attention"),
    (runtime, "_prune_stage"),
    (runtime, "_stage_kwargs"),
]


@contextlib.contextmanager
def selection_timer() -> Iterator[list[float]]:
    """Accumulate the wall time (ms) spent in TIMED_STEPS while active (a list holding one number)."""
    spent = [0.0]
    depth = [0]  # steps call each other: count the outermost only
    saved = [(owner, name, getattr(owner, name)) for owner, name in TIMED_STEPS]

    def timed(fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            depth[0] += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    spent[0] += (time.perf_counter() - t0) * 1e3

        return wrapper

    for owner, name, fn in saved:
        setattr(owner, name, timed(fn))
    try:
        yield spent
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def time_config(
    model: Any, inputs: dict[str, torch.Tensor], cfg: Config, warmup: bool, steps: list[float] | None = None
) -> float:
    """One timed prefill with `cfg` applied (after one untimed prefill when `warmup`: first-call costs); the time
    spent in the pruning steps of the timed prefill is appended to `steps`."""
    if cfg.strategy is not None:
        vtokprune.apply(model, cfg.strategy)
    try:
        run = prefill_fn(model, inputs)
        if warmup:
            run()
        with selection_timer() as spent:
            t0 = time.perf_counter()
            run()
            ms = (time.perf_counter() - t0) * 1e3
        if steps is not None:
            steps.append(spent[0])
        return ms
    finally:
        if cfg.strategy is not None:
            vtokprune.remove(model)


def run_batch(model: Any, batch: int, args: argparse.Namespace, geometry: dict[str, Any]) -> list[dict[str, Any]]:
    inputs = llava_inputs(model, batch, args.text_tokens)
    available = (geometry["vision"]["image_size"] // geometry["vision"]["patch_size"]) ** 2
    todo = configs(geometry["keep"], available, geometry["in_tower_layers"], batch in args.overhead_batches)
    if args.only:
        wanted = re.compile(args.only)
        keep = {c.label for c in todo if wanted.fullmatch(c.label)}
        keep |= {c.ideal for c in todo if c.label in keep and c.ideal} | {"none"}
        todo = [c for c in todo if c.label in keep or (c.overhead_of is not None and c.overhead_of in keep)]
    rows_cfg = [c for c in todo if c.overhead_of is None]
    keep_alls = [c for c in todo if c.overhead_of is not None]
    none = rows_cfg[0]
    samples: dict[str, list[float]] = {c.label: [] for c in rows_cfg}
    steps: dict[str, list[float]] = {c.label: [] for c in rows_cfg}
    overhead: dict[str, list[float]] = {c.label: [] for c in keep_alls}
    errors: dict[str, str] = {}
    warmed: set[str] = set()

    def timed(c: Config) -> float | None:
        if c.label in errors:
            return None
        try:
            ms = time_config(model, inputs, c, warmup=c.label not in warmed, steps=steps.get(c.label))
        except VTokPruneError as e:
            errors[c.label] = f"{type(e).__name__}: {e}"
            return None
        warmed.add(c.label)
        return ms

    for r in range(args.rounds):
        for c in rows_cfg:
            ms = timed(c)
            if ms is not None:
                samples[c.label].append(ms)
        for c in keep_alls:  # paired with an unpruned run next to it, the order alternating between rounds
            pair = (none, c) if r % 2 == 0 else (c, none)
            times = {x.label: timed(x) for x in pair}
            if None not in times.values():
                overhead[c.label].append(times[c.label] - times["none"])  # type: ignore[operator]
        done = {k: round(statistics.median(v)) for k, v in samples.items() if v}
        print(f"[batch {batch}] round {r + 1}/{args.rounds}: none {done.get('none')} ms, load {os.getloadavg()[0]:.1f}")
    rows = []
    for c in rows_cfg:
        row: dict[str, Any] = {"batch": batch, "row": c.label, "keep": available if c.label == "none" else None}
        if c.label in errors:
            rows.append({**row, "error": errors[c.label]})
            continue
        if row["keep"] is None:
            row["keep"] = geometry["keep"]
        ms = median_ci(samples[c.label])
        row.update(ms=ms["median"], ms_ci=[ms["lo"], ms["hi"]], rounds=ms["n"])
        row["x_unpruned"] = statistics.median(samples["none"]) / ms["median"]
        if c.strategy is not None:
            row["pruning_steps_ms"] = statistics.median(steps[c.label])
            row["pruning_steps_%"] = 100 * row["pruning_steps_ms"] / statistics.median(samples["none"])
        if c.ideal is not None and samples.get(c.ideal):
            share = median_ci([100 * i / s for i, s in zip(samples[c.ideal], samples[c.label])])  # paired by round
            row.update(ideal=c.ideal, **{"share_of_ideal_%": share["median"], "share_ci": [share["lo"], share["hi"]]})
        post = c.label.split("@")[0]
        if "@" in c.label and samples.get(post):  # in-tower speed-up over the same strategy after the tower
            x = median_ci([p / s for p, s in zip(samples[post], samples[c.label])])  # paired by round
            row.update(x_post_tower=x["median"], x_post_tower_ci=[x["lo"], x["hi"]])
        keep_all = next((o for o in keep_alls if o.overhead_of == c.label), None)
        if keep_all is not None and overhead[keep_all.label]:
            ovh = median_ci(overhead[keep_all.label])
            unpruned = statistics.median(samples["none"])
            row.update(overhead_ms=ovh["median"], overhead_ms_ci=[ovh["lo"], ovh["hi"]])
            row["overhead_%"] = 100 * ovh["median"] / unpruned
            row["overhead_%_ci"] = [100 * ovh["lo"] / unpruned, 100 * ovh["hi"] / unpruned]
        rows.append(row)
    return rows


def display(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with the intervals written beside their values, for the printed table."""
    out = []
    for r in rows:
        d = dict(r)
        for key, ci, digits in (
            ("share_of_ideal_%", "share_ci", 1),
            ("overhead_%", "overhead_%_ci", 1),
            ("x_post_tower", "x_post_tower_ci", 2),
        ):
            if key in r:
                d[key] = f"{r[key]:.{digits}f} [{r[ci][0]:.{digits}f}, {r[ci][1]:.{digits}f}]"
        out.append(d)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny model, 1 round: checks that the script runs")
    p.add_argument("--batch", type=int, nargs="+", default=None)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--text-tokens", type=int, default=48)
    p.add_argument("--overhead-batches", type=int, nargs="*", default=None, help="batches with keep-all rows")
    p.add_argument("--in-tower", default=None, help='in-tower variants, comma-separated specs: "2,3,2-4+fuse"')
    p.add_argument("--only", default=None, help="rows whose label matches this regex (with their ideals and none)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    geometry = dict(GEOMETRIES["smoke" if args.smoke else "mid"])
    if args.in_tower:
        geometry["in_tower_layers"] = tuple(args.in_tower.split(","))
    args.batch = args.batch or ([2] if args.smoke else [1, 8])
    args.rounds = args.rounds or (1 if args.smoke else 5)
    args.overhead_batches = args.batch if args.overhead_batches is None else args.overhead_batches
    device = torch.device("cpu")
    load_before = os.getloadavg()
    model = llava_model(geometry["vision"], geometry["text"], device, torch.float32)
    start = time.time()
    rows: list[dict[str, Any]] = []
    for batch in args.batch:
        rows += run_batch(model, batch, args, geometry)
    cols = ["batch", "row", "keep", "ms", "x_unpruned", "share_of_ideal_%", "overhead_%", "pruning_steps_%"]
    if any("x_post_tower" in r for r in rows):
        cols.append("x_post_tower")
    env = machine(device)
    env["loadavg_before"] = load_before
    env["minutes"] = round((time.time() - start) / 60, 1)
    print(f"CPU prefill, {env['cpu']}, {args.threads} threads, median of {args.rounds} interleaved rounds, "
          f"load average before/after {load_before[0]:.1f}/{env['loadavg'][0]:.1f}")  # fmt: skip
    print(table(display(rows), cols))
    for r in rows:
        if "error" in r:
            print(f"  {r['row']} (batch {r['batch']}): {r['error']}")
    payload = {
        "env": env, "smoke": args.smoke, "geometry": geometry, "config": vars(args), "skipped": SKIP, "results": rows,
    }  # fmt: skip
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
