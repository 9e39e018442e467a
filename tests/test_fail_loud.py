"""Fail loud: runtime states vtokprune does not recognise raise, naming the cause, instead of computing on.

Also: every family's generate() goes through the adapter's decode path (so a future transformers rename of the cache
argument turns into a red test, not a silently wrong answer), labels on pruned forwards, copies and pickles of pruned
models, and budgets that are never a silent no-op.
"""

from __future__ import annotations

import copy
import io
import pickle

import numpy as np
import pytest
import torch
from transformers import DynamicCache

import vtokprune
from tests.test_adapters_conformance import BUILDERS, SPECS, SUPPRESS, make_inputs
from vtokprune.compat import CACHE_ARG_NAMES, cache_from_args, cache_from_output, cache_kwargs
from vtokprune.errors import BudgetError, PruningStateError, UnknownStrategyError
from vtokprune.testing import llava_inputs, tiny_llava

STEPS = 4


@pytest.fixture(scope="module")
def llava():
    return tiny_llava(seed=0)


def _inputs(model):
    return llava_inputs(model, [[8, 9, 10, 11], [12, 13]], images=[1, 2])


# ------------------------------------------------------------------------------------- the one compatibility point


def test_cache_found_under_either_name_and_refused_under_an_unknown_one():
    cache = DynamicCache()
    for name in CACHE_ARG_NAMES:
        assert cache_from_args({name: cache, "input_ids": None}) is cache
    assert cache_from_args({"input_ids": None}) is None
    with pytest.raises(PruningStateError, match="two different KV caches"):
        cache_from_args({"cache": DynamicCache(), "past_key_values": DynamicCache()})
    with pytest.raises(PruningStateError, match="unknown argument name 'kv_cache'.*transformers"):
        cache_from_args({"kv_cache": cache})


def test_pruned_model_refuses_a_cache_under_an_unknown_name(llava):
    vtokprune.apply(llava, "cls", keep=4)
    try:
        with pytest.raises(PruningStateError, match="unknown argument name 'kv_cache'"):
            llava(**_inputs(llava), kv_cache=DynamicCache())
    finally:
        vtokprune.remove(llava)


def test_both_cache_names_decode_the_same(llava):
    inputs = _inputs(llava)
    vtokprune.apply(llava, "cls", keep=4)
    try:
        with torch.no_grad():
            out = llava(**inputs, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([inputs["attention_mask"], torch.ones_like(nxt)], 1)
            a = llava(input_ids=nxt, attention_mask=mask, **cache_kwargs(copy.deepcopy(cache_from_output(out))))
            # the deepcopy above is a new cache object: vtokprune has no record of it and must refuse it
    except PruningStateError as e:
        assert "no record" in str(e)
    else:
        raise AssertionError(f"an unknown cache was decoded against: {a.logits.shape}")
    finally:
        vtokprune.remove(llava)
    vtokprune.apply(llava, "cls", keep=4)
    try:
        results = []
        for name in CACHE_ARG_NAMES:
            with torch.no_grad():
                out = llava(**inputs, use_cache=True)
                nxt = out.logits[:, -1:].argmax(-1)
                mask = torch.cat([inputs["attention_mask"], torch.ones_like(nxt)], 1)
                results.append(llava(input_ids=nxt, attention_mask=mask, **{name: cache_from_output(out)}).logits)
        torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
    finally:
        vtokprune.remove(llava)


def test_cache_filled_before_apply_is_refused(llava):
    inputs = _inputs(llava)
    with torch.no_grad():
        out = llava(**inputs, use_cache=True)
    cache = cache_from_output(out)
    nxt = out.logits[:, -1:].argmax(-1)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(nxt)], 1)
    vtokprune.apply(llava, "cls", keep=4)
    try:
        with pytest.raises(PruningStateError, match="has no record of"):
            llava(input_ids=nxt, attention_mask=mask, **cache_kwargs(cache))
    finally:
        vtokprune.remove(llava)


