"""Registration of the CLI commands that belong to optional parts of the project (toy world, sweeps, demo)."""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

# command -> (module, function taking argv, help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train-toy": ("vtokprune.toyworld.cli", "train_main", "train the embedded toy LLaVA model"),
    "bench-toy": ("vtokprune.toyworld.cli", "bench_main", "accuracy of strategies x budgets on the toy world"),
    "sweep": ("vtokprune.sweep", "main", "strategies x budgets x tasks (resumable): JSON, CSV and plots"),
    "demo": ("vtokprune.demo", "main", "Gradio app: compare what each strategy keeps, side by side (needs [demo])"),
}


def register(sub: Any) -> None:
    for name, (module, function, help_text) in COMMANDS.items():
        if importlib.util.find_spec(module.rsplit(".", 1)[0]) is None:
            continue
        p = sub.add_parser(name, help=help_text, add_help=False)
        p.add_argument("argv", nargs="...")
        p.set_defaults(func=_delegate(module, function))


def _delegate(module: str, function: str) -> Any:
    def run(args: Any) -> int:
        fn = getattr(importlib.import_module(module), function)
        return int(fn(list(args.argv)) or 0)

    return run
