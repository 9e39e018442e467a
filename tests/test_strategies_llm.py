"""Decoder-side strategies: PyramidDrop, SparseVLM, AdaptInfer (pure scoring functions, schedules, tiny LLaVA)."""

from __future__ import annotations

import pytest
import torch

import vtokprune
from vtokprune.compat import cache_from_output, cache_kwargs
from vtokprune.errors import BudgetError
from vtokprune.registry import get_strategy
from vtokprune.strategies.adaptinfer import AdaptInfer, prior_weighted_scores, text_prior
from vtokprune.strategies.base import LLMContext
from vtokprune.strategies.pdrop import PyramidDrop, geometric_counts, pyramid_counts, scale_layer
from vtokprune.strategies.sparsevlm import (
    SparseVLM,
    embedding_raters,
    masked_query_rows,
    mean_row_scores,
    rater_mask,
    rater_scores,
    recycle_pruned,
    text_query_rows,
)
from vtokprune.testing import llava_inputs, tiny_llava

# ------------------------------------------------------------------------------------------------ helpers


def make_ctx(image: list[list[bool]], valid: list[list[bool]]) -> LLMContext:
    image_t = torch.tensor(image)
    valid_t = torch.tensor(valid)
    pos = torch.arange(valid_t.shape[1]).expand_as(valid_t)
    last = torch.where(valid_t, pos, torch.full_like(pos, -1)).max(dim=1).values
    return LLMContext(
        image_mask=image_t & valid_t,
        valid=valid_t,
        text_mask=valid_t & ~image_t,
        last_index=last,
        layer=1,
        num_layers=4,
    )


# ------------------------------------------------------------------------------------------------ schedules


def test_pyramid_counts_paper_default() -> None:
    assert pyramid_counts(576, 3, 0.5) == [288, 144, 72]
    assert geometric_counts(576, 3, 72) == [288, 144, 72]
    counts = geometric_counts(576, 3, 64)
    assert counts[-1] == 64 and counts == sorted(counts, reverse=True) and counts[0] <= 576
    assert geometric_counts(16, 3, 16) == [16, 16, 16]
    assert geometric_counts(5, 4, 1) == sorted(geometric_counts(5, 4, 1), reverse=True)


def test_scale_layer() -> None:
    assert [scale_layer(x, 32, 32) for x in (8, 16, 24)] == [8, 16, 24]
    assert [scale_layer(x, 4, 32) for x in (8, 16, 24)] == [1, 2, 3]
    assert [scale_layer(x, 64, 32) for x in (8, 16, 24)] == [16, 32, 48]
    assert [scale_layer(x, 2, 32) for x in (8, 16, 24)] == [1, 1, 1]
    assert scale_layer(31, 32, 32) == 31 and scale_layer(32, 32, 32) == 31


def test_pdrop_schedule() -> None:
    assert PyramidDrop().schedule(32, 576) == {8: 288, 16: 144, 24: 72}
    assert PyramidDrop().schedule(4, 576) == {1: 288, 2: 144, 3: 72}
    assert PyramidDrop().schedule(40, 576) == {10: 288, 20: 144, 30: 72}
    # stages that collapse onto one layer keep the smaller (later) budget
    assert PyramidDrop().schedule(2, 576) == {1: 72}
    assert PyramidDrop(lam=0.25).schedule(32, 576) == {8: 144, 16: 36, 24: 9}
    # keep / ratio give the last stage's budget; lambda is derived
    assert PyramidDrop(keep=72).schedule(32, 576) == {8: 288, 16: 144, 24: 72}
    assert PyramidDrop(ratio=0.125).schedule(32, 576) == {8: 288, 16: 144, 24: 72}
    sched = PyramidDrop(keep=64).schedule(32, 576)
    assert list(sched) == [8, 16, 24] and sched[24] == 64
    assert PyramidDrop(keep=576).schedule(32, 576) == {8: 576, 16: 576, 24: 576}
    assert PyramidDrop(layers=(2, 4), reference_layers=None).schedule(8, 16) == {2: 8, 4: 4}
    assert PyramidDrop(fractions={16: 0.25, 8: 0.5}).schedule(32, 576) == {8: 288, 16: 144}
    assert PyramidDrop(fractions={8: 0.5, 16: 0.25}).schedule(4, 576) == {1: 288, 2: 144}
    assert get_strategy("pdrop", keep=72) == PyramidDrop(keep=72)
    hash(PyramidDrop(fractions={8: 0.5}))  # configs stay hashable


