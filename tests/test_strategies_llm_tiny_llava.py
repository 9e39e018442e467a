"""PyramidDrop, SparseVLM and AdaptInfer on the tiny LLaVA: exact scheduled counts, keep-all unwrapped, a batch equal
to its samples alone, text-only samples, generate() against a hand-written loop, PyramidDrop's official ranking."""

from __future__ import annotations

import pytest
import torch

import vtokprune
from vtokprune.compat import cache_from_output, cache_kwargs
from vtokprune.registry import get_strategy
from vtokprune.strategies.pdrop import PyramidDrop
from vtokprune.testing import llava_inputs, tiny_llava

CONFIGS = [
    ("pdrop", {"layers": (2, 4, 6), "reference_layers": None}),  # 16 -> 8 -> 4 -> 2
    ("pdrop", {"keep": 3}),
    ("sparsevlm", {"keep": 4}),
    ("sparsevlm", {"keep": 4, "recycle": False}),
    ("adaptinfer", {"keep": 5}),
    ("adaptinfer", {"keep": 4, "layers": (2, 5), "reference_layers": None}),
]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for n, kw in CONFIGS]


@pytest.fixture(scope="module")
def model():  # type: ignore[no-untyped-def]
    return tiny_llava(text_layers=8)


PROMPT_A = [5, 6, 7, 8, 9]
PROMPT_B = [11, 12, 13, 14, 15, 16, 17, 18, 19]


@pytest.mark.parametrize(("name", "kwargs"), CONFIGS, ids=IDS)
def test_exact_scheduled_counts(model, name: str, kwargs: dict) -> None:  # type: ignore[no-untyped-def]
    strategy = get_strategy(name, **kwargs)
    inp = llava_inputs(model, [PROMPT_A, PROMPT_B], images=[1, 2])
    sched = strategy.schedule(8, 16)
    assert sorted(sched.values(), reverse=True) == [sched[k] for k in sorted(sched)]
    with torch.no_grad(), vtokprune.pruned(model, strategy):
        logits = model(**inp).logits
        sel = vtokprune.last_selection(model)
    assert torch.isfinite(logits).all()
    assert sel is not None and sel.available == [16, 16, 16] and sel.sample_of == [0, 1, 1]
    assert sorted(sel.stages) == sorted(sched) and sel.layer == max(sched)
    for layer, kept in sel.stages.items():
        # one image per sample: exact; two images share their sample's summed budget
        assert len(kept[0]) == sched[layer]
        assert len(kept[1]) + len(kept[2]) == 2 * sched[layer]
    # stages only ever drop tokens
    layers = sorted(sel.stages)
    for a, b in zip(layers, layers[1:]):
        for img in range(3):
            assert set(sel.stages[b][img].tolist()) <= set(sel.stages[a][img].tolist())


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("pdrop", {"keep": 16}), ("pdrop", {"lam": 1.0}), ("sparsevlm", {"keep": 16}), ("adaptinfer", {"keep": 16})],
)
def test_keep_all_is_unwrapped(impl: str, name: str, kwargs: dict) -> None:
    m = tiny_llava(text_layers=8, attn_implementation=impl)
    inp = llava_inputs(m, [PROMPT_A])
    with torch.no_grad():
        ref = m(**inp).logits
        with vtokprune.pruned(m, name, **kwargs):
            out = m(**inp).logits
            assert len(vtokprune.last_selection(m).kept[0]) == 16
    assert torch.equal(out, ref)


@pytest.mark.parametrize(("name", "kwargs"), CONFIGS, ids=IDS)
def test_batch_matches_single(model, name: str, kwargs: dict) -> None:  # type: ignore[no-untyped-def]
    strategy = get_strategy(name, **kwargs)
    prompts = [PROMPT_A, PROMPT_B]
    with torch.no_grad(), vtokprune.pruned(model, strategy):
        both = llava_inputs(model, prompts)
        batch_logits = model(**both).logits
        batch_sel = vtokprune.last_selection(model)
        for i, prompt in enumerate(prompts):
            one = llava_inputs(model, [prompt])
            one["pixel_values"] = both["pixel_values"][i : i + 1]
            logits = model(**one).logits
            sel = vtokprune.last_selection(model)
            for layer in sel.stages:
                assert torch.equal(sel.stages[layer][0], batch_sel.stages[layer][i])
            torch.testing.assert_close(logits[0, -1], batch_logits[i, -1], atol=1e-5, rtol=0)


