"""[CLS] attention from CLIP, DINOv2 and SigLIP towers inside a LLaVA (tiny configs): layout, selection, errors."""

from __future__ import annotations

import copy

import pytest
import torch

import vtokprune
from vtokprune.adapters.vit_layout import block_attention, has_cls_token, vision_blocks
from vtokprune.testing import image_tokens, llava_inputs, tiny_llava, tiny_llava_dinov2

KEEP = 5


def reference_cls_topk(model, pixels: torch.Tensor, keep: int) -> list[int]:
    """Top-k patches by head-mean [CLS] attention of the layer that makes the features, from eager attentions."""
    tower = copy.deepcopy(model.model.vision_tower)
    tower.config._attn_implementation = "eager"
    for block in vision_blocks(tower):
        block_attention(block).config = tower.config
    with torch.no_grad():
        attentions = tower(pixel_values=pixels, output_attentions=True).attentions
    layer = len(attentions) + model.config.vision_feature_layer  # hidden_states[-2] is made by layer L-2
    scores = attentions[layer][0].mean(0)[0, 1:]
    return sorted(scores.topk(keep).indices.tolist())


@pytest.mark.parametrize("tower", ["clip", "dinov2"])
def test_cls_selection_matches_eager_attention(tower: str) -> None:
    model = tiny_llava(seed=0, tower=tower)
    inputs = llava_inputs(model, [[5, 6, 7]])
    with vtokprune.pruned(model, "cls", keep=KEEP):
        with torch.no_grad():
            model(**inputs)
        kept = vtokprune.last_selection(model).kept[0].tolist()
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2
    assert kept == reference_cls_topk(model, inputs["pixel_values"], KEEP)


def test_dinov2_layout() -> None:
    model = tiny_llava_dinov2(seed=0)
    tower = model.model.vision_tower
    assert has_cls_token(tower)
    assert len(vision_blocks(tower)) == model.config.vision_config.num_hidden_layers
    assert type(block_attention(vision_blocks(tower)[0])).__name__ == "Dinov2Attention"
    assert image_tokens(model) == 16


def test_siglip_has_no_cls_and_says_what_to_use() -> None:
    model = tiny_llava(seed=0, tower="siglip")
    assert not has_cls_token(model.model.vision_tower)
    with pytest.raises(vtokprune.CapabilityError, match="divprune"):
        vtokprune.apply(model, vtokprune.get_strategy("cls", keep=KEEP))
    inputs = llava_inputs(model, [[5, 6, 7]])
    with vtokprune.pruned(model, "divprune", keep=KEEP):  # a strategy without [CLS] runs
        with torch.no_grad():
            model(**inputs)
        assert len(vtokprune.last_selection(model).kept[0]) == KEEP


def test_unknown_tower_name_is_rejected() -> None:
    with pytest.raises(ValueError, match="siglip"):
        tiny_llava(seed=0, tower="convnext")
