"""What every benchmark result carries besides its number: a 95% interval with its n, the environment it ran in,
and the validity check that pruning at the lowest budget actually costs accuracy (random vs unpruned)."""

from __future__ import annotations

import math
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

Z95 = 1.959963984540054


def wilson_interval(accuracy: float, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a proportion `accuracy` measured on `n` questions (exact at 0 and 1)."""
    if n <= 0:
        raise ValueError(f"an interval needs at least one question, got n={n}")
    if not 0.0 <= accuracy <= 1.0:
        raise ValueError(f"accuracy {accuracy} is not a proportion in [0, 1]")
    denom = 1 + z * z / n
    centre = (accuracy + z * z / (2 * n)) / denom
    half = z * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n)) / denom
    low, high = max(0.0, centre - half), min(1.0, centre + half)
    # exact at the ends: floating point leaves 1 - 1e-16 where the closed form gives 1
    return (0.0 if accuracy == 0.0 else low), (1.0 if accuracy == 1.0 else high)


def add_interval(cell: dict[str, Any]) -> dict[str, Any]:
    """Set `ci_low`/`ci_high` (95% Wilson) on a result whose accuracy is a proportion over `samples` questions."""
    accuracy, n = cell.get("accuracy"), int(cell.get("samples") or 0)
    if isinstance(accuracy, (int, float)) and 0.0 <= accuracy <= 1.0 and n > 0:
        low, high = wilson_interval(float(accuracy), n)
        cell["ci_low"], cell["ci_high"] = round(low, 4), round(high, 4)
    return cell


def format_accuracy(cell: dict[str, Any]) -> str:
    """ "57.3 [51.2-63.1]" (percent, 95% interval) or the bare number when there is no interval."""
    accuracy = cell.get("accuracy")
    if accuracy is None:
        return "-"
    if cell.get("ci_low") is None:
        return f"{100 * float(accuracy):.1f}"
    return f"{100 * float(accuracy):.1f} [{100 * cell['ci_low']:.1f}-{100 * cell['ci_high']:.1f}]"


def _git_sha() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    if out.returncode != 0 or not sha:
        return None
    dirty = subprocess.run(
        ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    ).stdout.strip()
    return sha + ("+dirty" if dirty else "")


def environment(device: Any = None, dtype: Any = None) -> dict[str, Any]:
    """Versions, device, dtype, threads and git sha: enough to tell whether two results files are comparable."""
    import torch
    import transformers

    from . import __version__

    env: dict[str, Any] = {
        "vtokprune": __version__,
        "git_sha": _git_sha(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device) if device is not None else None,
        "dtype": str(dtype) if dtype is not None else None,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
    }
    try:
        from importlib.metadata import version

        env["lmms_eval"] = version("lmms_eval")
    except Exception:
        env["lmms_eval"] = None
    return env


def random_floor_check(cells: list[dict[str, Any]], min_drop: float = 0.10) -> list[dict[str, Any]]:
    """Per task: random selection at the lowest budget vs unpruned. A benchmark on which random at the lowest budget
    is not clearly below unpruned (by `min_drop`, and with disjoint 95% intervals) cannot rank pruning methods."""
    checks = []
    ok = [c for c in cells if c.get("status") == "ok" and c.get("accuracy") is not None]
    for task in dict.fromkeys(c["task"] for c in ok):
        full = next((c for c in ok if c["task"] == task and c["strategy"] == "none"), None)
        randoms = [c for c in ok if c["task"] == task and c["strategy"] == "random" and c.get("kept_tokens")]
        if full is None or not randoms:
            continue
        lowest = min(randoms, key=lambda c: float(c["kept_tokens"]))
        drop = float(full["accuracy"]) - float(lowest["accuracy"])
        separated = (
            lowest.get("ci_high") is not None and full.get("ci_low") is not None and lowest["ci_high"] < full["ci_low"]
        )
        checks.append(
            {
                "check": "random_floor",
                "task": task,
                "budget": lowest["budget"],
                "unpruned": full["accuracy"],
                "random": lowest["accuracy"],
                "drop": round(drop, 4),
                "min_drop": min_drop,
                "intervals_separate": separated,
                "passed": drop >= min_drop and separated,
            }
        )
    return checks


__all__ = ["add_interval", "environment", "format_accuracy", "random_floor_check", "wilson_interval"]
