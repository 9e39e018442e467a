"""Pruning inside the vision tower (adapters/in_tower.py) on the tiny LLaVA: invariants and capability errors."""

from __future__ import annotations

import pytest
import torch

import vtokprune
from vtokprune import get_strategy
from vtokprune.adapters.llava import LlavaAdapter
from vtokprune.errors import BudgetError, CapabilityError
from vtokprune.testing import image_tokens, llava_inputs, tiny_llava

from .helpers import generate_new, single, stepwise_greedy

IN_TOWER = ["cls", "cls_multilayer", "visionzip", "holov", "flowcut"]
PROMPTS = [[7, 8, 9, 10], [11, 12]]


@pytest.fixture(scope="module")
def model():
    return tiny_llava(seed=3, image_size=84, vision_layers=4)  # 36 patches, features from layer 2 (of 0..3)


@pytest.fixture(scope="module")
def inputs(model):
    return llava_inputs(model, PROMPTS, images=1, seed=5)


def _run(model, inputs, strategy):
    vtokprune.apply(model, strategy)
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
        return logits, vtokprune.last_selection(model)
    finally:
        vtokprune.remove(model)


@pytest.mark.parametrize("name", IN_TOWER)
def test_keep_all_in_tower_is_bit_identical_to_unpruned(model, inputs, name):
    with torch.no_grad():
        ref = model(**inputs).logits
    logits, sel = _run(model, inputs, get_strategy(name, keep=image_tokens(model), in_tower_layer=1))
    assert torch.equal(logits, ref)
    assert all(torch.equal(k.cpu(), torch.arange(image_tokens(model))) for k in sel.kept)


def test_in_tower_selection_and_features_match_a_manual_tower_run(model, inputs):
    """cls at in_tower_layer=1: the kept indices are the top-k of layer 1's [CLS] attention, and the LLM receives the
    projector applied to layers 2.. run by hand on [CLS] + those patches (with their original position embeddings)."""
    layer, k = 1, 9
    seen = {}
    original = LlavaAdapter.call_pruned

    def spy(self, forward, args, features):
        seen["features"] = features
        return original(self, forward, args, features)

    # Post-tower cls on the same weights with the features taken right after layer 1 ranks by the same attention.
    with torch.no_grad():
        post = model.config.vision_feature_layer
        model.config.vision_feature_layer = layer + 1
        try:
            _, sel_post = _run(model, inputs, get_strategy("cls", keep=k))
        finally:
            model.config.vision_feature_layer = post
        vtokprune.apply(model, get_strategy("cls", keep=k, in_tower_layer=layer))
        LlavaAdapter.call_pruned = spy
        try:
            model(**inputs)
            sel = vtokprune.last_selection(model)
        finally:
            LlavaAdapter.call_pruned = original
            vtokprune.remove(model)
        for a, b in zip(sel.kept, sel_post.kept):
            assert torch.equal(a, b)
        tower = model.model.vision_tower
        hs = tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
        for i, kept in enumerate(sel.kept):
            h = torch.cat([hs[layer + 1][i : i + 1, :1], hs[layer + 1][i : i + 1, 1 + kept]], dim=1)
            for blk in (
                tower.vision_model.encoder.layers[layer + 1 : 3]
                if hasattr(tower, "vision_model")
                else (tower.encoder.layers[layer + 1 : 3])
            ):
                h = blk(h, None)
            expect = model.model.multi_modal_projector(h[:, 1:])[0]
            torch.testing.assert_close(seen["features"][i], expect, atol=1e-5, rtol=1e-5)
            assert not torch.equal(seen["features"][i], torch.zeros_like(expect))


@pytest.mark.parametrize("name", ["cls", "visionzip", "flowcut"])
def test_in_tower_batch_equals_single(model, inputs, name):
    strategy = get_strategy(name, keep=8, in_tower_layer=1)
    logits, sel = _run(model, inputs, strategy)
    for i in range(len(PROMPTS)):
        one = single(inputs, i, [1, 1])
        logits_one, sel_one = _run(model, one, strategy)
        assert torch.equal(sel.kept[i], sel_one.kept[0])
        torch.testing.assert_close(logits[i, -1], logits_one[0, -1], atol=1e-4, rtol=1e-4)


def test_in_tower_generation_with_cache_matches_stepwise(model, inputs):
    vtokprune.apply(model, get_strategy("cls", keep=8, in_tower_layer=0))
    try:
        gen = generate_new(model, inputs, 4)
        step = stepwise_greedy(model, inputs, 4)
    finally:
        vtokprune.remove(model)
    assert torch.equal(gen, step)


