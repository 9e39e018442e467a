"""The `vtokprune` command line: `info`, `run` (compare strategies on one model), and the project's tools."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

from . import __version__
from .errors import VTokPruneError


def _info(_: argparse.Namespace) -> int:
    import platform

    import torch
    import transformers

    from .adapters import ADAPTERS
    from .registry import available_strategies

    print(f"vtokprune {__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"cuda: {torch.cuda.is_available()}")
    try:
        import triton  # type: ignore[import-not-found]

        print(f"triton {triton.__version__}")
    except Exception:
        print("triton: not installed (pip install 'vtokprune[triton]')")
    print("\nstrategies:")
    for name, cls in available_strategies().items():
        print(f"  {name:<16} {cls.acts:<7} {cls.paper}")
    print("\nadapters (model_type -> family, example):")
    for model_type, adapter in sorted(ADAPTERS.items()):
        print(f"  {model_type:<16} {adapter.family:<14} {adapter.example_model}")
    return 0


def load_model(name: str | None) -> tuple[Any, Any, str]:
    """(model, processor or None, description). None = the embedded default model, no download."""
    from .embedded import load_default

    if name in (None, "", "default", "embedded"):
        return load_default()
    from .loading import load_pretrained

    return load_pretrained(name)


def _run(args: argparse.Namespace) -> int:
    import torch
    from transformers.utils import logging as hf_logging

    from . import api
    from .embedded import example_inputs
    from .registry import get_strategy

    hf_logging.disable_progress_bar()
    model, processor, description = load_model(args.model)
    inputs, question, expected = example_inputs(model, processor, args.image, args.question)
    names = [s.strip() for s in args.strategies.split(",") if s.strip()]
    print(f"model: {description}")
    if question:
        print(f"question: {question}" + (f"  (scene's answer: {expected})" if expected else ""))
    rows = []
    with torch.inference_mode():
        start = time.perf_counter()
        reference = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        base_ms = (time.perf_counter() - start) * 1e3
        rows.append(("none (unpruned)", "-", _answer(processor, reference, inputs), base_ms))
        for name in names:
            budget = {"keep": args.keep} if args.keep is not None else {"ratio": args.ratio}
            strategy = get_strategy(name, **budget) if name != "none" else get_strategy("none")
            with api.pruned(model, strategy):
                start = time.perf_counter()
                out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
                ms = (time.perf_counter() - start) * 1e3
                sel = api.last_selection(model)
            kept = "-" if sel is None else f"{sum(len(k) for k in sel.kept)}/{sum(sel.available)}"
            rows.append((name, kept, _answer(processor, out, inputs), ms))
    width = max(len(r[0]) for r in rows)
    print(f"\n{'strategy':<{width}}  {'kept':>9}  {'generate ms':>11}  answer")
    for name, kept, answer, ms in rows:
        print(f"{name:<{width}}  {kept:>9}  {ms:>11.1f}  {answer}")
    return 0


def _answer(processor: Any, out: Any, inputs: dict) -> str:
    new = out[:, inputs["input_ids"].shape[1] :]
    if processor is None:
        return " ".join(str(t) for t in new[0].tolist())
    return str(processor.batch_decode(new, skip_special_tokens=True)[0]).strip()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vtokprune", description="Visual token pruning for VLMs.")
    parser.add_argument("--version", action="version", version=f"vtokprune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="strategies, adapters and versions").set_defaults(func=_info)
    run = sub.add_parser("run", help="answer one question with several strategies side by side")
    run.add_argument("--model", default=None, help="HF model id or local path (default: the embedded model)")
    run.add_argument("--strategies", default="cls,fastv,random,pool", help="comma-separated strategy names")
    run.add_argument("--keep", type=int, default=None, help="visual tokens kept per image (overrides --ratio)")
    run.add_argument("--ratio", type=float, default=64 / 576, help="fraction of visual tokens kept (default 64/576)")
    run.add_argument("--image", default=None, help="image file (default: a generated scene)")
    run.add_argument("--question", default=None)
    run.add_argument("--max-new-tokens", type=int, default=8)
    run.set_defaults(func=_run)
    _add_optional_commands(sub)
    return parser


def _add_optional_commands(sub: Any) -> None:
    """Commands whose code lives in optional modules; registered only when those modules exist."""
    from .cli_extra import register

    register(sub)


def main(argv: Sequence[str] | None = None) -> int:
    from .cli_extra import COMMANDS, run_command

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in COMMANDS:  # optional commands parse their own options
            return run_command(argv[0], argv[1:])
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except (VTokPruneError, FileNotFoundError, OSError, ValueError) as e:
        print(f"vtokprune: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
