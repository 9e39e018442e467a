"""Shared machinery of the adapter conformance tests (tests/test_adapters_conformance*.py): the tiny model of each
family, its inputs, and the helpers that apply a strategy, run it and decode by hand. Not a test module."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import vtokprune
from vtokprune.compat import cache_from_output, cache_kwargs
from vtokprune.errors import CapabilityError
from vtokprune.testing import (
    IMAGE_TOKEN_ID,
    VIDEO_TOKEN_ID,
    internvl_inputs,
    llava_inputs,
    llava_next_inputs,
    qwen_inputs,
    tiny_internvl,
    tiny_llava,
    tiny_llava_next,
    tiny_qwen2_vl,
)

K = 4
STEPS = 4
SUPPRESS = [IMAGE_TOKEN_ID, VIDEO_TOKEN_ID]
PROMPTS = [[8, 9, 10, 11], [12, 13]]

# Per family: the images of each of the two samples (a family-specific spec), and a variant where every image has a
# single patch grid (for strategies such as 'pool' that need one; None when the family has no such input).
SPECS: dict[str, tuple[list[Any], list[Any] | None]] = {
    "llava": ([1, 2], [1, 2]),
    "llava_next": ([[(28, 56)], [(40, 30), (28, 28)]], None),
    "qwen2_vl": ([[(1, 8, 8)], [(1, 8, 4), (2, 4, 8)]], [[(1, 8, 8)], [(1, 8, 4), (1, 4, 8)]]),
    "qwen2_5_vl": ([[(2, 8, 8)], [(1, 8, 4), (1, 4, 8)]], [[(1, 8, 8)], [(1, 8, 4), (1, 4, 8)]]),
    "internvl": ([[3], [1, 2]], [[1], [1, 1]]),
}
GRID_ONLY = {"pool"}
BUILDERS = {
    "llava": lambda: tiny_llava(seed=0),
    "llava_next": lambda: tiny_llava_next(seed=0),
    "qwen2_vl": lambda: tiny_qwen2_vl(seed=0, version="2"),
    "qwen2_5_vl": lambda: tiny_qwen2_vl(seed=0, version="2.5"),
    "internvl": lambda: tiny_internvl(seed=0),
}
FAMILIES = list(BUILDERS)
STRATEGIES = list(vtokprune.available_strategies())


def make_inputs(family: str, model: Any, spec: list[Any]) -> dict[str, torch.Tensor]:
    prompts = PROMPTS[: len(spec)]
    if family == "llava":
        return llava_inputs(model, prompts, images=spec)
    if family == "llava_next":
        return llava_next_inputs(model, prompts, spec)
    if family in ("qwen2_vl", "qwen2_5_vl"):
        return qwen_inputs(model, prompts, spec)
    return internvl_inputs(model, prompts, spec)


def single(family: str, inputs: dict[str, torch.Tensor], spec: list[Any], i: int) -> dict[str, torch.Tensor]:
    """Sample i of a batch, padding stripped, with only its own pixels."""
    keep = inputs["attention_mask"][i].bool()
    out = {k: inputs[k][i][keep][None] for k in ("input_ids", "attention_mask", "mm_token_type_ids") if k in inputs}
    if family == "llava":
        start = sum(spec[:i])
        out["pixel_values"] = inputs["pixel_values"][start : start + spec[i]]
    elif family == "llava_next":
        start = sum(len(s) for s in spec[:i])
        for k in ("pixel_values", "image_sizes"):
            out[k] = inputs[k][start : start + len(spec[i])]
    elif family == "internvl":
        start = sum(sum(s) for s in spec[:i])
        out["pixel_values"] = inputs["pixel_values"][start : start + sum(spec[i])]
    else:
        for video, pixels, grids in (
            (False, "pixel_values", "image_grid_thw"),
            (True, "pixel_values_videos", "video_grid_thw"),
        ):
            before = [g for s in spec[:i] for g in s if (g[0] > 1) == video]
            mine = [g for g in spec[i] if (g[0] > 1) == video]
            if not mine:
                continue
            start = sum(t * h * w for t, h, w in before)
            out[pixels] = inputs[pixels][start : start + sum(t * h * w for t, h, w in mine)]
            out[grids] = torch.tensor(mine, dtype=torch.long)
    return out


def strategy_for(name: str, **budget: Any) -> vtokprune.Strategy:
    return vtokprune.get_strategy(name, **budget)


def case(family: str, model: Any, name: str) -> tuple[list[Any], dict[str, torch.Tensor]]:
    spec = SPECS[family][1] if name in GRID_ONLY else SPECS[family][0]
    if spec is None:
        pytest.skip(f"{family} has no single-grid input for {name!r}")
    return spec, make_inputs(family, model, spec)


def apply_or_skip(model: Any, strategy: vtokprune.Strategy) -> None:
    try:
        vtokprune.apply(model, strategy)
    except CapabilityError as e:
        pytest.skip(f"not supported: {e}")


@torch.no_grad()
def logits(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**inputs).logits


def _pick(out_logits: torch.Tensor) -> torch.Tensor:
    x = out_logits[:, -1].clone()
    x[:, SUPPRESS] = -torch.inf
    return x.argmax(-1, keepdim=True)


@torch.no_grad()
def stepwise(model: Any, inputs: dict[str, torch.Tensor], steps: int) -> torch.Tensor:
    """Greedy decoding by hand: one prefill, then one token at a time through the KV cache (no position_ids)."""
    out = model(**inputs, use_cache=True)
    cache, mask = cache_from_output(out), inputs["attention_mask"]
    tokens, nxt = [], _pick(out.logits)
    for _ in range(steps):
        tokens.append(nxt)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        out = model(input_ids=nxt, attention_mask=mask, **cache_kwargs(cache), use_cache=True)
        cache, nxt = cache_from_output(out), _pick(out.logits)
    return torch.cat(tokens, dim=1)


@torch.no_grad()
def generate(model: Any, inputs: dict[str, torch.Tensor], steps: int) -> torch.Tensor:
    out = model.generate(
        **inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, suppress_tokens=SUPPRESS
    )
    return out[:, inputs["input_ids"].shape[1] :]


def expected_kept(strategy: vtokprune.Strategy, model: Any, available: list[int], sample_of: list[int]) -> list[int]:
    """Exact per-image (vision) or per-sample (in-LLM) number of kept visual tokens."""
    if strategy.acts == "vision":
        return [strategy.budget(n) for n in available]
    adapter = vtokprune.get_adapter(model)
    layers = len(adapter.decoder_layers())
    per_sample = [0] * (max(sample_of) + 1)
    for n, s in zip(available, sample_of):
        schedule = strategy.schedule(layers, n)  # type: ignore[attr-defined]
        per_sample[s] += schedule[max(schedule)]
    return per_sample