def test_in_tower_differs_from_post_tower_and_is_cheaper_in_the_tower(model, inputs):
    """Same budget: the kept tokens' features differ (later layers never saw the dropped ones)."""
    post, _ = _run(model, inputs, get_strategy("cls", keep=8))
    inside, _ = _run(model, inputs, get_strategy("cls", keep=8, in_tower_layer=0))
    assert post.shape == inside.shape
    assert not torch.allclose(post, inside)


def test_in_tower_capability_errors(model):
    with pytest.raises(CapabilityError, match="in_tower_layer"):
        get_strategy("divprune", keep=4, in_tower_layer=1)  # no [CLS] signal to select with
    with pytest.raises(BudgetError, match="in_tower_layer"):
        get_strategy("cls", keep=4, in_tower_layer=1.5)
    for layer in (2, 3, -1):  # at or after the feature layer (2): nothing would be pruned inside the tower
        with pytest.raises(CapabilityError, match="before the feature layer"):
            vtokprune.apply(model, get_strategy("cls", keep=4, in_tower_layer=layer))
    assert not vtokprune.is_pruned(model)


def test_in_tower_refused_on_qwen_and_served_on_internvl():
    from vtokprune.testing import internvl_inputs, tiny_internvl, tiny_qwen2_vl

    m = tiny_qwen2_vl()
    with pytest.raises(CapabilityError, match="no \\[CLS\\]"):
        vtokprune.apply(m, get_strategy("cls", keep=4, in_tower_layer=0))
    assert not vtokprune.is_pruned(m)
    m = tiny_internvl()  # in detail: tests/test_in_tower_internvl.py
    inputs = internvl_inputs(m, PROMPTS, [[2], [1]])
    _, sel = _run(m, inputs, get_strategy("cls", keep=4, in_tower_layer=0))
    assert [int(k.numel()) for k in sel.kept] == [4, 4]


# ---------------------------------------------------------------------------------------------- LLaVA-NeXT, per tile

NEXT_SIZES = [[(28, 56)], [(40, 30), (28, 28)]]  # crops + unpadding; a second sample with two images


@pytest.fixture(scope="module")
def next_model():
    from vtokprune.testing import tiny_llava_next

    return tiny_llava_next(seed=1, vision_layers=4)  # features from layer 2 (of 0..3)


@pytest.fixture(scope="module")
def next_inputs(next_model):
    from vtokprune.testing import llava_next_inputs

    return llava_next_inputs(next_model, PROMPTS, NEXT_SIZES, seed=2)


@pytest.mark.parametrize("name", ["cls", "visionzip"])
def test_next_keep_all_is_bit_identical_and_budgets_exact(next_model, next_inputs, name):
    with torch.no_grad():
        ref = next_model(**next_inputs).logits
    logits, sel = _run(next_model, next_inputs, get_strategy(name, ratio=1.0, in_tower_layer=1))
    assert torch.equal(logits, ref)
    _, sel = _run(next_model, next_inputs, get_strategy(name, keep=7, in_tower_layer=0))
    assert [int(k.numel()) for k in sel.kept] == [7, 7, 7]
    for kept, available in zip(sel.kept, sel.available):
        assert bool((kept[1:] > kept[:-1]).all()) and int(kept.min()) >= 0 and int(kept.max()) < available


def test_next_batch_equals_single_and_generation_matches_stepwise(next_model, next_inputs):
    strategy = get_strategy("cls", keep=6, in_tower_layer=1)
    logits, sel = _run(next_model, next_inputs, strategy)
    one = {k: next_inputs[k][0][next_inputs["attention_mask"][0].bool()][None] for k in ("input_ids", "attention_mask")}
    one["pixel_values"], one["image_sizes"] = next_inputs["pixel_values"][:1], next_inputs["image_sizes"][:1]
    logits_one, sel_one = _run(next_model, one, strategy)
    assert torch.equal(sel.kept[0], sel_one.kept[0])
    torch.testing.assert_close(logits[0, -1], logits_one[0, -1], atol=1e-4, rtol=1e-4)
    vtokprune.apply(next_model, strategy)
    try:
        assert torch.equal(generate_new(next_model, next_inputs, 3), stepwise_greedy(next_model, next_inputs, 3))
    finally:
        vtokprune.remove(next_model)
