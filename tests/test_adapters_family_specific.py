"""Family-specific adapter checks: Qwen2-VL's missing [CLS], LLaVA-NeXT's tiles and newline tokens, InternVL's
[CLS] attention over its 2x2 pixel-shuffle groups."""

from __future__ import annotations

import pytest
import torch

import vtokprune
from vtokprune.errors import CapabilityError
from vtokprune.testing import internvl_inputs, llava_next_inputs, tiny_internvl, tiny_llava_next, tiny_qwen2_vl

from .conformance import logits


@pytest.mark.parametrize("version", ["2", "2.5"])
def test_qwen_cls_raises_capability_error_naming_alternatives(version):
    model = tiny_qwen2_vl(version=version)
    with pytest.raises(CapabilityError, match="no \\[CLS\\].*pool"):
        vtokprune.apply(model, vtokprune.CLSAttention(keep=4))
    assert not vtokprune.is_pruned(model)


def test_llava_next_tiles_newlines_and_cls_mapping():
    """Tiles cover the content tokens once; newline tokens are kept for rows with a kept token; [CLS] attention maps
    to the crop patch each content token came from."""
    from vtokprune.adapters.llava_next import LlavaNextAdapter

    model = tiny_llava_next()
    adapter = LlavaNextAdapter(model)
    for size in [(28, 56), (40, 30), (56, 20)]:
        lay = adapter.layout(size)
        flat = sorted(i for tile in lay.tiles for i in tile)
        assert flat == list(range(len(lay.content_run)))
        run = torch.cat([lay.content_run, lay.newline_run]).sort().values
        assert run.tolist() == list(range(lay.run_len))  # content + newlines tile the placeholder run exactly
        assert len(set(lay.content_src.tolist())) == len(lay.content_src)
    # end to end: the strategy's scores must be the per-crop [CLS] attention at the mapped patches
    inputs = llava_next_inputs(model, [[8, 9]], [[(40, 30)]])
    captured = {}

    class Spy(vtokprune.RandomPrune):
        name = "spy_llava_next"
        needs = frozenset({"cls_attn"})

        def select(self, signals, k):  # type: ignore[no-untyped-def]
            captured["signals"] = signals
            return super().select(signals, k)

    with vtokprune.pruned(model, Spy(keep=5)):
        logits(model, inputs)
        sel = vtokprune.last_selection(model)
    sig = captured["signals"]
    assert sig.tiles is not None and sig.grid is None and sig.features.shape[1] == sel.available[0]
    attn = next(iter(sig.cls_attn.values()))[0]  # [H, T]
    # base tokens: crop 0's attention sums to (1 - attention on [CLS]) < 1; each crop's block likewise
    lay = adapter.layout((40, 30))
    for crop in range(lay.crops):
        members = [j for j, s in enumerate(lay.content_src.tolist()) if s // 16 == crop]
        assert float(attn[:, members].sum(-1).max()) <= 1.0 + 1e-5


def test_internvl_cls_attention_sums_2x2_groups():
    model = tiny_internvl()
    inputs = internvl_inputs(model, [[8, 9]], [[1]])
    captured = {}

    class Spy(vtokprune.RandomPrune):
        name = "spy_internvl"
        needs = frozenset({"cls_attn"})

        def select(self, signals, k):  # type: ignore[no-untyped-def]
            captured["signals"] = signals
            return super().select(signals, k)

    with vtokprune.pruned(model, Spy(keep=5)):
        logits(model, inputs)
    sig = captured["signals"]
    attn = next(iter(sig.cls_attn.values()))  # [1, H, 16]: 8x8 patches -> 4x4 tokens
    assert attn.shape[-1] == 16 and sig.grid == (4, 4)
    total = attn.sum(-1)  # the patches' share of [CLS] attention: all of it but [CLS]'s own
    assert bool((total < 1).all()) and bool((total > 0.5).all())
