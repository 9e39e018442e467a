"""A procedurally generated shape world and a small LLaVA (frozen DINOv2-small tower) trained on it: an offline
benchmark of how much question evidence visual-token pruning keeps."""

from .model import answer, build_model, build_processor, build_tokenizer, load, prompt
from .scenes import (
    QA,
    QUESTION_TYPES,
    Sample,
    Scene,
    answer_question,
    evidence_cover,
    heldout,
    make_questions,
    make_scene,
    patch_labels,
    render,
    validation,
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
    "evidence_cover",
    "heldout",
    "load",
    "make_questions",
    "make_scene",
    "patch_labels",
    "prompt",
    "render",
    "validation",
]
