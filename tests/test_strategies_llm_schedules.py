"""Decoder-side strategies' layer schedules: PyramidDrop (its stage counts, layer scaling, rounding, rejected
configurations), SparseVLM and AdaptInfer. Pure scoring functions: tests/test_strategies_llm_scoring.py; the strategies
on the tiny LLaVA: tests/test_strategies_llm_tiny_llava.py."""

from __future__ import annotations

import pytest

from vtokprune.errors import BudgetError
from vtokprune.registry import get_strategy
from vtokprune.strategies.adaptinfer import AdaptInfer
from vtokprune.strategies.pdrop import PyramidDrop, geometric_counts, pyramid_counts, scale_layer
from vtokprune.strategies.sparsevlm import SparseVLM


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


def test_pyramid_counts_floor_like_the_official_int() -> None:
    assert pyramid_counts(15, 2, 0.5) == [7, 3]  # int(7.5), int(3.75)
    assert pyramid_counts(15, 2, 0.5, "half_up") == [8, 4]
    assert PyramidDrop(layers=(2, 4), reference_layers=None).schedule(8, 15) == {2: 7, 4: 3}
    with pytest.raises(BudgetError):
        PyramidDrop(rounding="up")
    with pytest.raises(BudgetError):
        PyramidDrop(score_layer="next")
