"""benchmarks/cpu_prefill.py --smoke runs in seconds and reports every row it promises."""

from __future__ import annotations

import vtokprune

from .test_benchmarks_smoke import _run


def test_cpu_prefill_smoke(tmp_path):
    data = _run("cpu_prefill.py", tmp_path)
    rows = {r["row"]: r for r in data["results"]}
    assert {"none", "ideal", "ideal@L0", "cls@L0", "visionzip@L0", "flowcut@L0"} <= set(rows)
    skipped = data["skipped"]  # every strategy left out says why
    assert all(isinstance(why, str) and why for why in skipped.values()) and len(skipped) <= 6
    expected = set(vtokprune.available_strategies()) - set(skipped)
    assert expected <= set(rows)
    assert not [r for r in rows.values() if "error" in r]
    assert all(r["ms"] > 0 for r in rows.values())
    assert all("share_of_ideal_%" in rows[name] and "overhead_ms" in rows[name] for name in expected)
    assert all(r["ms_ci"][0] <= r["ms"] <= r["ms_ci"][1] for r in rows.values())
    assert all(rows[name]["pruning_steps_ms"] > 0 for name in expected)  # the pruning steps were timed in place
    assert "pruning_steps_ms" not in rows["none"]
    env = data["env"]
    assert env["cpu"] and env["torch_threads"] >= 1 and env["loadavg"] and "git_sha" in env
