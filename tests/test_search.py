"""Searched budgets: G-Search, P-Sigmoid, schedule files and the `scheduled` strategy, on tiny models (seconds)."""

from __future__ import annotations

import json

import pytest
import torch

import vtokprune
from vtokprune.errors import BudgetError, VTokPruneError
from vtokprune.search import Calibration, fit_counts, read_schedule, search, stages
from vtokprune.search.greedy import candidate_counts, greedy_search
from vtokprune.search.psigmoid import sigmoid_shape
from vtokprune.testing import llava_inputs, tiny_llava

LAYERS, TOKENS = 4, 64


@pytest.fixture(scope="module")
def model():
    return tiny_llava(text_layers=LAYERS, image_size=112).eval()


@pytest.fixture(scope="module")
def calibration(model):
    batches = [llava_inputs(model, [[5, 6, 7, 8 + i], [9, 10, 11 + i]], seed=i) for i in range(2)]
    return Calibration(batches, [7, 8, 9, 10], "synthetic")


def test_greedy_search_finds_smallest_counts_on_a_known_objective():
    # objective: fine as long as layer 1 keeps >= 32 and layer 2 onwards >= 8
    def objective(counts):
        return float(counts[1] >= 32 and min(counts[2:]) >= 8)

    counts = greedy_search(objective, 4, 64, threshold=1.0, levels=16)
    assert counts == [64, 32, 8, 8]
    assert candidate_counts(64, 4) == [16, 32, 48, 64]


def test_fit_counts_meets_average_and_refuses_unreachable_targets():
    shape = sigmoid_shape(LAYERS, 8.0, 0.5, 0.1)
    assert shape[0] == 1.0 and all(b <= a for a, b in zip(shape, shape[1:]))
    counts = fit_counts(shape, TOKENS, lambda c: sum(c) / len(c), 30.0)
    assert sum(counts) / len(counts) == 30.0 and counts[0] == TOKENS
    assert all(b <= a for a, b in zip(counts, counts[1:]))
    with pytest.raises(BudgetError, match="below the cheapest"):
        fit_counts(shape, TOKENS, lambda c: sum(c) / len(c), 10.0)


def test_greedy_search_meets_target_writes_file_and_resumes(model, calibration, tmp_path):
    state, out = tmp_path / "state.json", tmp_path / "s.json"
    first = search(model, calibration, avg_tokens=30, levels=8, state=state, out=out, progress=False)
    assert first.compute["avg_visual_tokens"] == 30.0 and first.counts[0] == TOKENS
    assert first.computed > 0
    record = read_schedule(out)
    assert record["counts"] == first.counts and record["num_layers"] == LAYERS and record["visual_tokens"] == TOKENS
    assert record["model_type"] == "llava" and record["seed"] == 0 and record["settings"]["method"] == "greedy"
    assert "vtokprune_version" in record and record["compute"]["avg_visual_tokens"] == 30.0
    again = search(model, calibration, avg_tokens=30, levels=8, state=state, out=out, progress=False)
    assert again.counts == first.counts and again.scores == first.scores and again.computed == 0
    fresh = search(model, calibration, avg_tokens=30, levels=8, progress=False)  # no state: same answer
    assert fresh.counts == first.counts


def test_interrupted_search_resumes_to_the_same_result(model, calibration, tmp_path):
    full = search(model, calibration, avg_tokens=30, levels=8, progress=False)
    state = tmp_path / "state.json"
    calls = {"n": 0}

    from vtokprune.search import evaluator as ev

    original = ev.ScheduleEvaluator.scores

    def failing(self, *args, **kwargs):
        if self.computed >= 2:
            raise KeyboardInterrupt
        calls["n"] += 1
        return original(self, *args, **kwargs)

    ev.ScheduleEvaluator.scores = failing  # type: ignore[method-assign]
    try:
        with pytest.raises(KeyboardInterrupt):
            search(model, calibration, avg_tokens=30, levels=8, state=state, progress=False)
    finally:
        ev.ScheduleEvaluator.scores = original  # type: ignore[method-assign]
    assert len(json.loads(state.read_text())["evaluations"]) == 2
    resumed = search(model, calibration, avg_tokens=30, levels=8, state=state, progress=False)
    assert resumed.counts == full.counts and resumed.computed == full.computed - 2


def test_psigmoid_is_deterministic_under_a_seed(model, calibration):
    pytest.importorskip("optuna")
    a = search(model, calibration, method="psigmoid", avg_tokens=30, trials=4, seed=3, progress=False)
    b = search(model, calibration, method="psigmoid", avg_tokens=30, trials=4, seed=3, progress=False)
    assert a.counts == b.counts and a.params == b.params
    assert a.compute["avg_visual_tokens"] == 30.0
    tflops = search(model, calibration, method="psigmoid", tflops=a.compute["prefill_tflops"], trials=2, progress=False)
    assert tflops.compute["prefill_tflops"] <= a.compute["prefill_tflops"] + 1e-12


