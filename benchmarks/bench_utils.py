"""Helpers shared by the benchmark scripts: timing (CUDA events on a GPU, perf_counter on the CPU), random-weight
LLaVA models of a given geometry and their inputs, the machine description, tables and JSON."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from typing import Any

import torch

from vtokprune import testing as tiny

PROMPT_VOCAB = (10, 90)  # text ids that are no special token in any of our configs

# Peak HBM bandwidth (bytes/s) of the GPUs we expect to meet, matched on the device name.
HBM_PEAK = [
    ("H200", 4.8e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),  # SXM / HBM3
    ("A100-SXM4-80GB", 2.039e12),
    ("A100", 1.555e12),
    ("L40S", 0.864e12),
]


def hbm_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in HBM_PEAK:
        if key in name:
            return peak
    return None


def time_ms(fn: Callable[[], Any], device: torch.device, warmup: int = 3, iters: int = 10) -> dict[str, float]:
    """Median / min / max wall time of fn() in milliseconds (CUDA events per call on a GPU)."""
    for _ in range(warmup):
        fn()
    samples = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_sha() -> str | None:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=root, capture_output=True, text=True)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def machine(device: torch.device) -> dict[str, Any]:
    """environment() plus what a CPU timing depends on: CPU model, cores, threads, load average, git sha."""
    env = environment(device)
    env.update(
        cpu=cpu_model(),
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        loadavg=os.getloadavg() if hasattr(os, "getloadavg") else None,
        git_sha=git_sha(),
        kernel_backend=os.environ.get("VTOKPRUNE_KERNEL_BACKEND", "auto"),
    )
    return env


# ------------------------------------------------------------------ random-weight models and inputs


def build_model(cls: Any, config: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """`cls(config)` created directly on `device` in `dtype`, eval mode, greedy generation without EOS."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(config)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    model.generation_config.pad_token_id = tiny.PAD_TOKEN_ID
    model.generation_config.eos_token_id = None
    return model


def llava_model(vision: dict[str, Any], text: dict[str, Any], device: torch.device, dtype: torch.dtype) -> Any:
    """LlavaForConditionalGeneration: CLIP tower `vision`, Llama `text` (config kwargs), features from layer -2."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(  # type: ignore[call-arg]
        vision_config=CLIPVisionConfig(hidden_act="quick_gelu", **vision),
        text_config=LlamaConfig(pad_token_id=tiny.PAD_TOKEN_ID, **text),
        image_token_id=tiny.IMAGE_TOKEN_ID,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        pad_token_id=tiny.PAD_TOKEN_ID,
    )
    config._attn_implementation = "sdpa"
    return build_model(LlavaForConditionalGeneration, config, device, dtype)


def prompts(batch: int, text_tokens: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(*PROMPT_VOCAB, (batch, text_tokens), generator=g).tolist()


def llava_inputs(model: Any, batch: int, text_tokens: int) -> dict[str, torch.Tensor]:
    return tiny.llava_inputs(model, prompts(batch, text_tokens), images=1)


def median_ci(samples: list[float], level: float = 0.95, resamples: int = 2000, seed: int = 0) -> dict[str, float]:
    """Median and a bootstrap percentile interval of it ({"median", "lo", "hi", "n"}); lo = hi = median when n = 1."""
    import random

    n = len(samples)
    med = statistics.median(samples)
    if n < 2:
        return {"median": med, "lo": med, "hi": med, "n": n}
    rng = random.Random(seed)
    boots = sorted(statistics.median(rng.choices(samples, k=n)) for _ in range(resamples))
    tail = (1 - level) / 2
    return {"median": med, "lo": boots[int(tail * resamples)], "hi": boots[int((1 - tail) * resamples) - 1], "n": n}


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=str)
    print(f"wrote {path}")


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return "-" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def in_tower_spec(spec: str) -> dict[str, Any]:
    """An in-tower variant from its label: "3" -> layer 3; "2-4" -> stages at layers 2 and 4; "+fuse" -> the dropped
    patches fused into one context token. Returns strategy keyword arguments."""
    layers, _, flag = spec.partition("+")
    if flag not in ("", "fuse"):
        raise ValueError(f"in-tower spec {spec!r}: the only flag is +fuse")
    stages = tuple(int(x) for x in layers.split("-"))
    return {"in_tower_layer": stages[0] if len(stages) == 1 else stages, "in_tower_fuse": flag == "fuse"}
