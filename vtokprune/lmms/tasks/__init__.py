"""Local lmms-eval tasks shipped with vtokprune: a synthetic, offline shape-world benchmark.

* ``vtokprune_toy``     -- open answers (one word), ``generate_until``, exact-match metric.
* ``vtokprune_toy_mc``  -- the same questions scored by log-likelihood over the answer vocabulary (``multiple_choice``).

Each task reads ``vtokprune_toy/toy_test.jsonl`` (its test split, the one lmms-eval evaluates): one row per (scene
seed, question, answer), regenerated deterministically by :func:`generate` from :mod:`vtokprune.toyworld` (held-out
seeds, never seen in training). ``toy_validation.jsonl`` is the validation split, toy-world validation scenes (seeds
from ``VAL_BASE``, below the held-out base): what ``vtokprune search --calibration lmms:vtokprune_toy`` calibrates
on. lmms-eval evaluates a task's test split whenever it declares one, so the validation split never changes the
benchmark's numbers. Images are rendered from the seed when a document is read, so the data files stay small.

Point lmms-eval at this directory with ``--include_path "$(python -m vtokprune.lmms.tasks)"``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TASKS_DIR = Path(__file__).resolve().parent
TOY_DIR = TASKS_DIR / "vtokprune_toy"
DATA_FILE = TOY_DIR / "toy_test.jsonl"
VALIDATION_FILE = TOY_DIR / "toy_validation.jsonl"
DEFAULT_SIZE = 300
VALIDATION_SIZE = 200
TASK_NAMES = ("vtokprune_toy", "vtokprune_toy_mc")


def path() -> str:
    """The directory to pass to lmms-eval's ``--include_path``."""
    return str(TASKS_DIR)


def rows(n: int = DEFAULT_SIZE, split: str = "test") -> list[dict[str, Any]]:
    """A split's rows, deterministic: the first `n` questions of the toy world's held-out ("test") or validation
    ("validation") split."""
    from vtokprune.toyworld import heldout, validation

    samples = {"test": heldout, "validation": validation}[split](n)
    return [
        {"id": i, "seed": s.scene.seed, "question": s.qa.question, "answer": s.qa.answer, "kind": s.qa.kind}
        for i, s in enumerate(samples)
    ]


def generate(path: str | Path = DATA_FILE, n: int = DEFAULT_SIZE, split: str = "test") -> Path:
    """(Re)write a split's JSONL data file; the same bytes every time."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows(n, split)))
    return out


def generate_all() -> list[Path]:
    """Rewrite both shipped data files (test, validation)."""
    return [generate(), generate(VALIDATION_FILE, VALIDATION_SIZE, "validation")]


def load_docs(task: str = "vtokprune_toy", limit: int | None = None) -> list[dict[str, Any]]:
    """The task's documents without lmms-eval (the in-process sweep uses this)."""
    if task not in TASK_NAMES:
        raise ValueError(f"unknown local task {task!r}; available: {', '.join(TASK_NAMES)}")
    if not DATA_FILE.exists():
        generate()
    docs = [json.loads(line) for line in DATA_FILE.read_text().splitlines() if line.strip()]
    return docs[:limit] if limit is not None else docs
