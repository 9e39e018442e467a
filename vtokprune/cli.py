"""The `vtokprune` command line: `info`, `run` (compare strategies on one model), and the project's tools."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
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


DEFAULT_RATIO = 64 / 576


def parse_sets(items: Sequence[str] | None) -> dict[str, Any]:
    """`--set layer=3 --set fastv.layers=8,16` -> {"layer": 3, "fastv.layers": (8, 16)}; values are Python literals
    when they parse as one (numbers, tuples, True/None), else strings."""
    import ast

    params: dict[str, Any] = {}
    for item in items or ():
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise VTokPruneError(f"--set {item!r}: expected key=value (e.g. --set layer=3 or --set fastv.layer=3)")
        try:
            params[key] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            params[key] = text.strip()
    return params


def strategy_names(text: str, option: str = "--strategies") -> list[str]:
    names = [s.strip().lower() for s in str(text).split(",") if s.strip()]
    if not names:
        raise VTokPruneError(f"{option} {text!r} names no strategy; e.g. {option} cls,fastv (see `vtokprune info`)")
    return names


def check_strategy_name(name: str) -> None:
    """Unknown names fail with the registry's list plus the closest match."""
    import difflib

    from .errors import UnknownStrategyError
    from .registry import available_strategies

    key = name.strip().lower().replace("-", "_")
    known = available_strategies()
    if key in known:
        return
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise UnknownStrategyError(f"unknown strategy {name!r}{hint} (available: {', '.join(known)})")


def build_strategies(
    names: Sequence[str], budget: dict[str, Any], params: dict[str, Any] | None = None
) -> dict[str, Any]:
    """name -> Strategy, built with the API's own rules (so every error shows before any model loads).

    `params` from --set: `key` goes to every named strategy that has that field (at least one must), `name.key` to
    that strategy only. "none" takes no budget.
    """
    import dataclasses

    from .registry import available_strategies, get_strategy

    params = dict(params or {})
    for name in names:
        check_strategy_name(name)
    classes = {n: available_strategies()[n.replace("-", "_")] for n in names}
    fields = {n: {f.name for f in dataclasses.fields(c)} for n, c in classes.items()}
    for key in params:
        scope, dot, field = key.rpartition(".")
        if dot:
            if scope not in classes:
                raise VTokPruneError(f"--set {key}: {scope!r} is not one of the strategies run ({', '.join(names)})")
            if field not in fields[scope]:
                raise VTokPruneError(
                    f"--set {key}: strategy {scope!r} has no parameter {field!r}; it accepts: "
                    + ", ".join(sorted(fields[scope] - {"keep", "ratio"}))
                )
        elif field in ("keep", "ratio"):
            raise VTokPruneError(f"--set {key}: give the budget with --{field}")
        elif not any(field in f for f in fields.values()):
            raise VTokPruneError(
                f"--set {key}: none of {', '.join(names)} has a parameter {field!r}; parameters: "
                + "; ".join(f"{n}: {', '.join(sorted(f - {'keep', 'ratio'})) or '-'}" for n, f in fields.items())
            )
    strategies = {}
    for name in names:
        kwargs = {k: v for k, v in params.items() if "." not in k and k in fields[name]}
        kwargs.update({k.rpartition(".")[2]: v for k, v in params.items() if k.rpartition(".")[0] == name})
        if name != "none":
            kwargs.update(budget)
            strategies[name] = get_strategy(name, **kwargs).with_default_budget()
        else:
            strategies[name] = get_strategy(name, **kwargs)
    return strategies


def run_budget(keep: Any, ratio: Any) -> dict[str, Any]:
    """--keep / --ratio -> the strategy budget, checked like the API checks it (both given is an error)."""
    from .budget import validate_budget

    validate_budget(keep, ratio)
    if keep is not None:
        return {"keep": keep}
    return {"ratio": DEFAULT_RATIO if ratio is None else ratio}


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """No transformers/torch warnings or loading bars in the user's table (vtokprune's own warnings still show)."""
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    previous = logging.getLogger("torch").level
    logging.getLogger("torch").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"(transformers|torch|accelerate|huggingface_hub)(\.|$)")
        warnings.filterwarnings("ignore", message=r".*(deprecated|TypedStorage).*", category=FutureWarning)
        try:
            yield
        finally:
            hf_logging.set_verbosity(verbosity)
            hf_logging.enable_progress_bar()
            logging.getLogger("torch").setLevel(previous)


def _timed_generate(model: Any, inputs: dict, max_new_tokens: int, repeat: int) -> tuple[Any, float]:
    """(output, median ms over `repeat` calls after one warm-up call)."""
    import statistics

    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    times = []
    for _ in range(max(1, repeat)):
        start = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        times.append((time.perf_counter() - start) * 1e3)
    return out, statistics.median(times)