@pytest.mark.parametrize(
    "kwargs",
    [
        {"keep": 64, "lam": 0.5},
        {"fractions": {8: 0.5}, "keep": 4},
        {"fractions": {8: 0.5}, "layers": (8,)},
        {"fractions": {8: 0.25, 16: 0.5}},
        {"fractions": {8: 0.0}},
        {"lam": 1.5},
        {"layers": (16, 8)},
        {"layers": (0, 8)},
        {"layers": ()},
        {"reference_layers": 1},
    ],
)
def test_pdrop_rejects(kwargs: dict) -> None:
    with pytest.raises(BudgetError):
        PyramidDrop(**kwargs)


def test_sparsevlm_adaptinfer_schedule() -> None:
    assert SparseVLM(keep=64).schedule(32, 576) == {3: 277, 7: 133, 16: 64}  # official 2/6/15, pruned after
    assert SparseVLM(keep=64).schedule(4, 576) == {1: 133, 2: 64}
    with pytest.raises(BudgetError, match="no budget"):
        SparseVLM().schedule(32, 576)  # no budget is never a silent keep-all
    assert AdaptInfer(keep=64).schedule(32, 576) == {2: 64}
    assert AdaptInfer(keep=64).schedule(4, 576) == {1: 64}
    assert AdaptInfer(keep=8, layers=(2, 12)).schedule(32, 32) == {2: 16, 12: 8}
    with pytest.raises(BudgetError):
        SparseVLM(layers=(6, 2))
    with pytest.raises(BudgetError):
        AdaptInfer(layers=(0,))


# ------------------------------------------------------------------------------------------------ pure scoring


def test_text_query_rows_pads_fixed_width() -> None:
    # sample 0: [bos, img, img, t, t]; sample 1 (left padded): [pad, pad, bos, img, t]
    ctx = make_ctx(
        image=[[False, True, True, False, False], [False, False, False, True, False]],
        valid=[[True] * 5, [False, False, True, True, True]],
    )
    rows, valid = text_query_rows(ctx)
    assert rows.tolist() == [[0, 3, 4], [2, 4, 4]]
    assert valid.tolist() == [[True, True, True], [True, True, False]]


def test_text_query_rows_includes_last_even_if_visual() -> None:
    ctx = make_ctx(image=[[False, False, True, True]], valid=[[True] * 4])
    rows, valid = text_query_rows(ctx)
    assert rows.tolist() == [[0, 1, 3]] and valid.all()


def _probs(rows: list[list[float]]) -> torch.Tensor:
    p = torch.tensor(rows, dtype=torch.float32)
    return p[None, None]  # [1, 1, R, L]


def test_rater_scores_known_answer() -> None:
    # L = 5: positions 1, 2 visual. Rows: bos (0), text 3, text 4.
    image = torch.tensor([[False, True, True, False, False]])
    probs = _probs(
        [
            [1.0, 0.0, 0.0, 0.0, 0.0],  # bos: no visual mass
            [0.2, 0.6, 0.1, 0.1, 0.0],  # row 3: visual mass 0.7
            [0.3, 0.1, 0.3, 0.1, 0.2],  # row 4: visual mass 0.4
        ]
    )
    valid = torch.tensor([[True, True, True]])
    # mean relevance = (0 + 0.7 + 0.4) / 3 = 0.3667 -> raters rows 3 and 4
    assert rater_mask(probs, valid, image).tolist() == [[False, True, True]]
    scores = rater_scores(probs, valid, image)
    torch.testing.assert_close(scores[0, 1:3], torch.tensor([0.35, 0.2]))
    # an invalid (padding) row never rates, whatever it holds (NaN included)
    probs2 = torch.cat([probs, torch.full((1, 1, 1, 5), float("nan"))], dim=2)
    valid2 = torch.tensor([[True, True, True, False]])
    torch.testing.assert_close(rater_scores(probs2, valid2, image), scores)


