"""`vtokprune search`: search a per-layer schedule on calibration data and write the schedule file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

LMMS_PREFIX = "lmms:"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vtokprune search",
        description="Search how many visual tokens each decoder layer keeps (G-Search greedy or P-Sigmoid + "
        "Bayesian optimisation); writes a schedule file for `--strategies scheduled --set scheduled.file=FILE`.",
    )
    p.add_argument("--model", default=None, help="HF model id or local path (default: the embedded model)")
    p.add_argument(
        "--method",
        choices=("greedy", "psigmoid", "vflowopt"),
        default="greedy",
        help="greedy (G-Search), psigmoid (P-Sigmoid + TPE), vflowopt (fit VFlowOpt's parameters by TPE)",
    )
    p.add_argument("--family", choices=("fastv", "pdrop"), default="fastv", help="how stages score the tokens")
    p.add_argument("--objective", choices=("agreement", "accuracy"), default="agreement")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--avg-tokens", type=float, default=None, help="visual tokens averaged over decoder layers")
    target.add_argument("--tflops", type=float, default=None, help="analytic prefill TFLOPs per sample")
    p.add_argument("--keep", type=int, default=None, help="vflowopt: visual tokens left after the last stage")
    p.add_argument("--ratio", type=float, default=None, help="vflowopt: fraction of visual tokens left after it")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="vflowopt: fixed parameter (layers=2,6,10)")
    p.add_argument("--tolerance", type=float, default=0.02, help="greedy: objective drop allowed per layer decision")
    p.add_argument("--levels", type=int, default=16, help="greedy: candidate counts per layer (fractions k/levels)")
    p.add_argument("--trials", type=int, default=20, help="psigmoid: Bayesian-optimisation trials")
    p.add_argument(
        "--calibration",
        default="toy",
        help="calibration set: toy (the toy world's training split) or lmms:TASK (an lmms-eval task's training, else "
        "validation split; never the split lmms-eval evaluates)",
    )
    p.add_argument("--include-path", default=None, help="lmms:TASK: a directory of your own lmms-eval task YAMLs")
    p.add_argument("--samples", type=int, default=64, help="calibration questions")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="calibration draw and optimiser seed")
    p.add_argument("--out", default="runs/search/schedule.json", help="schedule file to write")
    p.add_argument("--state", default=None, help="resume log (default: OUT with .state.json)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ..errors import VTokPruneError

    task = _lmms_task(args.calibration)
    if task is not None:  # unknown tasks and held-out-only tasks fail before the model loads
        from .lmms_tasks import calibration_split

        calibration_split(task, args.include_path)
    elif args.include_path:
        raise VTokPruneError("--include-path is for --calibration lmms:TASK")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from ..cli import load_model, quiet_libraries
    from .api import search
    from .calibration import toy_calibration

    out = Path(args.out)
    state = Path(args.state) if args.state else out.with_suffix(".state.json")
    with quiet_libraries():
        model, processor, description = load_model(args.model)
        if processor is None:
            raise VTokPruneError(f"{description} has no processor; a calibration set needs one to build its inputs")
        model.eval()
        if task is None:
            calibration = toy_calibration(processor, args.samples, args.seed, args.batch_size, dtype=model.dtype)
        else:
            from .lmms_tasks import lmms_calibration

            calibration = lmms_calibration(
                task, model, processor, args.samples, args.seed, args.batch_size, include_path=args.include_path
            )
        print(f"model: {description}\ncalibration: {calibration.description}", file=sys.stderr)
        if args.method == "vflowopt":
            return _tune(args, model, calibration, out, state)
        result = search(
            model,
            calibration,
            method=args.method,
            family=args.family,
            objective=args.objective,
            avg_tokens=args.avg_tokens,
            tflops=args.tflops,
            tolerance=args.tolerance,
            levels=args.levels,
            trials=args.trials,
            seed=args.seed,
            state=state,
            out=out,
            progress=not args.quiet,
        )
    if result.greedy_counts is not None and result.greedy_counts != result.counts:
        print(f"greedy search (within tolerance): {result.greedy_counts}, then scaled to the target")
    print(f"counts per layer: {result.counts}")
    print(
        f"avg visual tokens over layers: {result.compute['avg_visual_tokens']}, "
        f"prefill TFLOPs: {result.compute['prefill_tflops']:.6g}"
    )
    scores = ", ".join(
        f"{k} {100 * v:.1f}% (unpruned {100 * result.unpruned[k]:.1f}%)" for k, v in result.scores.items()
    )
    print(f"calibration ({calibration.size} samples): {scores}")
    print(f"evaluations: {result.evaluations} ({result.computed} computed now, the rest from {state})")
    print(f"wrote {result.path}; use it: vtokprune sweep --strategies scheduled --set scheduled.file={result.path}")
    return 0


def _lmms_task(calibration: str) -> str | None:
    """None for the toy set, the task name for lmms:TASK; anything else is an error."""
    from ..errors import VTokPruneError

    if calibration == "toy":
        return None
    task = calibration[len(LMMS_PREFIX) :].strip() if calibration.startswith(LMMS_PREFIX) else ""
    if not task:
        raise VTokPruneError(
            f"--calibration {calibration!r}: use toy (the toy world's training split) or lmms:TASK (an lmms-eval "
            "task with a training or validation split, e.g. lmms:vtokprune_toy)"
        )
    return task


def _tune(args: argparse.Namespace, model: object, calibration: object, out: Path, state: Path) -> int:
    from ..cli import parse_sets
    from ..errors import VTokPruneError
    from .tune import tune

    if args.avg_tokens is not None or args.tflops is not None:
        raise VTokPruneError("--method vflowopt takes its budget as --keep or --ratio (count after the last stage)")
    fixed = {k.rpartition(".")[2]: v for k, v in parse_sets(args.set).items()}
    fixed.update({k: v for k, v in (("keep", args.keep), ("ratio", args.ratio)) if v is not None})
    result = tune(
        model,
        calibration,  # type: ignore[arg-type]
        "vflowopt",
        objective=args.objective,
        trials=args.trials,
        seed=args.seed,
        state=state,
        out=out,
        progress=not args.quiet,
        **fixed,
    )
    print(f"best: {result.strategy!r}")
    print(", ".join(f"{k} {100 * v:.1f}% (unpruned {100 * result.unpruned[k]:.1f}%)" for k, v in result.scores.items()))
    sets = " ".join(f"--set vflowopt.{k}={v:.4g}" for k, v in result.params.items())
    print(f"wrote {result.path}; use it: vtokprune sweep --strategies vflowopt {sets}")
    return 0
