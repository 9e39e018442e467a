"""Document functions of the vtokprune_toy tasks (no lmms-eval import: the in-process sweep uses them too)."""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

POST_PROMPT = ""  # the toy model was trained on bare questions


@lru_cache(maxsize=64)
def _image(seed: int) -> Any:
    from vtokprune.toyworld import make_scene, render

    return render(make_scene(int(seed)))


def doc_to_visual(doc: dict[str, Any]) -> list[Any]:
    return [_image(int(doc["seed"])).copy()]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None) -> str:
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', POST_PROMPT)}"


def doc_to_target(doc: dict[str, Any]) -> str:
    return str(doc["answer"])


def doc_to_choice(doc: dict[str, Any]) -> list[str]:
    from vtokprune.toyworld.scenes import ANSWERS

    return list(ANSWERS)


def doc_to_choice_index(doc: dict[str, Any]) -> int:
    return doc_to_choice(doc).index(str(doc["answer"]))


def normalize(text: str) -> str:
    """Lower case, first word, punctuation dropped: 'Yes.' -> 'yes'."""
    words = re.sub(r"[^a-z0-9 ]", " ", str(text).lower()).split()
    return words[0] if words else ""


def exact_match(prediction: str, answer: str) -> float:
    return float(normalize(prediction) == normalize(answer))


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    return {"exact_match": exact_match(results[0] if results else "", doc["answer"])}
