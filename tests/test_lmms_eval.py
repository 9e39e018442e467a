"""The lmms-eval model `vtokprune` (entry point, batched generate_until + loglikelihood) on the local toy tasks,
offline, end to end. Skipped when lmms-eval is not installed (CI installs it: pip install -e '.[lmms-eval]')."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
pytest.importorskip("lmms_eval")

from lmms_eval import evaluator  # noqa: E402
from lmms_eval.tasks import TaskManager  # noqa: E402

import vtokprune  # noqa: E402
from vtokprune.lmms import manifest, tasks_path  # noqa: E402
from vtokprune.lmms.model import VTokPruneLMM  # noqa: E402
from vtokprune.toyworld.scenes import ANSWERS  # noqa: E402

MODEL_ARGS = "strategy=visionzip,ratio=0.25,device=cpu,dtype=float32"


@pytest.fixture(scope="module")
def task_manager():
    return TaskManager("WARNING", include_path=tasks_path())


@pytest.fixture(scope="module")
def lm():
    from lmms_eval.models import get_model

    return get_model("vtokprune").create_from_arg_string(MODEL_ARGS, {"batch_size": 2, "device": None})


def test_entry_point_registered():
    eps = {ep.name: ep for ep in entry_points(group="lmms_eval.models")}
    assert "vtokprune" in eps and eps["vtokprune"].value == "vtokprune.lmms:manifest"
    m = manifest()
    assert m.model_id == "vtokprune" and m.simple_class_path == "vtokprune.lmms.model.VTokPruneLMM"
    from lmms_eval.models import get_model, list_available_models

    assert "vtokprune" in list_available_models()
    assert get_model("vtokprune") is VTokPruneLMM


def test_model_args_configure_pruning(lm):
    strategy = vtokprune.strategy_of(lm.model)
    assert strategy is not None and strategy.name == "visionzip" and strategy.ratio == 0.25
    assert lm.batch_size == 2 and str(lm.device) == "cpu"
    with pytest.raises(TypeError, match="accepts"):
        VTokPruneLMM.create_from_arg_string("strategy=cls,keep=4,device=cpu,bogus=1")
    with pytest.raises(NotImplementedError, match="multi-round"):
        lm.generate_until_multi_round([])


def test_generate_until_end_to_end(lm, task_manager):
    """lmms-eval's evaluator drives the pruned model over the local task at batch 2, offline."""
    lm.engine.reset_stats()
    results = evaluator.simple_evaluate(
        model=lm,
        tasks=["vtokprune_toy"],
        limit=6,
        batch_size=2,
        task_manager=task_manager,
        log_samples=True,
        bootstrap_iters=0,
    )
    metrics = results["results"]["vtokprune_toy"]
    assert 0.0 <= metrics["exact_match,none"] <= 1.0
    samples = results["samples"]["vtokprune_toy"]
    assert len(samples) == 6 and all(isinstance(s["filtered_resps"][0], str) for s in samples)
    for s in samples:  # kept visual tokens per sample, and what was evaluated
        counts = s["token_counts"][0]
        assert counts["strategy"].startswith("VisionZip(") and "ratio=0.25" in counts["strategy"]
        assert 0 < counts["visual_tokens_kept"] <= counts["visual_tokens_available"]
    assert results["throughput"]["avg_visual_tokens_kept"] > 0
    stats = lm.engine.stats.summary()
    available = stats["available_tokens"]  # per image: 256 for the shipped toy model, 16 for the tiny fallback
    assert available in (16, 256)
    assert stats["samples"] == 6 and stats["kept_tokens"] == math.ceil(0.25 * available)
    assert lm.engine.stats.batches == 3  # batch 2


def test_loglikelihood_end_to_end(lm, task_manager):
    """multiple_choice -> loglikelihood requests; scores reach lmms-eval's scorer as (loss, greedy) pairs."""
    results = evaluator.simple_evaluate(
        model=lm,
        tasks=["vtokprune_toy_mc"],
        limit=2,
        batch_size=2,
        task_manager=task_manager,
        log_samples=True,
        bootstrap_iters=0,
    )
    assert 0.0 <= results["results"]["vtokprune_toy_mc"]["acc,none"] <= 1.0
    resps = results["samples"]["vtokprune_toy_mc"][0]["filtered_resps"]
    assert len(resps) == len(ANSWERS) and all(isinstance(r[0], float) and r[0] > 0 for r in resps)


