"""Property-based and concurrency tests: odd shapes, dtypes and threads never give a silent wrong answer."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import vtokprune
from vtokprune.testing import image_tokens, llava_inputs, tiny_llava

from .helpers import single

MODELS: dict = {}


def model_for(dtype: torch.dtype, impl: str = "sdpa"):
    key = (dtype, impl)
    if key not in MODELS:
        MODELS[key] = tiny_llava(seed=0, attn_implementation=impl, dtype=dtype)
    return MODELS[key]


def make_strategy(name: str, keep: int):
    return {
        "cls": vtokprune.CLSAttention(keep=keep),
        "fastv": vtokprune.FastV(keep=keep, layer=1),
        "random": vtokprune.RandomPrune(keep=keep),
        "pool": vtokprune.Pool(keep=keep),
    }[name]


batches = st.lists(
    st.tuples(st.lists(st.integers(4, 90), min_size=1, max_size=6), st.integers(0, 2)), min_size=1, max_size=3
).filter(lambda b: any(n for _, n in b))

PHASES = [Phase.explicit, Phase.reuse, Phase.generate]  # no shrinking: a failure prints its example as is
SETTINGS = settings(
    max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, phases=PHASES
)


@SETTINGS
@given(
    batch=batches,
    name=st.sampled_from(["cls", "fastv", "random", "pool"]),
    keep=st.integers(1, 16),
    padding=st.sampled_from(["left", "right"]),
)
def test_batch_invariants_fp32(batch, name, keep, padding):
    model = model_for(torch.float32)
    prompts = [[t if t != 3 else 4 for t in p] for p, _ in batch]
    per = [n for _, n in batch]
    inputs = llava_inputs(model, prompts, images=per, padding=padding, seed=len(prompts))
    with torch.no_grad(), vtokprune.pruned(model, make_strategy(name, keep)):
        out = model(**inputs).logits
        sel = vtokprune.last_selection(model)
        assert [len(k) for k in sel.kept] == [keep] * sum(per)  # exact budget, every image
        assert all(bool((k[1:] > k[:-1]).all()) for k in sel.kept)  # ascending, distinct
        assert torch.isfinite(out).all()
        kept_alone = []
        for i in range(len(prompts)):
            one = single(inputs, i, per)
            alone = model(**one).logits[0, -1]
            if per[i]:
                kept_alone += [k.tolist() for k in vtokprune.last_selection(model).kept]
            # pruned logits cover the kept tokens only; with right padding, find the row's last real slot
            # (compaction left-pads rows that lost fewer tokens; the input's right padding stays at the end)
            right_pads = inputs["attention_mask"].shape[1] - int(inputs["attention_mask"][i].sum())
            last = -1 - (right_pads if padding == "right" else 0)
            torch.testing.assert_close(out[i, last], alone, atol=2e-5, rtol=1e-4)
    assert [k.tolist() for k in sel.kept] == kept_alone


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, phases=PHASES)
@given(
    dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
    name=st.sampled_from(["cls", "fastv", "random", "pool"]),
    per=st.lists(st.integers(0, 2), min_size=1, max_size=3).filter(any),
)
def test_keep_all_bit_identical_any_dtype(dtype, name, per):
    model = model_for(dtype)
    inputs = llava_inputs(model, [[5 + i, 6] for i in range(len(per))], images=per)
    with torch.no_grad():
        reference = model(**inputs).logits
        with vtokprune.pruned(model, make_strategy(name, image_tokens(model))):
            out = model(**inputs).logits
    assert out.dtype == dtype
    assert torch.equal(out, reference)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_pruning_runs_and_is_deterministic(dtype):
    model = model_for(dtype)
    inputs = llava_inputs(model, [[5, 6, 7], [8]], images=[1, 2])
    for name in ["cls", "fastv"]:
        with torch.no_grad(), vtokprune.pruned(model, make_strategy(name, 5)):
            a = model(**inputs).logits
            ka = [k.tolist() for k in vtokprune.last_selection(model).kept]
            b = model(**inputs).logits
            kb = [k.tolist() for k in vtokprune.last_selection(model).kept]
        assert torch.isfinite(a).all() and torch.equal(a, b) and ka == kb


@pytest.mark.parametrize("image_size", [28, 70, 98])
def test_image_sizes(image_size):
    model = tiny_llava(seed=0, image_size=image_size)
    n = image_tokens(model)
    inputs = llava_inputs(model, [[5, 6]], images=1)
    for name in ["cls", "pool", "fastv"]:
        with torch.no_grad(), vtokprune.pruned(model, make_strategy(name, max(1, n // 3))):
            model(**inputs)
            assert len(vtokprune.last_selection(model).kept[0]) == max(1, n // 3)


def test_threads_do_not_see_each_others_state():
    """Two threads on one wrapped model, and a third on an unwrapped copy, all at once, many times."""
    model = tiny_llava(seed=0)
    plain = copy.deepcopy(model)
    vtokprune.apply(model, vtokprune.FastV(keep=4, layer=1))
    inputs_a = llava_inputs(model, [[5, 6, 7]], seed=1)
    inputs_b = llava_inputs(model, [[8, 9]], images=2, seed=2)
    with torch.no_grad():
        expected_a = model(**inputs_a).logits
        kept_a = [k.tolist() for k in vtokprune.last_selection(model).kept]
        expected_b = model(**inputs_b).logits
        kept_b = [k.tolist() for k in vtokprune.last_selection(model).kept]
        expected_plain = plain(**inputs_a).logits
        gen_a = model.generate(**inputs_a, max_new_tokens=3, do_sample=False)
    errors: list[str] = []
    barrier = threading.Barrier(3)

    def worker(fn):
        barrier.wait()
        try:
            for _ in range(6):
                fn()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(repr(e))

    def run_a():
        with torch.no_grad():
            out = model(**inputs_a).logits
            assert torch.equal(out, expected_a)
            assert [k.tolist() for k in vtokprune.last_selection(model).kept] == kept_a
            assert torch.equal(model.generate(**inputs_a, max_new_tokens=3, do_sample=False), gen_a)

    def run_b():
        with torch.no_grad():
            assert torch.equal(model(**inputs_b).logits, expected_b)
            assert [k.tolist() for k in vtokprune.last_selection(model).kept] == kept_b

    def run_plain():
        with torch.no_grad():
            assert torch.equal(plain(**inputs_a).logits, expected_plain)

    threads = [threading.Thread(target=worker, args=(f,)) for f in (run_a, run_b, run_plain)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_two_strategies_in_two_threads():
    """Two wrapped copies of one model with different strategies, run concurrently."""
    base = tiny_llava(seed=0)
    cls_model = vtokprune.apply(copy.deepcopy(base), vtokprune.CLSAttention(keep=3))
    fastv_model = vtokprune.apply(copy.deepcopy(base), vtokprune.FastV(keep=5, layer=2))
    inputs = llava_inputs(base, [[5, 6, 7]], seed=4)
    with torch.no_grad():
        ref_cls = cls_model(**inputs).logits
        ref_fastv = fastv_model(**inputs).logits
    errors: list[str] = []

    def loop(m, ref, k):
        try:
            for _ in range(8):
                with torch.no_grad():
                    assert torch.equal(m(**inputs).logits, ref)
                assert len(vtokprune.last_selection(m).kept[0]) == k
        except Exception as e:  # pragma: no cover
            errors.append(repr(e))

    threads = [threading.Thread(target=loop, args=a) for a in ((cls_model, ref_cls, 3), (fastv_model, ref_fastv, 5))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