def test_rater_scores_average_heads() -> None:
    image = torch.tensor([[True, True, False]])
    probs = torch.tensor([[[[0.5, 0.3, 0.2]], [[0.1, 0.7, 0.2]]]])  # [1, 2 heads, 1 row, 3]
    scores = rater_scores(probs, torch.tensor([[True]]), image)
    torch.testing.assert_close(scores[0, :2], torch.tensor([0.3, 0.5]))


def test_text_prior_and_adaptinfer_scores_known_answer() -> None:
    # L = 5: positions 1, 2 visual; query rows = text 0, 3, 4 (4 is the last token).
    rows = torch.tensor([[0, 3, 4]])
    valid = torch.tensor([[True, True, True]])
    probs = _probs(
        [
            [1.0, 0.0, 0.0, 0.0, 0.0],
            [0.1, 0.8, 0.0, 0.1, 0.0],  # row 3 looks at visual 1
            [0.2, 0.0, 0.4, 0.3, 0.1],  # last row: prior w = (0.2, 0.3, 0.1) / 0.6 over rows (0, 3, 4)
        ]
    )
    w = text_prior(probs, valid, rows)
    torch.testing.assert_close(w, torch.tensor([[1 / 3, 1 / 2, 1 / 6]]))
    s = prior_weighted_scores(probs, valid, rows)
    # s_1 = 0.5 * 0.8 = 0.4 ; s_2 = 1/6 * 0.4 = 0.0667: the text prior flips FastV's choice (last row: 0.0 vs 0.4)
    torch.testing.assert_close(s[0, 1:3], torch.tensor([0.4, 0.4 / 6]))


def test_text_prior_ignores_padding_rows() -> None:
    rows = torch.tensor([[0, 2, 2]])
    valid = torch.tensor([[True, True, False]])
    probs = _probs([[1.0, 0.0, 0.0], [0.25, 0.5, 0.25], [float("nan")] * 3])
    w = text_prior(probs, valid, rows)
    torch.testing.assert_close(w, torch.tensor([[0.5, 0.5, 0.0]]))
    assert torch.isfinite(prior_weighted_scores(probs, valid, rows)).all()


def test_recycle_pruned_merges_into_most_similar() -> None:
    hidden = torch.tensor(
        [
            [
                [9.0, 9.0, 9.0],  # text
                [1.0, 0.0, 0.0],  # kept visual
                [0.0, 2.0, 0.1],  # pruned, most like position 3
                [0.0, 1.0, 0.0],  # kept visual
                [2.0, 0.1, 0.0],  # pruned, most like position 1
            ]
        ]
    )
    kept = torch.tensor([[False, True, False, True, False]])
    pruned = torch.tensor([[False, False, True, False, True]])
    scores = torch.tensor([[0.0, 0.2, 0.1, 0.3, 0.2]])
    out = recycle_pruned(hidden, kept, pruned, scores)
    torch.testing.assert_close(out[0, 3], (0.3 * hidden[0, 3] + 0.1 * hidden[0, 2]) / 0.4)
    torch.testing.assert_close(out[0, 1], (0.2 * hidden[0, 1] + 0.2 * hidden[0, 4]) / 0.4)
    assert torch.equal(out[0, [0, 2, 4]], hidden[0, [0, 2, 4]])
    # nothing pruned: untouched
    assert recycle_pruned(hidden, kept, torch.zeros_like(pruned), scores) is hidden