@pytest.mark.parametrize(("name", "kwargs"), CONFIGS[::2], ids=IDS[::2])
def test_text_only_sample_in_batch(model, name: str, kwargs: dict) -> None:  # type: ignore[no-untyped-def]
    strategy = get_strategy(name, **kwargs)
    with torch.no_grad(), vtokprune.pruned(model, strategy):
        mixed = llava_inputs(model, [PROMPT_A, PROMPT_B], images=[1, 0])
        logits = model(**mixed).logits
        sel = vtokprune.last_selection(model)
        assert sel.sample_of == [0] and len(sel.kept[0]) == strategy.schedule(8, 16)[sel.layer]
        one = llava_inputs(model, [PROMPT_A])
        alone = model(**one).logits
        text = llava_inputs(model, [PROMPT_B], images=0)
        text_alone = model(**text).logits
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits[0, -1], alone[0, -1], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[1, -1], text_alone[0, -1], atol=1e-5, rtol=0)


def _manual_greedy(model, inp: dict, steps: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    out = model(**inp, use_cache=True)
    mask = inp["attention_mask"]
    tokens = []
    for step in range(steps):
        nxt = out.logits[:, -1].argmax(dim=-1)
        tokens.append(nxt)
        if step == steps - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = model(input_ids=nxt[:, None], attention_mask=mask, **cache_kwargs(cache_from_output(out)), use_cache=True)
    return torch.stack(tokens, dim=1)


@pytest.mark.parametrize(("name", "kwargs"), CONFIGS, ids=IDS)
@pytest.mark.parametrize("batch", [1, 2])
def test_generate_matches_manual_loop(model, name: str, kwargs: dict, batch: int) -> None:  # type: ignore[no-untyped-def]
    inp = llava_inputs(model, [PROMPT_A, PROMPT_B][:batch])
    with torch.no_grad(), vtokprune.pruned(model, name, **kwargs):
        gen = model.generate(**inp, max_new_tokens=4, do_sample=False)
        manual = _manual_greedy(model, inp, 4)
    assert torch.equal(gen[:, -4:], manual)


def _official_pdrop_scores(model, inp: dict, layer: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """The official ranking re-created: layer K's own q/k on its (unpruned) input, the last token's attention row."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    lm = model.model.language_model
    out = model(**inp, output_hidden_states=True)
    h = out.hidden_states[layer]  # input of decoder layer `layer`
    block = lm.layers[layer]
    x = block.input_layernorm(h)
    attn = block.self_attn
    b, length, _ = x.shape
    d = attn.head_dim
    q = attn.q_proj(x).view(b, length, -1, d).transpose(1, 2)
    k = attn.k_proj(x).view(b, length, -1, d).transpose(1, 2)
    cos, sin = lm.rotary_emb(h, torch.arange(length)[None])
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = (q[:, :, -1:] @ k.transpose(-1, -2)) * d**-0.5
    return torch.softmax(logits.float(), dim=-1)[:, :, 0].mean(dim=1)  # [B, L]


@pytest.mark.parametrize("score_layer", ["stage", "previous"])
def test_pdrop_scores_with_the_stage_layers_own_attention(model, score_layer: str) -> None:  # type: ignore[no-untyped-def]
    inp = llava_inputs(model, [PROMPT_A])
    visual = inp["input_ids"][0] == model.config.image_token_id
    strategy = PyramidDrop(layers=(3,), reference_layers=None, keep=5, score_layer=score_layer)
    with torch.no_grad():
        scores = _official_pdrop_scores(model, inp, 3 if score_layer == "stage" else 2)[0][visual]
        with vtokprune.pruned(model, strategy):
            model(**inp)
            kept = vtokprune.last_selection(model)
    assert kept is not None
    assert kept.kept[0].tolist() == torch.sort(torch.topk(scores, 5).indices).values.tolist()
