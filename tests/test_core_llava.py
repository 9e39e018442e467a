"""Invariants of the core API on tiny random LLaVA models (issue: core library)."""

from __future__ import annotations

import pytest
import torch

import vtokprune
from vtokprune.testing import image_tokens, llava_inputs, tiny_llava

from .helpers import generate_new, recompute_greedy, single, stepwise_greedy

STRATEGIES = {
    "cls": lambda k: vtokprune.CLSAttention(keep=k),
    "fastv": lambda k: vtokprune.FastV(keep=k, layer=2),
    "random": lambda k: vtokprune.RandomPrune(keep=k, seed=3),
    "pool": lambda k: vtokprune.Pool(keep=k),
}


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request):
    return tiny_llava(seed=0, attn_implementation=request.param)


@pytest.fixture(scope="module")
def sdpa_model():
    return tiny_llava(seed=1, attn_implementation="sdpa")


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("name", ["none", *STRATEGIES])
def test_keep_all_is_bit_identical(model, name):
    inputs = llava_inputs(model, [[5, 6, 7, 8], [9, 10]], images=[1, 1])
    reference = logits(model, inputs)
    n = image_tokens(model)
    strategy = vtokprune.NoPrune() if name == "none" else STRATEGIES[name](n)
    with vtokprune.pruned(model, strategy):
        out = logits(model, inputs)
        assert [k.tolist() for k in vtokprune.last_selection(model).kept] == [list(range(n))] * 2
    assert torch.equal(out, reference)


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_remove_restores_identical_outputs(model, name):
    inputs = llava_inputs(model, [[5, 6, 7]])
    reference = logits(model, inputs)
    vtokprune.apply(model, STRATEGIES[name](4))
    pruned = logits(model, inputs)
    assert not torch.equal(pruned[:, -1], reference[:, -1])
    vtokprune.remove(model)
    assert not vtokprune.is_pruned(model)
    assert torch.equal(logits(model, inputs), reference)
    assert all(not hasattr(m, "_vtokprune_config") for m in model.modules())
    assert "forward" not in model.model.__dict__


def test_exact_budget_and_ratio(sdpa_model):
    inputs = llava_inputs(sdpa_model, [[5, 6]], images=2)
    for strategy, expected in [
        (vtokprune.CLSAttention(keep=5), 5),
        (vtokprune.CLSAttention(ratio=0.25), 4),
        (vtokprune.get_strategy("cls", ratio=0.111), 2),
        (vtokprune.FastV(keep=3), 3),
    ]:
        with vtokprune.pruned(sdpa_model, strategy):
            out = logits(sdpa_model, inputs)
            sel = vtokprune.last_selection(sdpa_model)
        assert [len(k) for k in sel.kept] == [expected, expected]
        assert sel.available == [16, 16] and sel.sample_of == [0, 0]
        if strategy.acts == "vision":
            assert out.shape[1] == inputs["input_ids"].shape[1] - 2 * (16 - expected)


def test_kept_tokens_keep_original_positions(sdpa_model):
    """With positions="original" the language model sees the kept tokens at their unpruned positions."""
    seen = {}

    def grab(module, args, kwargs):
        seen["position_ids"] = kwargs["position_ids"].clone()
        seen["len"] = kwargs["inputs_embeds"].shape[1]

    handle = sdpa_model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        inputs = llava_inputs(sdpa_model, [[5, 6, 7], [8]], images=[1, 1])
        with vtokprune.pruned(sdpa_model, vtokprune.CLSAttention(keep=4, positions="original")):
            logits(sdpa_model, inputs)
            kept = vtokprune.last_selection(sdpa_model).kept
    finally:
        handle.remove()
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    for b in range(2):
        image_cols = (ids[b] == 3).nonzero().flatten()
        keep = (ids[b] != 3).clone()
        keep[image_cols[kept[b]]] = True
        expected = torch.arange(ids.shape[1])[keep]  # the unwrapped model's default positions are 0..L-1
        assert seen["position_ids"][b].tolist() == expected.tolist()
    del mask


