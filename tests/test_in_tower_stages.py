"""In-tower pruning in progressive stages (in_tower_layer=(l1, l2, ...)) and with the dropped patches fused into one
context token (in_tower_fuse=True): invariants, hand-computed references and errors, on the tiny LLaVA."""

from __future__ import annotations

import math

import pytest
import torch

import vtokprune
from vtokprune import get_strategy
from vtokprune.adapters.in_tower import stage_keeps
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


def _run(model, inputs, strategy, spy=False):
    seen = {}
    original = LlavaAdapter.call_pruned

    def record(self, forward, args, features):
        seen["features"] = features
        return original(self, forward, args, features)

    vtokprune.apply(model, strategy)
    if spy:
        LlavaAdapter.call_pruned = record
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
        return logits, vtokprune.last_selection(model), seen.get("features")
    finally:
        LlavaAdapter.call_pruned = original
        vtokprune.remove(model)


def _layers(model):
    tower = model.model.vision_tower
    return tower.vision_model.encoder.layers if hasattr(tower, "vision_model") else tower.encoder.layers


def _cls_attention(block, h):
    """Head-averaged [CLS] -> patch attention of a CLIP layer on input h [1, 1 + T, D], by hand."""
    attn = block.self_attn
    x = block.layer_norm1(h)
    heads, d = attn.num_heads, attn.head_dim
    q = attn.q_proj(x[:, :1]).view(1, 1, heads, d).transpose(1, 2)
    k = attn.k_proj(x).view(1, -1, heads, d).transpose(1, 2)
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return probs[0, :, 0, 1:].mean(dim=0)


def _top(scores, k):
    return torch.sort(torch.topk(scores, k).indices).values


def test_stage_keeps_geometric_path_ends_at_k():
    assert stage_keeps(36, 8, 1) == [8]
    assert stage_keeps(36, 8, 2) == [17, 8]
    assert stage_keeps(576, 64, 3) == [277, 133, 64]
    assert stage_keeps(10, 10, 3) == [10, 10, 10]
    keeps = stage_keeps(256, 28, 4)
    assert keeps == sorted(keeps, reverse=True) and keeps[-1] == 28 and keeps[0] < 256


@pytest.mark.parametrize("name", IN_TOWER)
@pytest.mark.parametrize("fuse", [False, True])
def test_keep_all_in_stages_is_bit_identical(model, inputs, name, fuse):
    with torch.no_grad():
        ref = model(**inputs).logits
    strategy = get_strategy(name, keep=image_tokens(model), in_tower_layer=(0, 1), in_tower_fuse=fuse)
    logits, sel, _ = _run(model, inputs, strategy)
    assert torch.equal(logits, ref)
    assert all(torch.equal(k.cpu(), torch.arange(image_tokens(model))) for k in sel.kept)


@pytest.mark.parametrize("name", IN_TOWER)
def test_stages_keep_exact_budgets_in_order(model, inputs, name):
    _, sel, _ = _run(model, inputs, get_strategy(name, keep=8, in_tower_layer=(0, 1), in_tower_fuse=True))
    for kept in sel.kept:
        assert kept.numel() == 8 and bool((kept[1:] > kept[:-1]).all()) and 0 <= int(kept.min()) <= int(kept.max()) < 36


def test_two_stages_match_a_manual_tower_run(model, inputs):
    """cls at stages (0, 1), keep 8 of 36: 17 patches by layer 0's [CLS] attention, then 8 of those by layer 1's
    (computed over [CLS] + the 17), and the LLM receives layer 2 run by hand on [CLS] + the 8."""
    _, sel, features = _run(model, inputs, get_strategy("cls", keep=8, in_tower_layer=(0, 1)), spy=True)
    layers = _layers(model)
    with torch.no_grad():
        hs = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
        for i, kept in enumerate(sel.kept):
            first = _top(_cls_attention(layers[0], hs[0][i : i + 1]), 17)
            h = torch.cat([hs[1][i : i + 1, :1], hs[1][i : i + 1, 1 + first]], dim=1)
            second = _top(_cls_attention(layers[1], h), 8)
            assert torch.equal(kept.cpu(), first[second])
            h = layers[1](h, None)
            h = layers[2](torch.cat([h[:, :1], h[:, 1 + second]], dim=1), None)
            expect = model.model.multi_modal_projector(h[:, 1:])[0]
            torch.testing.assert_close(features[i], expect, atol=1e-5, rtol=1e-5)


