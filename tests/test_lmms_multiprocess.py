"""lmms-eval past one process: the `vtokprune` model under `torchrun --nproc_per_node 2` on CPU (gloo) gives the same
per-sample answers and aggregate as one process, each rank having evaluated its own shard; bad model arguments stop
the lmms-eval command with a non-zero status."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval")

import vtokprune  # noqa: E402
from vtokprune.lmms import tasks_path  # noqa: E402

ROOT = Path(vtokprune.__file__).resolve().parents[1]
TASK_ARGS = ["--tasks", "vtokprune_toy", "--include_path", tasks_path(), "--batch_size", "2", "--limit", "8"]


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),  # this checkout's vtokprune
    }


def _lmms_eval(prefix: list[str], model_args: str, out: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    cmd = [*prefix, "lmms_eval", "--model", "vtokprune", "--model_args", model_args, *TASK_ARGS]
    cmd += ["--log_samples", "--output_path", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600, cwd=cwd)


def _read(out: Path) -> tuple[dict, list[dict]]:
    results = json.loads(next(out.rglob("*_results.json")).read_text())
    lines = next(out.rglob("*_samples_vtokprune_toy.jsonl")).read_text().splitlines()
    return results, sorted((json.loads(line) for line in lines), key=lambda s: s["doc_id"])


@pytest.mark.slow
def test_two_cpu_processes_match_one(tmp_path):
    args = "strategy=cls,keep=64,device=cpu,dtype=float32"
    single = _lmms_eval([sys.executable, "-m"], args, tmp_path / "single", tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517", "-m"]
    multi = _lmms_eval(torchrun, args, tmp_path / "multi", tmp_path)
    assert multi.returncode == 0, multi.stderr[-3000:]
    (one, one_samples), (two, two_samples) = _read(tmp_path / "single"), _read(tmp_path / "multi")

    assert [s["doc_id"] for s in one_samples] == [s["doc_id"] for s in two_samples] == list(range(8))
    assert [s["filtered_resps"] for s in one_samples] == [s["filtered_resps"] for s in two_samples]
    assert [s["exact_match"] for s in one_samples] == [s["exact_match"] for s in two_samples]
    metric = "exact_match,none"
    assert one["results"]["vtokprune_toy"][metric] == two["results"]["vtokprune_toy"][metric]

    # each rank evaluated its own shard (lmms-eval deals documents round-robin), and logged what it kept
    ranks = {s["doc_id"]: s["token_counts"][0]["rank"] for s in two_samples}
    assert {d for d, r in ranks.items() if r == 0} == {0, 2, 4, 6}
    assert {d for d, r in ranks.items() if r == 1} == {1, 3, 5, 7}
    assert all(s["token_counts"][0]["rank"] == 0 for s in one_samples)
    for s in one_samples + two_samples:
        counts = s["token_counts"][0]
        assert counts["strategy"].startswith("CLSAttention(keep=64")
        assert 0 < counts["visual_tokens_kept"] <= counts["visual_tokens_available"]
        assert counts["input_tokens"] > 0 and counts["output_tokens"] >= 0
    for results in (one, two):
        throughput = results["throughput"]
        assert throughput["avg_samples"] == 8  # rank 0's summary covers both shards
        assert 0 < throughput["avg_visual_tokens_kept"] <= throughput["avg_visual_tokens_available"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model_args", "message"),
    [
        ("strategy=nope,keep=4", "unknown strategy"),
        ("strategy=cls,keep=4.5", "keep=4.5 is not a whole number"),
        ("keep=4", "without a pruning strategy"),
    ],
)
def test_bad_model_args_exit_nonzero(tmp_path, model_args, message):
    proc = _lmms_eval([sys.executable, "-m"], model_args + ",device=cpu", tmp_path / "out", tmp_path)
    assert proc.returncode != 0
    assert "vtokprune: error: " in proc.stderr and message in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_sweep_hands_its_lmms_eval_cells_to_torchrun(tmp_path):
    """`vtokprune sweep --backend lmms-eval --processes 2` relaunches itself under torchrun: same accuracies as one
    process, one results file written by rank 0, which records the world size."""
    common = ["--backend", "lmms-eval", "--strategies", "cls", "--budgets", "64", "--limit", "6", "--batch-size", "2"]
    common += ["--device", "cpu", "--dtype", "float32", "--no-plots"]
    cells = {}
    for processes in (1, 2):
        out = tmp_path / f"p{processes}"
        cmd = [
            sys.executable,
            "-m",
            "vtokprune.cli",
            "sweep",
            *common,
            "--out",
            str(out),
            "--processes",
            str(processes),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        data = json.loads((out / "results.json").read_text())
        assert data["environment"]["world_size"] == processes
        cells[processes] = {c["strategy"]: c for c in data["cells"]}
    for strategy in ("none", "cls"):
        one, two = cells[1][strategy], cells[2][strategy]
        assert one["status"] == two["status"] == "ok" and one["samples"] == two["samples"] == 6
        assert one["accuracy"] == two["accuracy"] and one["ci_low"] == two["ci_low"]
    assert cells[2]["cls"]["kept_tokens"] == 64