def test_positions_follow_generate_left_padding(sdpa_model):
    """generate() passes cumsum(attention_mask) positions; kept tokens must keep those, and so must decoding."""
    calls = []

    def grab(module, args, kwargs):
        calls.append(kwargs["position_ids"].clone())

    inputs = llava_inputs(sdpa_model, [[5, 6, 7, 8, 9], [10]], images=[1, 1])
    handle = sdpa_model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with vtokprune.pruned(sdpa_model, vtokprune.CLSAttention(keep=4, positions="original")):
            generate_new(sdpa_model, inputs, 3)
            kept = vtokprune.last_selection(sdpa_model).kept
    finally:
        handle.remove()
    full = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    ids = inputs["input_ids"]
    for b in range(2):
        keep = ids[b] != 3
        keep[(ids[b] == 3).nonzero().flatten()[kept[b]]] = True
        assert calls[0][b][-int(keep.sum()) :].tolist() == full[b][keep].tolist()
    last = full[:, -1]
    for step, pos in enumerate(calls[1:], start=1):
        assert pos[:, -1].tolist() == (last + step).tolist()


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_generate_with_cache_matches_stepwise_reference(model, name):
    inputs = llava_inputs(model, [[5, 6, 7, 8]], seed=2)
    with vtokprune.pruned(model, STRATEGIES[name](5)):
        generated = generate_new(model, inputs, 6)
        manual = stepwise_greedy(model, inputs, 6)
        assert torch.equal(generated, manual)
        if STRATEGIES[name](5).acts == "vision":  # the selection does not depend on the text: no cache at all
            assert torch.equal(generated, recompute_greedy(model, inputs, 6))


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_batch_matches_singles(sdpa_model, name):
    prompts = [[5, 6, 7, 8, 9, 10], [11], [12, 13, 14]]
    per = [1, 2, 1]
    inputs = llava_inputs(sdpa_model, prompts, images=per, seed=5)
    strategy = STRATEGIES[name](5)
    with vtokprune.pruned(sdpa_model, strategy):
        batch_logits = logits(sdpa_model, inputs)[:, -1]
        batch_kept = [k.tolist() for k in vtokprune.last_selection(sdpa_model).kept]
        batch_tokens = generate_new(sdpa_model, inputs, 4)
        alone_kept, alone_logits, alone_tokens = [], [], []
        for i in range(3):
            one = single(inputs, i, per)
            alone_logits.append(logits(sdpa_model, one)[:, -1])
            alone_kept += [k.tolist() for k in vtokprune.last_selection(sdpa_model).kept]
            alone_tokens.append(generate_new(sdpa_model, one, 4))
    assert batch_kept == alone_kept
    torch.testing.assert_close(batch_logits, torch.cat(alone_logits), atol=1e-5, rtol=1e-4)
    assert torch.equal(batch_tokens, torch.cat(alone_tokens))


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_mixed_batch_with_text_only_sample(sdpa_model, name):
    """A text-only prompt in a batch with image prompts is padded, never pruned, and matches running alone."""
    prompts = [[5, 6, 7], [8, 9, 10, 11]]
    per = [1, 0]
    inputs = llava_inputs(sdpa_model, prompts, images=per, seed=6)
    with vtokprune.pruned(sdpa_model, STRATEGIES[name](4)):
        batch = logits(sdpa_model, inputs)[:, -1]
        tokens = generate_new(sdpa_model, inputs, 3)
        alone = [logits(sdpa_model, single(inputs, i, per))[:, -1] for i in range(2)]
        alone_tokens = [generate_new(sdpa_model, single(inputs, i, per), 3) for i in range(2)]
    torch.testing.assert_close(batch, torch.cat(alone), atol=1e-5, rtol=1e-4)
    assert torch.equal(tokens, torch.cat(alone_tokens))


def test_right_padding_matches_left_padding(sdpa_model):
    prompts = [[5, 6, 7, 8], [9]]
    left = llava_inputs(sdpa_model, prompts, seed=7, padding="left")
    right = llava_inputs(sdpa_model, prompts, seed=7, padding="right")
    with vtokprune.pruned(sdpa_model, vtokprune.FastV(keep=4)):
        lo = logits(sdpa_model, left)
        kept_left = [k.tolist() for k in vtokprune.last_selection(sdpa_model).kept]
        ro = logits(sdpa_model, right)
        kept_right = [k.tolist() for k in vtokprune.last_selection(sdpa_model).kept]
    assert kept_left == kept_right
    last_right = right["attention_mask"].sum(1) - 1 - (16 - 4)  # FastV keeps the sequence length at the LM input
    del last_right
    torch.testing.assert_close(lo[0, -1], ro[0, -1], atol=1e-5, rtol=1e-4)


def test_text_only_input_passes_through(sdpa_model):
    inputs = llava_inputs(sdpa_model, [[5, 6, 7]], images=0)
    reference = logits(sdpa_model, inputs)
    for strategy in (vtokprune.CLSAttention(keep=4), vtokprune.FastV(keep=4)):
        with vtokprune.pruned(sdpa_model, strategy):
            assert torch.equal(logits(sdpa_model, inputs), reference)
            assert vtokprune.last_selection(sdpa_model) is None
            generate_new(sdpa_model, inputs, 2)


def test_pruning_changes_compute(sdpa_model):
    """Pre-LLM pruning really shortens what the language model runs on."""
    lengths = []
    handle = sdpa_model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: lengths.append(k["inputs_embeds"].shape[1]), with_kwargs=True
    )
    try:
        inputs = llava_inputs(sdpa_model, [[5, 6]])
        logits(sdpa_model, inputs)
        with vtokprune.pruned(sdpa_model, "cls", keep=2):
            logits(sdpa_model, inputs)
    finally:
        handle.remove()
    assert lengths[0] - lengths[1] == 14