def test_decode_step_that_bypasses_the_adapter_is_refused(llava):
    inputs = _inputs(llava)
    vtokprune.apply(llava, "cls", keep=4)
    try:
        with torch.no_grad():
            out = llava(**inputs, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            with pytest.raises(PruningStateError, match="without passing the vtokprune adapter"):
                llava.model.language_model(input_ids=nxt, **cache_kwargs(cache_from_output(out)))
    finally:
        vtokprune.remove(llava)


def test_decode_with_a_mask_of_the_wrong_length_is_refused(llava):
    inputs = _inputs(llava)
    for strategy in ("cls", "fastv"):
        vtokprune.apply(llava, strategy, keep=4)
        try:
            with torch.no_grad():
                out = llava(**inputs, use_cache=True)
                nxt = out.logits[:, -1:].argmax(-1)
                short = torch.ones(2, 5, dtype=torch.long)
                with pytest.raises(PruningStateError, match="attention_mask has 5 columns"):
                    llava(input_ids=nxt, attention_mask=short, **cache_kwargs(cache_from_output(out)))
        finally:
            vtokprune.remove(llava)


def test_text_only_prefill_then_decode_still_works(llava):
    ids = torch.tensor([[5, 6, 7, 8]])
    reference = llava.generate(input_ids=ids, max_new_tokens=3, do_sample=False, suppress_tokens=SUPPRESS)
    with vtokprune.pruned(llava, "cls", keep=4):
        got = llava.generate(input_ids=ids, max_new_tokens=3, do_sample=False, suppress_tokens=SUPPRESS)
        assert llava._vtokprune_state.calls["text_only"] == 1
        assert llava._vtokprune_state.calls["decode"] == 2
    assert torch.equal(reference, got)


# ------------------------------------------------------------------------------------- generate uses the decode path


@pytest.mark.parametrize("family", list(BUILDERS))
@pytest.mark.parametrize("name", ["random", "fastv"])
def test_generate_goes_through_the_adapter_decode_path(family, name):
    model = BUILDERS[family]()
    spec = [[1], [1, 2]] if family == "internvl" else SPECS[family][0]  # InternVL's default spec pads nothing
    inputs = make_inputs(family, model, spec)
    assert bool((inputs["attention_mask"] == 0).any()), "the batch must be padded"
    with vtokprune.pruned(model, name, keep=4):
        with torch.no_grad():
            model.generate(
                **inputs, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, suppress_tokens=SUPPRESS
            )
        calls = model._vtokprune_state.calls
        assert (calls["prefill"], calls["decode"], calls["text_only"]) == (1, STEPS - 1, 0)


# ------------------------------------------------------------------------------------- labels


@pytest.mark.parametrize("name", ["cls", "fastv"])
def test_labels_loss_matches_unpruned_at_keep_all_and_is_computed_on_kept_tokens(llava, name):
    inputs = _inputs(llava)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.no_grad():
        reference = llava(**inputs, labels=labels).loss
        with vtokprune.pruned(llava, name, ratio=1.0):
            same = llava(**inputs, labels=labels).loss
        with vtokprune.pruned(llava, name, keep=2):
            out = llava(**inputs, labels=labels)
            comp = llava._vtokprune_state.call_compaction()
    torch.testing.assert_close(same, reference, rtol=0, atol=0)
    pruned_labels = comp.gather(labels, fill=-100)
    expected = llava.loss_function(
        logits=out.logits, labels=pruned_labels, vocab_size=llava.config.text_config.vocab_size
    )
    assert out.logits.shape[1] < labels.shape[1]
    torch.testing.assert_close(out.loss, expected)


# ------------------------------------------------------------------------------------- copies and pickles


def test_copy_pickle_and_torch_save_of_a_pruned_model_name_the_fix():
    llava = tiny_llava(seed=0)  # fresh: after a forward, transformers' own hooks make any model unpicklable
    vtokprune.apply(llava, "cls", keep=4)
    try:
        with pytest.raises(PruningStateError, match=r"vtokprune.remove\(model\) first"):
            copy.deepcopy(llava)
        with pytest.raises(PruningStateError, match=r"vtokprune.remove\(model\) first"):
            pickle.dumps(llava)
        with pytest.raises(PruningStateError, match=r"vtokprune.remove\(model\) first"):
            torch.save(llava, io.BytesIO())
    finally:
        vtokprune.remove(llava)
    copy.deepcopy(llava)  # fine once removed


# ------------------------------------------------------------------------------------- budgets


def test_no_budget_is_never_a_silent_no_op(llava):
    for name in ("cls", "random", "divprune", "sparsevlm", "visionzip"):
        with pytest.raises(BudgetError, match="needs a budget"):
            vtokprune.apply(llava, name)
        assert not vtokprune.is_pruned(llava)
    with pytest.raises(BudgetError, match="needs a budget"):
        vtokprune.apply(llava, vtokprune.CLSAttention())
    with vtokprune.pruned(llava, "fastv"):
        assert vtokprune.strategy_of(llava).ratio == 0.5  # FastV's paper default, recorded
    with vtokprune.pruned(llava, "pdrop"):
        assert vtokprune.strategy_of(llava).lam == 0.5  # PyramidDrop's paper default, recorded
    with vtokprune.pruned(llava, "none"):
        pass


def test_none_is_not_a_strategy_name(llava):
    with pytest.raises(UnknownStrategyError, match="no strategy given"):
        vtokprune.get_strategy(None)  # type: ignore[arg-type]
    with pytest.raises(UnknownStrategyError, match="no strategy given"):
        vtokprune.apply(llava, None)  # type: ignore[arg-type]


def test_numpy_and_torch_integer_budgets_are_accepted():
    assert vtokprune.get_strategy("cls", keep=np.int64(8)).keep == 8
    assert type(vtokprune.get_strategy("cls", keep=torch.tensor(8)).keep) is int
    assert vtokprune.get_strategy("cls", ratio=np.float32(0.25)).ratio == 0.25
    with pytest.raises(BudgetError):
        vtokprune.get_strategy("cls", keep=torch.tensor(4.5))
    with pytest.raises(BudgetError):
        vtokprune.get_strategy("cls", keep=4.5)


def test_in_llm_strategy_with_an_all_padding_row(llava):
    inputs = _inputs(llava)
    inputs["attention_mask"][1] = 0
    with vtokprune.pruned(llava, "fastv", keep=2), torch.no_grad():
        out = llava(**inputs)
    assert torch.isfinite(out.logits[0]).all()
