"""Conformance, positions: on every adapter family, kept tokens keep their original positions (1-D or M-RoPE), or,
with positions="contiguous", are numbered as if the pruned sequence were the input. Machinery: tests/conformance.py."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import vtokprune
from vtokprune.compat import cache_from_output

from .conformance import STRATEGIES, K, apply_or_skip, case, strategy_for


def _capture_lm(model: Any) -> tuple[dict[str, Any], Any]:
    seen: dict[str, Any] = {}

    def grab(module, args, kwargs):  # type: ignore[no-untyped-def]
        seen["position_ids"] = kwargs.get("position_ids")
        seen["length"] = kwargs["inputs_embeds"].shape[1]

    lm = vtokprune.get_adapter(model).wrapped_module().language_model
    return seen, lm.register_forward_pre_hook(grab, with_kwargs=True)


def _capture_rope(model: Any) -> tuple[dict[str, Any], Any]:
    seen: dict[str, Any] = {}

    def grab(module, args, kwargs):  # type: ignore[no-untyped-def]
        seen["cos"] = kwargs["position_embeddings"][0]

    layer = vtokprune.get_adapter(model).decoder_layers()[-1]
    return seen, layer.register_forward_pre_hook(grab, with_kwargs=True)


@pytest.mark.parametrize("name", STRATEGIES)
def test_kept_tokens_keep_original_positions(family, name):
    """Position ids (or M-RoPE columns) given to the language model, and the rotary embeddings the last decoder layer
    gets, are those of the kept tokens in the unpruned sequence; every text token is kept."""
    fam, model = family
    spec, inputs = case(fam, model, name)
    adapter = vtokprune.get_adapter(model)
    ids = inputs["input_ids"]
    visual = adapter.visual_token_mask(ids)
    seen, handle = _capture_lm(model)
    rope, rope_handle = _capture_rope(model)
    try:
        with torch.no_grad():
            model(**inputs, use_cache=True)
    finally:
        handle.remove()
        rope_handle.remove()
    ref_pos, ref_cos = seen["position_ids"], rope["cos"]
    if ref_pos is None:  # the model's default: 0..L-1
        ref_pos = torch.arange(ids.shape[1]).expand_as(ids)
    apply_or_skip(model, strategy_for(name, keep=K, positions="original"))
    seen, handle = _capture_lm(model)  # registered after apply: runs after vtokprune's own layer hooks
    rope, rope_handle = _capture_rope(model)
    try:
        with torch.no_grad():
            out = model(**inputs, use_cache=True)
        record = model._vtokprune_state.record_for(cache_from_output(out))
        pos, cos = seen["position_ids"], rope["cos"]
    finally:
        vtokprune.remove(model)
        handle.remove()
        rope_handle.remove()
    valid = inputs["attention_mask"].bool()
    comp = record.outer if record.outer is not None else (record.stages[-1].comp if record.stages else None)
    if comp is None:
        assert name == "none"
        return
    cols = comp.cols
    ref_cos, cos = ref_cos.expand(ids.shape[0], -1, -1), cos.expand(ids.shape[0], -1, -1)
    slot_ok = comp.valid & valid.gather(1, cols.clamp(min=0))
    for b in range(ids.shape[0]):
        kept_cols = set(cols[b][slot_ok[b]].tolist())
        assert set(torch.nonzero(valid[b] & ~visual[b]).flatten().tolist()) <= kept_cols  # all text kept
        # the rotary embedding each kept token gets in the last layer is the one it had unpruned
        assert torch.equal(cos[b][slot_ok[b]], ref_cos[b][cols[b][slot_ok[b]]])
    if record.outer is not None:
        assert pos is not None
        gathered = (
            ref_pos.gather(-1, cols.clamp(min=0).expand_as(pos))
            if pos.dim() == 2
            else torch.stack([ref_pos[r].gather(-1, cols.clamp(min=0)) for r in range(ref_pos.shape[0])])
        )
        mask = slot_ok if pos.dim() == 2 else slot_ok[None].expand_as(pos)
        assert torch.equal(pos[mask], gathered[mask])


@pytest.mark.parametrize("name", STRATEGIES)
def test_contiguous_positions(family, name):
    """positions="contiguous": the kept tokens are numbered as if the pruned sequence were the input (1-D RoPE);
    M-RoPE models keep their 3-D positions (a documented no-op)."""
    fam, model = family
    _, inputs = case(fam, model, name)
    ids = inputs["input_ids"]
    rope, rope_handle = _capture_rope(model)
    try:
        with torch.no_grad():
            model(**inputs, use_cache=True)
    finally:
        rope_handle.remove()
    ref_cos = rope["cos"].expand(ids.shape[0], -1, -1)
    apply_or_skip(model, strategy_for(name, keep=K, positions="contiguous"))
    rope, rope_handle = _capture_rope(model)
    try:
        with torch.no_grad():
            out = model(**inputs, use_cache=True)
        record = model._vtokprune_state.record_for(cache_from_output(out))
        cos = rope["cos"].expand(ids.shape[0], -1, -1)
    finally:
        vtokprune.remove(model)
        rope_handle.remove()
    comp = record.outer if record.outer is not None else (record.stages[-1].comp if record.stages else None)
    if comp is None:
        assert name == "none"
        return
    if vtokprune.get_adapter(model).mrope():
        assert not record.contiguous
        return
    valid = inputs["attention_mask"].bool()
    real = comp.valid & valid.gather(1, comp.cols.clamp(min=0))
    for b in range(ids.shape[0]):
        n = int(real[b].sum())
        first = int(torch.nonzero(valid[b])[0])
        slots = cos[b][real[b]]
        if record.outer is not None:  # pre-LLM: position = compact slot, as an unpruned input of that length
            want = ref_cos[b][torch.nonzero(real[b]).flatten()]
        else:  # in-LLM: consecutive from the row's first real position
            want = ref_cos[b][first : first + n]
        torch.testing.assert_close(slots, want)
