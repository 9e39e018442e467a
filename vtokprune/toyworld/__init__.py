"""A procedurally generated shape world and a tiny LLaVA trained on it: an offline benchmark for visual token
pruning."""

from .model import answer, build_model, build_processor, build_tokenizer, load, prompt
from .scenes import (
    QA,
    QUESTION_TYPES,
    Sample,
    Scene,
    answer_question,
    heldout,
    make_questions,
    make_scene,
    patch_labels,
    render,
    scene_labels,
)

__all__ = [
    "QA",
    "QUESTION_TYPES",
    "Sample",
    "Scene",
    "answer",
    "answer_question",
    "build_model",
    "build_processor",
    "build_tokenizer",
    "heldout",
    "load",
    "make_questions",
    "make_scene",
    "patch_labels",
    "prompt",
    "render",
    "scene_labels",
]
