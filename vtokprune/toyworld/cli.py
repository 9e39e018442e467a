"""`vtokprune train-toy` and `vtokprune bench-toy`: entry points taking an argv list."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from .model import ASSET_DIR


def train_main(argv: list[str] | None = None) -> int:
    """Cache frozen DINOv2 features, train the projector + language model, and save the checkpoint to --out."""
    import torch

    from .checkpoint import finalize
    from .features import cache_main
    from .train import TrainConfig, train

    parser = argparse.ArgumentParser(prog="vtokprune train-toy", description=train_main.__doc__)
    for f in dataclasses.fields(TrainConfig):
        default = f.default
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(default), default=default)
    parser.add_argument("--train-scenes", type=int, default=3000, help="scenes whose features are cached")
    parser.add_argument("--val-scenes", type=int, default=300)
    parser.add_argument("--cache-only", action="store_true", help="only write the feature cache")
    args = vars(parser.parse_args(argv))
    scenes, val_scenes, cache_only = args.pop("train_scenes"), args.pop("val_scenes"), args.pop("cache_only")
    cfg = TrainConfig(**args)
    torch.set_num_threads(cfg.threads)

    def log(line: str) -> None:
        print(line, flush=True)

    cache_main(cfg.cache, scenes, val_scenes, log=log)
    if cache_only:
        return 0
    summary = train(cfg, log)
    finalize(cfg.out, Path(cfg.out) / "best.pt", summary)
    (Path(cfg.out) / "best.pt").unlink()
    print(f"saved to {cfg.out}: {summary['steps']} steps, {summary['seconds']:.0f}s, best {summary['best']}")
    return 0


def bench_main(argv: list[str] | None = None) -> int:
    """Held-out accuracy (n, 95% Wilson intervals) unpruned, oracle and per strategy x budget, with the validity
    checks; prints tables, writes JSON, CSV and a plot."""
    import torch

    from .bench import (
        DEFAULT_BUDGETS,
        DEFAULT_SAMPLES,
        check_budget,
        checks_table,
        per_type_table,
        plot,
        run_benchmark,
        table,
        write_csv,
    )
    from .card import write_model_card
    from .scenes import NUM_PATCHES

    parser = argparse.ArgumentParser(prog="vtokprune bench-toy", description=bench_main.__doc__)
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the shipped toy-dinov2-llava)")
    parser.add_argument("--limit", "--samples", dest="samples", type=int, default=DEFAULT_SAMPLES, help="questions")
    parser.add_argument("--budgets", default=",".join(map(str, DEFAULT_BUDGETS)))
    parser.add_argument("--strategies", default=None, help="comma-separated names (default: every registered one)")
    parser.add_argument("--batch-size", "--batch", dest="batch", type=int, default=24)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--positions", choices=("original", "contiguous"), default=None, help="override every strategy's positions"
    )
    parser.add_argument("--out", default="toy_accuracy", help="prefix of the .json/.csv/.png outputs ('' to skip)")
    parser.add_argument("--card", action="store_true", help="also rewrite the checkpoint's README.md model card")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    budgets = tuple(int(b) for b in args.budgets.split(",") if b)
    strategies = [s.strip() for s in args.strategies.split(",")] if args.strategies else None
    report = run_benchmark(args.model, args.samples, budgets, strategies, args.batch, positions=args.positions)
    print()
    print(table(report))
    print()
    print(checks_table(report))
    print()
    print(per_type_table(report, check_budget(list(budgets), NUM_PATCHES)))
    if args.out:
        Path(f"{args.out}.json").write_text(json.dumps(report, indent=1) + "\n")
        write_csv(report, f"{args.out}.csv")
        plot(report, f"{args.out}.png")
        print(f"\nwrote {args.out}.json, {args.out}.csv, {args.out}.png")
    if args.card:
        path = Path(args.model) if args.model else ASSET_DIR
        write_model_card(path, report)
        print(f"wrote {path / 'README.md'}")
    return 0
