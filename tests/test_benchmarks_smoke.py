"""The benchmark scripts' --smoke modes (tiny shapes on the CPU) still run: they must not rot between GPU sessions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, tmp_path: Path) -> dict:
    out = tmp_path / "out.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--json", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_kernel_bench_smoke(tmp_path):
    data = _run("kernel_bench.py", tmp_path)
    assert data["smoke"] and data["results"]
    assert {r["backend"] for r in data["results"]} >= {"torch"}
    assert all(r.get("agrees", True) for r in data["results"])


@pytest.mark.slow
def test_gpu_prefill_smoke(tmp_path):
    data = _run("gpu_prefill.py", tmp_path)
    rows = data["results"]
    llava = [r for r in rows if r["model"].startswith("llava") and "error" not in r]
    assert {r["strategy"] for r in llava} >= {"none", "cls", "fastv", "fastv/eager"}
    assert all(r["ttft_ms"] > 0 and r["TFLOPs"] > 0 for r in llava)
    pruned = [r for r in llava if r["strategy"] != "none"]
    base = next(r for r in llava if r["strategy"] == "none")
    assert all(r["TFLOPs"] < base["TFLOPs"] for r in pruned)
