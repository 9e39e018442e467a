"""Decoder-side strategies' pure scoring functions on hand-built tensors with known answers: SparseVLM's text query
rows, raters and recycling (as the official code chooses them), AdaptInfer's text prior."""

from __future__ import annotations

import torch

from vtokprune.strategies.adaptinfer import prior_weighted_scores, text_prior
from vtokprune.strategies.base import LLMContext
from vtokprune.strategies.sparsevlm import (
    embedding_raters,
    masked_query_rows,
    mean_row_scores,
    rater_mask,
    rater_scores,
    recycle_pruned,
    text_query_rows,
)


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