@pytest.mark.parametrize(
    ("model_args", "error", "message"),
    [
        ("strategy=cls,keep=4.5", vtokprune.BudgetError, "keep=4.5 is not a whole number"),
        ("strategy=cls,keep=abc", vtokprune.BudgetError, "keep='abc'"),
        ("strategy=cls,ratio=abc", vtokprune.BudgetError, "ratio='abc'"),
        ("strategy=cls,ratio=2", vtokprune.BudgetError, "ratio must be in"),
        ("strategy=cls,keep=4,ratio=0.5", vtokprune.BudgetError, "not both"),
        ("keep=4", vtokprune.VTokPruneError, "without a pruning strategy"),
        ("strategy=none,layer=2", vtokprune.VTokPruneError, "without a pruning strategy"),
        ("strategy=nope", vtokprune.UnknownStrategyError, "unknown strategy"),
        ("strategy=cls", vtokprune.BudgetError, "needs a budget"),
    ],
)
def test_bad_model_args_fail_before_loading(monkeypatch, model_args, error, message):
    import vtokprune.lmms.model as lmms_model

    monkeypatch.setattr(lmms_model, "load_model", lambda *a, **k: pytest.fail("model loaded before the args check"))
    with pytest.raises(error, match=message):
        VTokPruneLMM.create_from_arg_string(model_args + ",device=cpu")


def test_paper_default_budget_is_recorded(monkeypatch):
    import vtokprune.lmms.model as lmms_model

    monkeypatch.setattr(lmms_model, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    resolved = VTokPruneLMM._resolve("fastv", {}, {})
    assert resolved.ratio == vtokprune.FastV.default_budget["ratio"]


def test_strategy_record(lm):
    record = lm.strategy_record()
    assert record["vtokprune_version"] == vtokprune.__version__ and record["strategy"] == "visionzip"
    assert record["strategy_fields"]["ratio"] == 0.25 and "keep" in record["strategy_fields"]


def test_strategy_switch_without_reload(lm):
    model = lm.model
    lm.set_strategy("cls", keep=4)
    assert lm.model is model and vtokprune.strategy_of(model).name == "cls"
    lm.set_strategy("none")
    assert not vtokprune.is_pruned(model)
    lm.set_strategy("visionzip", ratio=0.25)


def test_sweep_lmms_eval_backend(tmp_path):
    from vtokprune import sweep

    report = sweep.run_sweep(
        strategies=["cls"],
        budgets=["4"],
        limit=2,
        out=tmp_path,
        backend="lmms-eval",
        batch_size=2,
        device="cpu",
        dtype="float32",
        plots=False,
        quiet=True,
    )
    assert report["computed"] == 2
    cells = {c["strategy"]: c for c in report["cells"]}
    assert all(c["status"] == "ok" for c in cells.values()), cells
    assert cells["cls"]["metric"] == "exact_match" and cells["cls"]["kept_tokens"] == 4
    assert (
        sweep.run_sweep(
            strategies=["cls"], budgets=["4"], limit=2, out=tmp_path, backend="lmms-eval", quiet=True, plots=False
        )["computed"]
        == 0
    )


@pytest.mark.slow
def test_lmms_eval_cli(tmp_path):
    """The command users run: `python -m lmms_eval --model vtokprune ... --include_path <vtokprune tasks>`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    cmd = [
        sys.executable,
        "-m",
        "lmms_eval",
        "--model",
        "vtokprune",
        "--model_args",
        MODEL_ARGS,
        "--tasks",
        "vtokprune_toy",
        "--include_path",
        tasks_path(),
        "--batch_size",
        "2",
        "--limit",
        "4",
        "--output_path",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "exact_match" in proc.stdout + proc.stderr
    assert list(tmp_path.rglob("*results*.json"))
