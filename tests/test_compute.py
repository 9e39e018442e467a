"""Equal-compute counts (average visual tokens over decoder layers) and analytic prefill FLOPs."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig

import vtokprune
from vtokprune import compute


def test_pre_llm_strategies_cost_their_keep_at_every_layer():
    assert compute.visual_tokens_per_layer(vtokprune.CLSAttention(keep=64), 32, 576) == [64] * 32
    assert compute.average_visual_tokens(vtokprune.Pool(ratio=0.25), 32, 576) == 144
    assert compute.average_visual_tokens(None, 32, 576) == 576


def test_fastv_average_counts_the_layers_before_pruning():
    # FastV K=2, keep 64 of 576 on 32 layers: (2 * 576 + 30 * 64) / 32 = 96 (the count papers match it at)
    assert compute.average_visual_tokens(vtokprune.FastV(keep=64), 32, 576) == 96
    assert compute.equivalent_keep(vtokprune.FastV(keep=64), 32, 576) == 96


def test_pyramiddrop_multi_stage_schedule():
    strategy = vtokprune.PyramidDrop(lam=0.5)  # paper default: 576 -> 288 -> 144 -> 72 before layers 8, 16, 24
    per_layer = compute.visual_tokens_per_layer(strategy, 32, 576)
    assert per_layer[:8] == [576] * 8 and per_layer[8:16] == [288] * 8 and per_layer[24:] == [72] * 8
    assert compute.average_visual_tokens(strategy, 32, 576) == (576 + 288 + 144 + 72) / 4
    words = compute.keep_means(vtokprune.PyramidDrop(keep=64), 32, 576)
    assert "after the last stage (layer 24)" in words and "64 from layer 24" in words
    assert "reach the language model" in compute.keep_means(vtokprune.VisionZip(keep=64), 32, 576)


def test_prefill_flops_formula_by_hand():
    shape = compute.DecoderShape(num_layers=2, hidden=8, intermediate=16, kv_width=4, vocab=10)
    n = 3 + 5
    layer = 2 * n * 8 * (2 * 8 + 2 * 4) + 4 * n * n * 8 + 2 * 3 * n * 8 * 16
    assert compute.prefill_flops(shape, 3, [5, 5]) == 2 * layer + 2 * 8 * 10
    with pytest.raises(ValueError, match="2 layers"):
        compute.prefill_flops(shape, 3, [5])


def test_prefill_tflops_llava_7b_geometry_and_monotonic():
    config = LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000
    )
    full = compute.prefill_tflops(config, None, 576, text_tokens=48)
    # ~2 * 6.7e9 params * 624 tokens ~ 8.4 TFLOPs, plus attention
    assert 8.0 < full < 9.5
    fastv = compute.prefill_tflops(config, vtokprune.FastV(keep=64), 576, text_tokens=48)
    cls = compute.prefill_tflops(config, vtokprune.CLSAttention(keep=64), 576, text_tokens=48)
    assert cls < fastv < full
    record = compute.compute_record(config, vtokprune.FastV(keep=64), 576, 48)
    assert record["avg_visual_tokens"] == 96 and record["prefill_tflops"] == pytest.approx(fastv, rel=1e-5)


def test_shape_from_a_vlm_config():
    from vtokprune.testing import tiny_llava

    model = tiny_llava(seed=0)
    shape = compute.DecoderShape.from_config(model.config)
    assert shape.num_layers == model.config.text_config.num_hidden_layers and shape.hidden > 0
