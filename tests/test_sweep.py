"""`vtokprune sweep` (in-process backend, embedded model, local toy task) and the shared batched engine."""

from __future__ import annotations

import json

import pytest
import torch

import vtokprune
import vtokprune.compute
from vtokprune import sweep
from vtokprune.lmms.engine import Engine, load_model
from vtokprune.lmms.tasks import DATA_FILE, load_docs, rows
from vtokprune.lmms.tasks.vtokprune_toy import utils
from vtokprune.toyworld.scenes import IMAGE_SIZE, NUM_PATCHES


@pytest.fixture(scope="module")
def engine():
    model, processor, description = load_model(None, dtype="float32", device="cpu")
    return Engine(model, processor, description)


def test_task_data_is_deterministic_and_shipped():
    shipped = [json.loads(line) for line in DATA_FILE.read_text().splitlines()[:6]]
    assert shipped == rows(6)
    assert len(load_docs("vtokprune_toy", limit=5)) == 5
    assert utils.exact_match("Yes.", "yes") == 1.0 and utils.exact_match("no", "yes") == 0.0
    doc = shipped[0]
    assert utils.doc_to_choice(doc)[utils.doc_to_choice_index(doc)] == doc["answer"]
    assert utils.doc_to_visual(doc)[0].size == (IMAGE_SIZE, IMAGE_SIZE)


def test_engine_batches_match_single_requests(engine):
    """Left padding: a batch of 3 gives the same answers and scores as one request at a time, pruned or not."""
    docs = load_docs(limit=3)
    texts = [utils.doc_to_text(d) + " extra words" * i for i, d in enumerate(docs)]  # different prompt lengths
    images = [utils.doc_to_visual(d) for d in docs]
    for strategy in (None, vtokprune.get_strategy("cls", ratio=0.25), vtokprune.get_strategy("fastv", ratio=0.5)):
        engine.set_strategy(strategy)
        batched = engine.generate(texts, images, {"max_new_tokens": 3})
        single = [engine.generate([t], [im], {"max_new_tokens": 3})[0] for t, im in zip(texts, images)]
        assert batched == single
        ll_batched = engine.loglikelihood(texts, [" yes", " red", " two"], images)
        ll_single = [
            engine.loglikelihood([t], [c], [im])[0] for t, c, im in zip(texts, [" yes", " red", " two"], images)
        ]
        for (a, ga), (b, gb) in zip(ll_batched, ll_single):
            # float32 sums over padded vs unpadded rows: equal up to rounding (relative to the magnitude)
            assert a == pytest.approx(b, rel=5e-5, abs=1e-4) and ga == gb and a < 0
    engine.set_strategy(None)
    assert not vtokprune.is_pruned(engine.model)


def test_engine_counts_kept_tokens(engine):
    docs = load_docs(limit=2)
    engine.set_strategy(vtokprune.get_strategy("random", keep=4))
    engine.reset_stats()
    engine.generate([utils.doc_to_text(d) for d in docs], [utils.doc_to_visual(d) for d in docs], {"max_new_tokens": 1})
    summary = engine.stats.summary()
    assert summary["kept_tokens"] == 4 and summary["available_tokens"] > 4 and summary["samples"] == 2
    engine.set_strategy(None)


def test_parse_budget():
    assert sweep.parse_budget("64") == sweep.Budget(keep=64)
    assert sweep.parse_budget("0.25").label == "ratio=0.25"
    for bad in ("0", "1.5", "abc", "-3"):
        with pytest.raises(ValueError):
            sweep.parse_budget(bad)