def test_recycle_pruned_per_sample_and_untouched_rows() -> None:
    torch.manual_seed(0)
    hidden = torch.randn(2, 6, 4)
    kept = torch.tensor([[False, True, True, False, False, False], [False, True, True, False, False, False]])
    pruned = torch.tensor([[False, False, False, True, False, False], [False] * 6])
    out = recycle_pruned(hidden, kept, pruned, torch.rand(2, 6))
    assert torch.equal(out[1], hidden[1])
    changed = (out[0] != hidden[0]).any(dim=-1)
    assert changed.sum() == 1 and bool(changed[1] | changed[2])


# ------------------------------------------------------------------------------------------------ tiny LLaVA

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


# ------------------------------------------------------------------------------------------------ PyramidDrop, official


def test_pyramid_counts_floor_like_the_official_int() -> None:
    assert pyramid_counts(15, 2, 0.5) == [7, 3]  # int(7.5), int(3.75)
    assert pyramid_counts(15, 2, 0.5, "half_up") == [8, 4]
    assert PyramidDrop(layers=(2, 4), reference_layers=None).schedule(8, 15) == {2: 7, 4: 3}
    with pytest.raises(BudgetError):
        PyramidDrop(rounding="up")
    with pytest.raises(BudgetError):
        PyramidDrop(score_layer="next")


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


# ------------------------------------------------------------------------------------------------ SparseVLM, official


def test_embedding_raters_official_choice() -> None:
    # LM level: [bos, v, v, t, t, t]; text after the image: 3, 4, 5. e_v . e_t: token 3 matches both visual tokens.
    emb = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [1.0, 0.1], [4.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]])
    image = torch.tensor([[False, True, True, False, False, False]])
    valid = torch.ones(1, 6, dtype=torch.bool)
    ctx = make_ctx(image=image.tolist(), valid=valid.tolist())
    ctx.inputs_embeds, ctx.lm_image_mask, ctx.lm_valid, ctx.cols = emb, image, valid, torch.arange(6)[None]
    m = torch.softmax(emb[0, 1:3] @ emb[0, 3:].T, dim=1).mean(0)
    want = [3 + i for i in range(3) if m[i] > m.mean()]
    assert torch.nonzero(embedding_raters(ctx)[0]).flatten().tolist() == want == [3]
    # after a stage dropped visual token 2, the raters are the same LM-level tokens at their new slots
    ctx2 = make_ctx(image=[[False, True, False, False, False]], valid=[[True] * 5])
    ctx2.inputs_embeds, ctx2.lm_image_mask, ctx2.lm_valid = emb, image, valid
    ctx2.cols = torch.tensor([[0, 1, 3, 4, 5]])
    assert torch.nonzero(embedding_raters(ctx2)[0]).flatten().tolist() == [2]


def test_mean_row_scores_and_masked_rows() -> None:
    probs = torch.tensor([[[[0.5, 0.5], [0.1, 0.9]]]])  # [1, 1 head, 2 rows, 2]
    torch.testing.assert_close(mean_row_scores(probs, torch.tensor([[True, False]])), torch.tensor([[0.5, 0.5]]))
    rows, valid = masked_query_rows(torch.tensor([[False, False, False]]), torch.tensor([2]))
    assert rows.tolist() == [[2]] and valid.tolist() == [[True]]


def test_recycle_only_the_top_share_of_pruned_tokens() -> None:
    hidden = torch.tensor([[[1.0, 0.0], [0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]]])
    kept = torch.tensor([[True, False, False, False, False]])
    pruned = ~kept
    scores = torch.tensor([[1.0, 0.1, 0.4, 0.3, 0.2]])
    out = recycle_pruned(hidden, kept, pruned, scores, top=0.3)  # int(0.3 * 4) + 1 = 2: tokens 2 and 3
    want = (1.0 * hidden[0, 0] + 0.4 * hidden[0, 2] + 0.3 * hidden[0, 3]) / 1.7
    torch.testing.assert_close(out[0, 0], want)