def _image_token_count(model: Any, inputs: dict) -> int | None:
    image_id = getattr(model.config, "image_token_id", None)
    ids = inputs.get("input_ids")
    if image_id is None or ids is None:
        return None
    return int((ids == image_id).sum())


def _run(args: argparse.Namespace) -> int:
    import torch

    from . import api
    from .embedded import example_inputs

    names = strategy_names(args.strategies)
    strategies = build_strategies(names, run_budget(args.keep, args.ratio), parse_sets(args.set))
    if args.repeat < 1:
        raise VTokPruneError(f"--repeat {args.repeat}: time at least one call")
    with quiet_libraries():
        model, processor, description = load_model(args.model)
        inputs, question, expected = example_inputs(model, processor, args.image, args.question)
        print(f"model: {description}")
        if question:
            print(f"question: {question}" + (f"  (scene's answer: {expected})" if expected else ""))
        available = _image_token_count(model, inputs)
        rows = []
        with torch.inference_mode():
            reference, base_ms = _timed_generate(model, inputs, args.max_new_tokens, args.repeat)
            full = "-" if available is None else f"{available}/{available}"
            per_layer = _per_layer(model, None, available)
            rows.append(("none (unpruned)", full, per_layer, _answer(processor, reference, inputs), base_ms))
            for name, strategy in strategies.items():
                with api.pruned(model, strategy):
                    out, ms = _timed_generate(model, inputs, args.max_new_tokens, args.repeat)
                    sel = api.last_selection(model)
                kept = "-" if sel is None else f"{sum(len(k) for k in sel.kept)}/{sum(sel.available)}"
                label = repr(strategy) if args.verbose else name
                per_layer = _per_layer(model, strategy, available)
                rows.append((label, kept, per_layer, _answer(processor, out, inputs), ms))
    width = max(len(r[0]) for r in rows)
    mark_col = expected is not None
    print(
        f"\n{'strategy':<{width}}  {'kept':>9}  {'per layer':>9}  {'generate ms':>11}  "
        + ("mark   " if mark_col else "")
        + "answer"
    )
    for name, kept, per_layer, answer, ms in rows:
        mark = ""
        if mark_col:
            mark = f"{'right' if _is_right(answer, expected) else 'wrong':<7}"
        print(f"{name:<{width}}  {kept:>9}  {per_layer:>9}  {ms:>11.1f}  {mark}{answer}")
    print(
        f"\n(kept: visual tokens kept / available, after the last stage for in-LLM strategies; per layer: visual "
        f"tokens averaged over decoder layers, the equal-compute count; generate ms: median of {args.repeat} calls "
        "after one warm-up)"
    )
    return 0


def _per_layer(model: Any, strategy: Any, available: int | None) -> str:
    from .compute import DecoderShape, average_visual_tokens

    if not available:
        return "-"
    try:
        layers = DecoderShape.from_config(model.config).num_layers
        return f"{average_visual_tokens(strategy, layers, available):.0f}"
    except (AttributeError, TypeError, ValueError, VTokPruneError):
        return "-"


def _answer(processor: Any, out: Any, inputs: dict) -> str:
    new = out[:, inputs["input_ids"].shape[1] :]
    if processor is None:
        return " ".join(str(t) for t in new[0].tolist())
    return str(processor.batch_decode(new, skip_special_tokens=True)[0]).strip()


def _is_right(answer: str, expected: str | None) -> bool:
    from .lmms.tasks.vtokprune_toy.utils import exact_match

    return expected is not None and bool(exact_match(answer, expected))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vtokprune", description="Visual token pruning for VLMs.")
    parser.add_argument("--version", action="version", version=f"vtokprune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="strategies, adapters and versions").set_defaults(func=_info)
    run = sub.add_parser("run", help="answer one question with several strategies side by side")
    run.add_argument("--model", default=None, help="HF model id or local path (default: the embedded model)")
    run.add_argument("--strategies", default="cls,fastv,random,pool", help="comma-separated strategy names")
    run.add_argument("--keep", type=int, default=None, help="visual tokens kept per image (not with --ratio)")
    run.add_argument("--ratio", type=float, default=None, help="fraction of visual tokens kept (default 64/576)")
    run.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="strategy parameter, repeatable: --set layer=3 (every strategy that has it) or --set fastv.layer=3",
    )
    run.add_argument("--repeat", type=int, default=3, help="timed generate calls per row, after one warm-up")
    run.add_argument("--verbose", action="store_true", help="name each row by its full strategy config")
    run.add_argument("--image", default=None, help="image file (default: a generated scene)")
    run.add_argument("--question", default=None)
    run.add_argument("--max-new-tokens", type=int, default=8)
    run.set_defaults(func=_run)
    _add_optional_commands(sub)
    return parser


def _add_optional_commands(sub: Any) -> None:
    """Commands whose code lives in optional modules; registered only when those modules exist."""
    from .cli_commands import register

    register(sub)


def main(argv: Sequence[str] | None = None) -> int:
    from .cli_commands import COMMANDS, run_command

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