def test_fused_token_matches_a_manual_tower_run(model, inputs):
    """cls at layer 1 with fusion: the same kept patches as without; the later layers also see the mean of the
    dropped patches as one key with a log(dropped) bias; the LLM gets only the kept patches' features."""
    _, plain, plain_features = _run(model, inputs, get_strategy("cls", keep=8, in_tower_layer=1), spy=True)
    _, sel, features = _run(model, inputs, get_strategy("cls", keep=8, in_tower_layer=1, in_tower_fuse=True), spy=True)
    layers = _layers(model)
    with torch.no_grad():
        hs = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
        for i, kept in enumerate(sel.kept):
            assert torch.equal(kept, plain.kept[i])
            dropped = torch.ones(36, dtype=torch.bool)
            dropped[kept.cpu()] = False
            patches = hs[2][i, 1:]
            fused = patches[dropped].mean(dim=0)
            h = torch.cat([hs[2][i : i + 1, :1], patches[kept.cpu()][None], fused[None, None]], dim=1)
            bias = torch.zeros(1, 1, 1, h.shape[1])
            bias[..., -1] = math.log(28)
            h = layers[2](h, bias)
            expect = model.model.multi_modal_projector(h[:, 1:9])[0]
            torch.testing.assert_close(features[i], expect, atol=1e-5, rtol=1e-5)
            assert not torch.allclose(features[i], plain_features[i])


@pytest.mark.parametrize("fuse", [False, True])
def test_stages_batch_equals_single_and_generation_matches_stepwise(model, inputs, fuse):
    strategy = get_strategy("flowcut", keep=8, in_tower_layer=(0, 1), in_tower_fuse=fuse)
    logits, sel, _ = _run(model, inputs, strategy)
    for i in range(len(PROMPTS)):
        logits_one, sel_one, _ = _run(model, single(inputs, i, [1, 1]), strategy)
        assert torch.equal(sel.kept[i], sel_one.kept[0])
        torch.testing.assert_close(logits[i, -1], logits_one[0, -1], atol=1e-4, rtol=1e-4)
    vtokprune.apply(model, strategy)
    try:
        assert torch.equal(generate_new(model, inputs, 4), stepwise_greedy(model, inputs, 4))
    finally:
        vtokprune.remove(model)


def test_llava_next_fused_tiles_keep_budgets_and_batch_equals_single():
    from vtokprune.testing import llava_next_inputs, tiny_llava_next

    model = tiny_llava_next(seed=1, vision_layers=4)
    inputs = llava_next_inputs(model, PROMPTS, [[(28, 56)], [(40, 30), (28, 28)]], seed=2)
    with torch.no_grad():
        ref = model(**inputs).logits
    logits, _, _ = _run(model, inputs, get_strategy("cls", ratio=1.0, in_tower_layer=1, in_tower_fuse=True))
    assert torch.equal(logits, ref)
    strategy = get_strategy("cls", keep=6, in_tower_layer=1, in_tower_fuse=True)
    logits, sel, _ = _run(model, inputs, strategy)
    assert [int(k.numel()) for k in sel.kept] == [6, 6, 6]
    _, plain, _ = _run(model, inputs, get_strategy("cls", keep=6, in_tower_layer=1))
    assert all(torch.equal(a, b) for a, b in zip(sel.kept, plain.kept))
    one = {k: inputs[k][0][inputs["attention_mask"][0].bool()][None] for k in ("input_ids", "attention_mask")}
    one["pixel_values"], one["image_sizes"] = inputs["pixel_values"][:1], inputs["image_sizes"][:1]
    logits_one, sel_one, _ = _run(model, one, strategy)
    assert torch.equal(sel.kept[0], sel_one.kept[0])
    torch.testing.assert_close(logits[0, -1], logits_one[0, -1], atol=1e-4, rtol=1e-4)
    with pytest.raises(CapabilityError, match="progressive in-tower stages work on LLaVA-1.5"):
        vtokprune.apply(model, get_strategy("cls", keep=6, in_tower_layer=(0, 1)))
    assert not vtokprune.is_pruned(model)


def test_stage_and_fuse_errors(model):
    with pytest.raises(CapabilityError, match="strictly increasing"):
        vtokprune.apply(model, get_strategy("cls", keep=4, in_tower_layer=(1, 0)))
    with pytest.raises(CapabilityError, match="before the feature layer"):
        vtokprune.apply(model, get_strategy("cls", keep=4, in_tower_layer=(0, 2)))
    assert not vtokprune.is_pruned(model)
    with pytest.raises(BudgetError, match="needs in_tower_layer"):
        get_strategy("cls", keep=4, in_tower_fuse=True)
    with pytest.raises(BudgetError, match="in_tower_fuse must be True or False"):
        get_strategy("cls", keep=4, in_tower_layer=1, in_tower_fuse="yes")
    with pytest.raises(BudgetError, match="tuple of them"):
        get_strategy("cls", keep=4, in_tower_layer=())
    with pytest.raises(BudgetError, match="tuple of them"):
        get_strategy("cls", keep=4, in_tower_layer=(1, 2.0))
    assert get_strategy("cls", keep=4, in_tower_layer=[0, 1]).in_tower_layer == (0, 1)
