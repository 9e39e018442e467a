"""The `vtokprune` subcommands whose code lives in other modules (toy world, sweeps, search, demo): name -> (module,
function, help). Each parses its own argv; the module is imported only when its command runs."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

# command -> (module, function taking argv, help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train-toy": ("vtokprune.toyworld.cli", "train_main", "train the embedded toy LLaVA model"),
    "bench-toy": ("vtokprune.toyworld.cli", "bench_main", "accuracy of strategies x budgets on the toy world"),
    "sweep": ("vtokprune.sweep", "main", "strategies x budgets x tasks (resumable): JSON, CSV and plots"),
    "search": ("vtokprune.search.cli", "main", "search a per-layer visual-token schedule (G-Search, P-Sigmoid)"),
    "train-budget": ("vtokprune.search.train_heads", "main", "train a DyVTE exit head or an ATP ratio head"),
    "demo": ("vtokprune.demo", "main", "Gradio app: compare what each strategy keeps, side by side (needs [demo])"),
}


def register(sub: Any) -> None:
    """List the commands in `vtokprune --help`; `cli.main` dispatches them before argparse sees their options."""
    for name, (_, _, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)


def run_command(name: str, argv: Sequence[str]) -> int:
    module, function, _ = COMMANDS[name]
    fn = getattr(importlib.import_module(module), function)
    return int(fn(list(argv)) or 0)
