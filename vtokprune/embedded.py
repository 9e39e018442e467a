"""The embedded default model: the toy LLaVA (pretrained DINOv2-small tower, decoder trained on the toy world) shipped
with the package, else a tiny random LLaVA.

Either way nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TOY_DIR = Path(__file__).parent / "assets" / "toy-dinov2-llava"


def toy_checkpoint() -> Path | None:
    return TOY_DIR if (TOY_DIR / "config.json").exists() else None


def load_default() -> tuple[Any, Any, str]:
    path = toy_checkpoint()
    if path is not None:
        from .loading import load_pretrained

        model, processor, _ = load_pretrained(str(path), dtype="float32")
        return (
            model,
            processor,
            f"embedded toy LLaVA ({path.name}: DINOv2-small tower, decoder trained on the toy world)",
        )
    from .testing import tiny_llava

    return tiny_llava(seed=0), None, "embedded tiny random LLaVA (untrained; answers are token ids)"


def example_inputs(
    model: Any, processor: Any, image: str | None, question: str | None
) -> tuple[dict, str | None, str | None]:
    """Inputs for `vtokprune run`: an image file or a generated scene, the question, and the known answer (if any)."""
    expected = None
    if processor is None:
        from .testing import llava_inputs

        return llava_inputs(model, [[5, 6, 7, 8]]), None, None
    from PIL import Image

    if image is not None:
        with Image.open(image) as img:
            picture = img.convert("RGB")
        question = question or "What is in the image?"
    else:
        picture, default_question, answer = example_scene()
        expected = answer if question is None else None
        question = question or default_question
    prompt = build_prompt(processor, question)
    inputs = processor(images=picture, text=prompt, return_tensors="pt")
    return dict(inputs), question, expected


def build_prompt(processor: Any, question: str) -> str:
    template = getattr(processor, "chat_template", None)
    if template:
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return str(processor.apply_chat_template(conversation, add_generation_prompt=True))
    return f"USER: <image>\n{question} ASSISTANT:"


def example_scene(index: int = 0) -> tuple[Any, str, str]:
    """(image, question, answer) from the toy world's held-out split: what `vtokprune run` asks by default."""
    from .toyworld import heldout, render

    sample = heldout(index + 1)[index]
    return render(sample.scene), sample.qa.question, sample.qa.answer
