"""Calibration sets from lmms-eval tasks (``vtokprune search --calibration lmms:<task>``).

A task's documents become a :class:`~vtokprune.search.calibration.Calibration` the way vtokprune's lmms-eval model
sees them: the zero-shot context lmms-eval builds (``fewshot_context``: description + ``doc_to_text``), the images of
``doc_to_visual``, the engine's chat prompt and left padding (:meth:`vtokprune.lmms.engine.Engine.inputs`). Labels:
the first token of ``doc_to_target`` for ``generate_until`` tasks with string targets; otherwise none, and the search
scores agreement with the unpruned model.

Held-out rule: a search is model selection, so it never sees the split lmms-eval evaluates (``test_split``, or
``validation_split`` when a task has no test split). Documents come from the task's training split if it declares
one, else its validation split; a task with neither besides the evaluated one is refused (no override). Most stock
lmms-eval tasks declare only a test split: give such a benchmark a YAML of your own whose ``validation_split`` (or
``training_split``) names a split of its dataset that is not evaluated, and pass its directory as ``include_path``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from ..errors import BudgetError, VTokPruneError
from .calibration import Calibration, first_token_id

_MANAGERS: dict[tuple[str, ...], Any] = {}


@contextmanager
def _quiet() -> Iterator[None]:
    """No lmms-eval log lines (loguru) or datasets progress bars while tasks are indexed and loaded."""
    import datasets
    from loguru import logger

    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    logger.disable("lmms_eval")
    try:
        yield
    finally:
        logger.enable("lmms_eval")
        if bars:
            datasets.enable_progress_bars()


def task_manager(include_path: str | Sequence[str] | None = None) -> Any:
    """lmms-eval's task index with vtokprune's local tasks (and `include_path`'s), as ``lmms-eval --model vtokprune``
    builds it (same model name, so the same model-specific prompt arguments); built once per set of paths."""
    try:
        from lmms_eval.tasks import TaskManager
    except ImportError:
        raise VTokPruneError(
            "lmms-eval tasks as calibration sets need lmms-eval: pip install 'vtokprune[lmms-eval]'"
        ) from None
    from ..lmms import MODEL_NAME, tasks_path

    extra = [include_path] if isinstance(include_path, str) else list(include_path or [])
    paths = (tasks_path(), *map(str, extra))
    if paths not in _MANAGERS:
        with _quiet():
            _MANAGERS[paths] = TaskManager("WARNING", include_path=list(paths), model_name=MODEL_NAME)
    return _MANAGERS[paths]


def choose_split(
    task: str, training: str | None, validation: str | None, test: str | None, split: str | None = None
) -> str:
    """The split to calibrate on: `split` if given, else the training split, else the validation split; never the one
    lmms-eval evaluates (the test split, or the validation split of a task without one)."""
    evaluated = test or validation
    allowed = [s for s in (training, validation) if s and s != evaluated]
    if split is not None and split not in allowed:
        raise VTokPruneError(
            f"lmms-eval task {task!r}: cannot calibrate on split {split!r}; "
            + (f"use {' or '.join(map(repr, allowed))}" if allowed else _fix(task, test, validation))
        )
    if not allowed:
        raise VTokPruneError(_fix(task, test, validation))
    return split or allowed[0]


def _fix(task: str, test: str | None, validation: str | None) -> str:
    if not (test or validation):
        return f"lmms-eval task {task!r} declares no training, validation or test split"
    which = f"test split {test!r}" if test else f"validation split {validation!r} (it has no test split)"
    return (
        f"lmms-eval task {task!r}: refusing to calibrate on its {which}: lmms-eval evaluates that split, and a search "
        "is model selection, which never sees held-out data; the task declares no other training or validation "
        "split. Fix: use a task with a training_split or validation_split besides the split it evaluates (e.g. your "
        "own copy of its YAML whose validation_split names an unevaluated split of the dataset, added with "
        "--include-path), or build a vtokprune.search.Calibration in Python"
    )


def calibration_split(
    task: str, include_path: str | Sequence[str] | None = None, split: str | None = None
) -> str | None:
    """The split :func:`lmms_calibration` would draw from, read from the task's YAML without loading any data (None:
    a Python task class, decided when it loads): raises for an unknown task, a group or tag, or a task with nothing
    but its evaluated split."""
    manager = task_manager(include_path)
    if task not in manager.all_tasks:
        close = difflib.get_close_matches(task, manager.all_tasks, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise VTokPruneError(f"unknown lmms-eval task {task!r}{hint} (your own tasks: --include-path DIR)")
    kind = manager.task_index[task]["type"]
    if kind not in ("task", "python_task"):
        raise VTokPruneError(f"{task!r} is an lmms-eval {kind}, not one task; name one of its tasks")
    with _quiet():
        config = manager._get_config(task)  # the YAML, includes resolved
    if "class" in config and not any(k in config for k in ("training_split", "validation_split", "test_split")):
        return None  # a Python task class declares its splits itself
    return choose_split(
        task, config.get("training_split"), config.get("validation_split"), config.get("test_split"), split
    )


def load_task(task: str, include_path: str | Sequence[str] | None = None) -> Any:
    """The lmms-eval task object (its dataset loaded)."""
    calibration_split(task, include_path)  # unknown names and groups fail before any data loads
    from lmms_eval.tasks import get_task_dict

    with _quiet():
        loaded = get_task_dict([task], task_manager(include_path))
    return loaded[task]


def lmms_calibration(
    task: str,
    model: Any,
    processor: Any,
    samples: int = 64,
    seed: int = 0,
    batch: int = 16,
    split: str | None = None,
    include_path: str | Sequence[str] | None = None,
    system_prompt: str | None = None,
) -> Calibration:
    """`samples` one-image documents of lmms-eval task `task`'s training (else validation) split, drawn with `seed`,
    as `model`'s left-padded input batches of `batch` (on the model's device and dtype); see the module docstring."""
    import numpy as np

    from ..lmms.engine import Engine, images_of

    if samples < 1 or batch < 1:
        raise BudgetError(f"calibration needs samples >= 1 and batch >= 1, got samples={samples}, batch={batch}")
    obj = load_task(task, include_path)
    cfg = obj.config
    name = choose_split(task, cfg.training_split, cfg.validation_split, cfg.test_split, split)
    docs = obj.training_docs() if name == cfg.training_split else obj.validation_docs()
    tokenizer = getattr(processor, "tokenizer", processor)
    texts: list[str] = []
    images: list[list[Any]] = []
    targets: list[Any] = []
    skipped = 0
    for i in np.random.default_rng([seed, 18]).permutation(len(docs)):
        if len(texts) == samples:
            break
        doc = docs[int(i)]
        try:
            visuals = images_of(obj.doc_to_visual(doc))
        except NotImplementedError as e:
            raise VTokPruneError(f"lmms-eval task {task!r}: {e}") from None
        if len(visuals) != 1:  # schedules count tokens per image; text-only documents prune nothing
            skipped += 1
            continue
        context = obj.fewshot_context(doc, 0)
        if not isinstance(context, str):
            raise VTokPruneError(f"lmms-eval task {task!r}: its prompt is a {type(context).__name__}, not a string")
        texts.append(context)
        images.append(visuals)
        targets.append(obj.doc_to_target(doc) if obj.OUTPUT_TYPE == "generate_until" else None)
    if len(texts) < samples:
        raise BudgetError(
            f"lmms-eval task {task!r}, {name} split: {len(texts)} documents with one image ({len(docs)} in all), "
            f"fewer than the {samples} asked for; use --samples {len(texts)} or fewer"
            if texts
            else f"lmms-eval task {task!r}, {name} split: no document has exactly one image; a visual-token search "
            "calibrates on one-image documents"
        )
    tokens = [first_token_id(tokenizer, t) if isinstance(t, str) and t.strip() else None for t in targets]
    labels = None if None in tokens else [int(t) for t in tokens if t is not None]
    side = getattr(tokenizer, "padding_side", "left")
    engine = Engine(model, processor, system_prompt=system_prompt)  # sets left padding: prompts end in the last column
    try:
        batches = [engine.inputs(texts[i : i + batch], images[i : i + batch]) for i in range(0, samples, batch)]
    finally:
        tokenizer.padding_side = side
    note = f", {skipped} skipped (not one image)" if skipped else ""
    return Calibration(
        batches, labels, f"lmms-eval task {task}, {name} split: {samples} of {len(docs)} documents{note}, seed {seed}"
    )
