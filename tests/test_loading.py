"""Real-model loading goes through the same code as `llava-hf/...` ids: AutoModelForImageTextToText, safetensors."""

from __future__ import annotations

import pytest
import torch

import vtokprune
from vtokprune.loading import load_pretrained
from vtokprune.tiny import (
    internvl_inputs,
    llava_inputs,
    llava_next_inputs,
    qwen_inputs,
    tiny_internvl,
    tiny_llava,
    tiny_llava_next,
    tiny_qwen2_vl,
)

FAMILIES = {
    "llava": (lambda: tiny_llava(seed=0), lambda m: llava_inputs(m, [[5, 6, 7]])),
    "llava_next": (lambda: tiny_llava_next(seed=0), lambda m: llava_next_inputs(m, [[5, 6, 7]], [[(28, 56)]])),
    "qwen2_vl": (lambda: tiny_qwen2_vl(seed=0, version="2"), lambda m: qwen_inputs(m, [[5, 6, 7]], [[(1, 8, 8)]])),
    "qwen2_5_vl": (
        lambda: tiny_qwen2_vl(seed=0, version="2.5"),
        lambda m: qwen_inputs(m, [[5, 6, 7]], [[(1, 8, 8)]]),
    ),
    "internvl": (lambda: tiny_internvl(seed=0), lambda m: internvl_inputs(m, [[5, 6, 7]], [[2]])),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_saved_checkpoint_loads_and_prunes(tmp_path, family):
    build, make_inputs = FAMILIES[family]
    original = build()
    original.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    model, processor, description = load_pretrained(str(tmp_path), dtype=torch.float32, processor=False)
    assert processor is None and family in description
    assert model.config.model_type == family
    inputs = make_inputs(model)
    with torch.no_grad():
        reference = original(**inputs).logits
        assert torch.equal(model(**inputs).logits, reference)
        with vtokprune.pruned(model, "random", ratio=0.5):
            out = model(**inputs).logits
            assert vtokprune.last_selection(model) is not None
    assert out.shape[1] < reference.shape[1]
