"""Calibration data and the one evaluation every search runs: the model's next-token answers, pruned or not.

The interface is deliberately small, so it works with whichever benchmark model ships:

* :class:`Calibration`: prepared input batches (left-padded: the last position is each prompt's last token) and,
  optionally, the right answer's first token id per sample;
* :func:`predict`: the greedy first answer token of every sample under a strategy (what ``generate`` with
  ``max_new_tokens=1`` returns), from one forward pass per batch;
* :func:`score`: agreement with the unpruned model's answers (no labels needed) and accuracy (when labels exist).

:func:`toy_calibration` builds one from the toy world's TRAINING split (scene seeds below the held-out base), never
from the held-out questions the benchmark reports; :func:`vtokprune.search.lmms_tasks.lmms_calibration` builds
one from an lmms-eval task's training or validation split, never from the split lmms-eval evaluates.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import BudgetError


@dataclass
class Calibration:
    batches: list[dict[str, torch.Tensor]]
    labels: list[int] | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if not self.batches or not any(len(b["input_ids"]) for b in self.batches):
            raise BudgetError("calibration set is empty; use at least one sample (--samples N)")
        if self.labels is not None and len(self.labels) != self.size:
            raise BudgetError(f"calibration: {len(self.labels)} labels for {self.size} samples")

    @property
    def size(self) -> int:
        return sum(len(b["input_ids"]) for b in self.batches)

    def visual_and_text_tokens(self, image_token_id: int) -> tuple[int, int]:
        """(visual tokens per image, mean text tokens per sample) of the first sample with an image."""
        ids, mask = self.batches[0]["input_ids"], self.batches[0]["attention_mask"]
        real = mask[0].bool()
        visual = int((ids[0][real] == image_token_id).sum())
        text = round(float(((ids != image_token_id) & mask.bool()).sum(dim=1).float().mean()))
        return visual, text


@torch.inference_mode()
def predict(model: Any, calibration: Calibration, strategy: Any = None) -> list[int]:
    """Greedy next-token id of every sample (unpruned when `strategy` is None)."""
    from ..api import pruned

    out: list[int] = []
    with nullcontext() if strategy is None else pruned(model, strategy):
        for batch in calibration.batches:
            logits = model(**batch).logits[:, -1]
            out.extend(int(i) for i in logits.argmax(dim=-1).tolist())
    return out


def score(predictions: list[int], reference: list[int], labels: list[int] | None) -> dict[str, float]:
    """{"agreement": share equal to the unpruned answers, "accuracy": share equal to the labels (if any)}."""
    n = len(predictions)
    out = {"agreement": sum(p == r for p, r in zip(predictions, reference)) / n}
    if labels is not None:
        out["accuracy"] = sum(p == y for p, y in zip(predictions, labels)) / n
    return out


def first_token_id(tokenizer: Any, answer: str) -> int | None:
    """The first token of `answer` (no special tokens): what a right greedy answer starts with; None if empty."""
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    return int(ids[0]) if ids else None


def toy_calibration(
    processor: Any, samples: int = 64, seed: int = 0, batch: int = 16, dtype: Any = None
) -> Calibration:
    """`samples` questions on toy-world TRAINING scenes (seeds drawn with `seed`, all below the held-out base)."""
    import numpy as np

    from ..embedded import build_prompt
    from ..toyworld import make_questions, make_scene, render

    try:
        from ..toyworld.scenes import HELDOUT_BASE
    except ImportError:  # pragma: no cover - the constant moved
        HELDOUT_BASE = 1_000_000_000
    if samples < 1:
        raise BudgetError(f"calibration samples must be >= 1, got {samples}")
    rng = np.random.default_rng([seed, 18])
    tokenizer = processor.tokenizer
    pairs: list[tuple[Any, str, str]] = []
    while len(pairs) < samples:
        scene_seed = int(rng.integers(0, HELDOUT_BASE))
        assert scene_seed < HELDOUT_BASE
        scene = make_scene(scene_seed)
        qs = make_questions(scene, 1, seed=scene_seed)
        if qs:
            pairs.append((scene, qs[0].question, qs[0].answer))
    batches: list[dict[str, torch.Tensor]] = []
    labels: list[int] = []
    side = getattr(tokenizer, "padding_side", "left")
    tokenizer.padding_side = "left"  # the last position must be each prompt's last token
    try:
        for i in range(0, samples, batch):
            chunk = pairs[i : i + batch]
            inputs = processor(
                images=[render(s) for s, _, _ in chunk],
                text=[build_prompt(processor, q) for _, q, _ in chunk],
                return_tensors="pt",
                padding=True,
            )
            inputs = dict(inputs)
            if dtype is not None and "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
            batches.append(inputs)
            labels.extend(int(tokenizer(a, add_special_tokens=False)["input_ids"][0]) for _, _, a in chunk)
    finally:
        tokenizer.padding_side = side
    return Calibration(batches, labels, f"toy world training split: {samples} questions, seed {seed}")