def test_sweep_writes_results_and_resumes(tmp_path):
    pytest.importorskip("matplotlib")
    torch.manual_seed(0)
    kwargs = dict(
        strategies=["cls", "random"],
        budgets=["0.5", "4"],
        limit=4,
        out=tmp_path,
        batch_size=2,
        device="cpu",
        dtype="float32",
        quiet=True,
    )
    first = sweep.run_sweep(**kwargs)
    assert first["computed"] == 5  # unpruned + 2 strategies x 2 budgets
    assert all(c["status"] == "ok" for c in first["cells"]), first["cells"]
    cells = {(c["strategy"], c["budget"]): c for c in first["cells"]}
    assert cells[("cls", "keep=4")]["kept_tokens"] == 4
    assert cells[("cls", "ratio=0.5")]["kept_tokens"] < cells[("none", "full")]["kept_tokens"]
    for name in ("results.json", "results.csv", "accuracy.png", "latency.png"):
        assert (tmp_path / name).stat().st_size > 0
    for name in ("accuracy.png", "latency.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    csv_lines = (tmp_path / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("task,strategy,budget,kept_tokens") and len(csv_lines) == 6
    saved = (tmp_path / "results.json").read_text()

    second = sweep.run_sweep(**kwargs)  # resumed: nothing recomputed, nothing changed
    assert second["computed"] == 0
    assert (tmp_path / "results.json").read_text() == saved

    third = sweep.run_sweep(**{**kwargs, "budgets": ["0.5", "4", "2"]})  # one new budget: only its cells run
    assert third["computed"] == 2 and len(third["cells"]) == 7


def test_sweep_records_errors_and_mc_task(tmp_path):
    report = sweep.run_sweep(
        strategies=["cls"],
        budgets=["999"],
        tasks=["vtokprune_toy_mc"],
        limit=1,
        out=tmp_path,
        batch_size=8,
        device="cpu",
        dtype="float32",
        plots=False,
        quiet=True,
    )
    by = {(c["task"], c["strategy"]): c for c in report["cells"]}
    assert by[("vtokprune_toy_mc", "none")]["status"] == "ok"
    assert by[("vtokprune_toy_mc", "none")]["metric"] == "acc"
    assert by[("vtokprune_toy_mc", "cls")]["status"] == "error" and "999" in by[("vtokprune_toy_mc", "cls")]["error"]
    # no pruned cell succeeded: the command exits non-zero with the reason
    assert "no pruned cell succeeded" in (sweep.failure_reason(report["cells"]) or "")


def test_sweep_without_a_successful_pruned_cell_exits_nonzero(tmp_path, capsys):
    argv = ["--strategies", "cls", "--budgets", "999", "--limit", "1", "--out", str(tmp_path), "--no-plots"]
    assert sweep.main([*argv, "--device", "cpu", "--dtype", "float32"]) == 1
    err = capsys.readouterr().err
    assert "no pruned cell succeeded" in err and "keep=999" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tasks", "nope"], "unknown task 'nope'"),
        (["--tasks", ","], "names no task"),
        (["--strategies", ",,"], "names no strategy"),
        (["--strategies", "clss"], "did you mean 'cls'"),
        (["--budgets", "abc"], "neither a token count"),
        (["--set", "lyer=2"], "parameter 'lyer'"),
        (["--processes", "2"], "--backend lmms-eval"),
    ],
)
def test_sweep_argument_errors_exit_nonzero_before_loading(tmp_path, capsys, monkeypatch, argv, message):
    from vtokprune import cli

    monkeypatch.setattr(
        sweep.engine, "BACKENDS", {**sweep.BACKENDS, "inprocess": lambda *a: pytest.fail("model loaded")}
    )
    assert cli.main(["sweep", *argv, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


def test_sweep_reports_intervals_compute_environment_and_floor_check(tmp_path):
    pytest.importorskip("matplotlib")
    report = sweep.run_sweep(
        strategies=["random", "fastv"],
        budgets=["64"],
        limit=4,
        out=tmp_path,
        batch_size=4,
        device="cpu",
        dtype="float32",
        quiet=True,
        params={"fastv.layer": 1},
        match_compute=True,
    )
    cells = {(c["strategy"], c["budget"], c.get("matched_to")): c for c in report["cells"]}
    assert all(c["status"] == "ok" for c in cells.values()), cells
    for c in cells.values():
        assert c["samples"] == 4 and c["ci_low"] <= c["accuracy"] <= c["ci_high"]
        assert c["avg_visual_tokens"] > 0 and c["prefill_tflops"] > 0 and c["keep_means"]
    fastv = cells[("fastv", "keep=64", None)]
    assert fastv["strategy_config"].startswith("FastV(keep=64") and "layer=1" in fastv["strategy_config"]
    assert fastv["params"] == "fastv.layer=1"
    # FastV after layer 1 of the toy's L layers: (256 + (L - 1) * 64) / L visual tokens on average
    layers = vtokprune.compute.DecoderShape.from_config(load_model(None)[0].config).num_layers
    assert fastv["avg_visual_tokens"] == pytest.approx((NUM_PATCHES + (layers - 1) * 64) / layers, abs=0.01)
    matched = cells[("random", f"keep={fastv['equivalent_keep']}", "fastv keep=64")]
    assert matched["avg_visual_tokens"] == fastv["equivalent_keep"]
    assert cells[("none", "full", None)]["prefill_tflops"] > fastv["prefill_tflops"] > matched["prefill_tflops"] * 0
    saved = json.loads((tmp_path / "results.json").read_text())
    env = saved["environment"]
    for key in ("vtokprune", "torch", "transformers", "device", "dtype", "torch_threads", "git_sha"):
        assert key in env
    assert env["device"] == "cpu" and env["dtype"] == "torch.float32"
    assert saved["checks"] and saved["checks"][0]["check"] == "random_floor"
    assert {"passed", "drop", "intervals_separate"} <= set(report["checks"][0])
    header = (tmp_path / "results.csv").read_text().splitlines()[0]
    assert "ci_low" in header and "prefill_tflops" in header and "avg_visual_tokens" in header
    text = sweep.table(report["cells"])
    assert "| n |" in text and "[" in text and "matched to" in text


def test_wilson_interval():
    from vtokprune.reporting import wilson_interval

    low, high = wilson_interval(0.5, 100)
    assert low == pytest.approx(0.4038, abs=1e-3) and high == pytest.approx(0.5962, abs=1e-3)
    assert wilson_interval(0.0, 10)[0] == 0.0 and wilson_interval(1.0, 10)[1] == 1.0
    with pytest.raises(ValueError):
        wilson_interval(0.5, 0)


def test_sweep_cli(tmp_path, capsys):
    code = sweep.main(
        [
            "--strategies",
            "pool",
            "--budgets",
            "0.25",
            "--limit",
            "2",
            "--out",
            str(tmp_path),
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--no-plots",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "| vtokprune_toy | pool |" in out and (tmp_path / "results.csv").exists()


def test_sweep_rejects_unknown_strategy(tmp_path):
    with pytest.raises(vtokprune.UnknownStrategyError):
        sweep.run_sweep(strategies=["nonexistent"], out=tmp_path, quiet=True)
    assert not (tmp_path / "results.json").exists()


def test_sweep_command_is_registered():
    from vtokprune.cli_commands import COMMANDS

    assert COMMANDS["sweep"][:2] == ("vtokprune.sweep", "main")