def test_psigmoid_without_optuna_names_the_extra(model, calibration, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_optuna(name, *args, **kwargs):
        if name == "optuna":
            raise ImportError("no optuna")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_optuna)
    with pytest.raises(VTokPruneError, match=r"pip install 'vtokprune\[search\]'"):
        search(model, calibration, method="psigmoid", avg_tokens=30, trials=2, progress=False)


def test_schedule_file_round_trip_through_apply(model, calibration, tmp_path):
    out = tmp_path / "s.json"
    result = search(model, calibration, avg_tokens=30, levels=8, out=out, progress=False)
    strategy = vtokprune.get_strategy("scheduled", file=str(out))
    assert strategy.schedule(LAYERS, TOKENS) == stages(result.counts)
    inputs = calibration.batches[0]
    with vtokprune.pruned(model, strategy), torch.inference_mode():
        model(**inputs)
        sel = vtokprune.last_selection(model)
    assert sel is not None
    for layer, kept in stages(result.counts).items():
        assert all(len(k) == kept for k in sel.stages[layer])
    same = vtokprune.get_strategy("scheduled", counts=tuple(result.counts))
    assert torch.equal(_logits(model, same, inputs), _logits(model, strategy, inputs))
    # a budget scales the shape so the deepest layer keeps exactly `keep`
    scaled = vtokprune.get_strategy("scheduled", file=str(out), keep=4)
    assert scaled.per_layer(LAYERS, TOKENS)[-1] == 4
    # another image size keeps the same fractions
    assert vtokprune.get_strategy("scheduled", file=str(out)).per_layer(LAYERS, 128)[0] == 128


def _logits(model, strategy, inputs):
    with vtokprune.pruned(model, strategy), torch.inference_mode():
        return model(**inputs).logits


def test_bad_inputs_raise_clear_errors(model, calibration, tmp_path):
    with pytest.raises(BudgetError, match="does not exist"):
        vtokprune.get_strategy("scheduled", file=str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(BudgetError, match="not a vtokprune schedule file"):
        vtokprune.get_strategy("scheduled", file=str(bad))
    with pytest.raises(BudgetError, match="never increase"):
        vtokprune.get_strategy("scheduled", counts=(64, 10, 20, 5))
    with pytest.raises(BudgetError, match="layer 0"):
        vtokprune.get_strategy("scheduled", counts=(32, 10, 5, 5), tokens=64)
    strategy = vtokprune.get_strategy("scheduled", counts=(64, 32, 16))
    try:
        with pytest.raises(BudgetError, match="has 3 layers but this model's decoder has 4"):
            vtokprune.apply(model, strategy)
            model(**calibration.batches[0])
    finally:
        if vtokprune.strategy_of(model) is not None:
            vtokprune.remove(model)
    with pytest.raises(BudgetError, match="below the cheapest"):
        search(model, calibration, avg_tokens=5, progress=False)
    with pytest.raises(BudgetError, match="psigmoid needs a compute target"):
        search(model, calibration, method="psigmoid", progress=False)
    with pytest.raises(BudgetError, match="unknown search method"):
        search(model, calibration, method="grid", progress=False)
    with pytest.raises(BudgetError, match="one compute target"):
        search(model, calibration, avg_tokens=30, tflops=1.0, progress=False)
    unlabelled = Calibration(calibration.batches, None, "x")
    with pytest.raises(BudgetError, match="needs labelled"):
        search(model, unlabelled, objective="accuracy", progress=False)
    state = tmp_path / "state.json"
    search(model, calibration, avg_tokens=30, levels=4, state=state, progress=False)
    with pytest.raises(BudgetError, match="another model, calibration set or family"):
        search(model, calibration, family="pdrop", avg_tokens=30, levels=4, state=state, progress=False)


def test_cli_search_errors_are_one_line(capsys):
    from vtokprune.cli import main

    assert main(["search", "--calibration", "gqa"]) == 2
    assert "use toy (the toy world's training split) or lmms:TASK" in capsys.readouterr().err


def test_keep_for_average_matches_fixed_strategies_to_a_target():
    from vtokprune.compute import average_visual_tokens
    from vtokprune.search.compare import keep_for_average

    keep, avg = keep_for_average("pdrop", 200.0, 32, 576)
    assert abs(avg - 200.0) <= 1.0
    assert avg == average_visual_tokens(vtokprune.get_strategy("pdrop", keep=keep), 32, 576)
    with pytest.raises(BudgetError, match="cannot average"):
        keep_for_average("fastv", 20.0, 4, 64)


def test_measured_average_reads_the_stages(model, calibration):
    from vtokprune.search.compare import measured_average

    strategy = vtokprune.get_strategy("scheduled", counts=(64, 32, 16, 16))
    with vtokprune.pruned(model, strategy), torch.inference_mode():
        model(**calibration.batches[0])
        averages = measured_average(vtokprune.last_selection(model), LAYERS)
    assert averages == [32.0, 32.0]
