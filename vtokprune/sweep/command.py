"""`vtokprune sweep ...`: the command line, and its relaunch under torchrun for `--processes N`."""

from __future__ import annotations

import argparse
import os
import sys

from .backends import BACKENDS, LOCAL_TASKS
from .engine import DEFAULT_BUDGETS, DEFAULT_LIMIT, DEFAULT_STRATEGIES, DEFAULT_TASKS, _rank, failure_reason, run_sweep
from .results import table


def _relaunch(argv: list[str], processes: int) -> int:
    """Run this same sweep under torchrun with `processes` processes (lmms-eval shards each cell's documents)."""
    import socket
    import subprocess

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--processes":
            skip = True
        elif not arg.startswith("--processes="):
            rest.append(arg)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    cmd += ["--master_port", str(port), "-m", "vtokprune.cli", "sweep", *rest]
    print("running: " + " ".join(cmd), file=sys.stderr)
    return subprocess.call(cmd)


def main(argv: list[str] | None = None) -> int:
    from ..cli import parse_sets, strategy_names

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
    parser.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="strategy parameter, repeatable: --set layer=3 (every strategy that has it) or --set fastv.layer=3",
    )
    parser.add_argument(
        "--match-compute",
        action="store_true",
        help="also run each pre-LLM strategy at the keep matching every in-LLM result's average visual tokens",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="lmms-eval backend: data-parallel processes on this machine (relaunches itself under torchrun)",
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = argv[1:] if argv[:1] == ["--"] else argv
    args = parser.parse_args(argv)
    names = strategy_names(args.strategies)
    params = parse_sets(args.set)
    if args.processes > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        if args.backend != "lmms-eval":
            raise ValueError("--processes needs --backend lmms-eval (lmms-eval shards the documents by rank)")
        return _relaunch(argv, args.processes)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    report = run_sweep(
        model=args.model,
        strategies=names,
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
        params=params,
        match_compute=args.match_compute,
    )
    if _rank() != 0:
        return 0
    print()
    print(table(report["cells"]))
    for check in report["checks"]:
        verdict = "passed" if check["passed"] else "FAILED"
        print(
            f"\nrandom-floor check ({check['task']}): random at {check['budget']} {100 * check['random']:.1f}% vs "
            f"unpruned {100 * check['unpruned']:.1f}% (drop {100 * check['drop']:.1f} points, needs >= "
            f"{100 * check['min_drop']:.0f} with separate 95% intervals): {verdict}"
        )
    print(f"\nwrote {report['results']}, {report['csv']}" + "".join(f", {p}" for p in report["plots"]))
    reason = failure_reason(report["cells"])
    if reason:
        print(f"vtokprune sweep: error: {reason}", file=sys.stderr)
        return 1
    return 0
