"""Shared test helpers: greedy reference loops that do not go through `generate`."""

from __future__ import annotations

import torch

from vtokprune.compat import cache_from_output, cache_kwargs
from vtokprune.testing import IMAGE_TOKEN_ID


def _pick(logits: torch.Tensor) -> torch.Tensor:
    """Greedy choice that never emits the image placeholder (random tiny models otherwise might)."""
    logits = logits[:, -1].clone()
    logits[:, IMAGE_TOKEN_ID] = -torch.inf
    return logits.argmax(-1, keepdim=True)


@torch.no_grad()
def stepwise_greedy(model, inputs: dict, steps: int) -> torch.Tensor:
    """Greedy decoding by hand: one prefill, then one token at a time through the KV cache, growing the mask."""
    out = model(**inputs, use_cache=True)
    cache = cache_from_output(out)
    mask = inputs.get("attention_mask")
    tokens = []
    nxt = _pick(out.logits)
    for _ in range(steps):
        tokens.append(nxt)
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        out = model(input_ids=nxt, attention_mask=mask, **cache_kwargs(cache), use_cache=True)
        cache = cache_from_output(out)
        nxt = _pick(out.logits)
    return torch.cat(tokens, dim=1)


@torch.no_grad()
def recompute_greedy(model, inputs: dict, steps: int) -> torch.Tensor:
    """Greedy decoding with no cache at all: the whole sequence is run again for every token."""
    ids, mask = inputs["input_ids"], inputs.get("attention_mask")
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    tokens = []
    for _ in range(steps):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False, **extra).logits
        nxt = _pick(logits)
        tokens.append(nxt)
        ids = torch.cat([ids, nxt], dim=1)
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
    return torch.cat(tokens, dim=1)


@torch.no_grad()
def generate_new(model, inputs: dict, steps: int) -> torch.Tensor:
    out = model.generate(
        **inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, suppress_tokens=[IMAGE_TOKEN_ID]
    )
    return out[:, inputs["input_ids"].shape[1] :]


def single(inputs: dict, i: int, images_per_prompt: list[int]) -> dict:
    """Row i of a batch built by `llava_inputs`, with its own images, padding stripped."""
    mask = inputs["attention_mask"][i].bool()
    out = {"input_ids": inputs["input_ids"][i][mask][None], "attention_mask": inputs["attention_mask"][i][mask][None]}
    if images_per_prompt[i]:
        start = sum(images_per_prompt[:i])
        out["pixel_values"] = inputs["pixel_values"][start : start + images_per_prompt[i]]
    return out
