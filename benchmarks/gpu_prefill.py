"""Prefill / decode cost of visual-token pruning at 7B scale, with randomly initialised models of real geometry.

    python benchmarks/gpu_prefill.py --json results/gpu_prefill.json      # on an H100 (bf16, SDPA)
    python benchmarks/gpu_prefill.py --smoke                              # CPU, tiny models, 144 tokens (CI)

Models (built from configs, nothing is downloaded): LLaVA-1.5-7B = CLIP ViT-L/14-336 (576 patches) + Llama-2-7B;
Qwen2.5-VL-7B (672x672 image -> 48x48 patches -> 576 merged tokens). Each row is one (model, batch, strategy, keep):

* ttft_ms: prefill latency incl. the vision tower (model forward with use_cache, logits of the last token only;
  CUDA events, warmup, median);
* decode_tok_s: generated tokens per second after the prefill (greedy `generate`, batch included);
* peak_GB: peak allocated memory during the prefill (weights included);
* TFLOPs: analytic prefill FLOPs (2 * params * tokens for every linear layer at the sequence length that layer
  really sees, 4 * L^2 * width for causal attention, halved; the vision tower counted with full attention);
* overhead_ms: the strategy's own cost, TTFT with the strategy at keep = all tokens minus the unpruned TTFT;
* kernel_ms / kernel_%HBM: the score-and-gather hot path of the strategy (vtokprune.kernels, Triton) on this
  geometry, and its bandwidth as a fraction of the HBM peak.

For in-LLM strategies (FastV, PyramidDrop) a second row "<name>/eager" runs the same strategy the original way:
eager attention everywhere, so the full [B, H, L, L] attention map is materialised at every layer, including the
layer whose attention picks the tokens (what `output_attentions=True` there needs). Ours keeps SDPA and computes
only the attention rows it needs.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
from typing import Any

import torch

if "--smoke" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernel_bench  # noqa: E402
from bench_utils import (  # noqa: E402  # noqa: E402
    build_model,
    environment,
    hbm_peak,
    llava_inputs,
    llava_model,
    prompts,
    table,
    time_ms,
    write_json,
)

import vtokprune  # noqa: E402
from vtokprune import testing as tiny  # noqa: E402
from vtokprune.errors import VTokPruneError  # noqa: E402
from vtokprune.kernels import score_and_gather, triton_available  # noqa: E402

IMAGE_TOKENS = [576]  # visual tokens per image (a square grid); 144 in --smoke


# ------------------------------------------------------------------ models


def llava_7b(device: torch.device, dtype: torch.dtype) -> Any:
    vision = dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
    )
    text = dict(
        vocab_size=32064,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
    )
    return llava_model(vision, text, device, dtype)


def qwen25_vl_7b(device: torch.device, dtype: torch.dtype) -> Any:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = dict(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        pad_token_id=tiny.PAD_TOKEN_ID,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
    )
    vision = dict(
        depth=32,
        hidden_size=1280,
        intermediate_size=3420,
        num_heads=16,
        out_hidden_size=3584,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31],
    )
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=tiny.IMAGE_TOKEN_ID,
        video_token_id=tiny.VIDEO_TOKEN_ID,
        vision_start_token_id=tiny.VISION_START_ID,
        vision_end_token_id=tiny.VISION_END_ID,
        pad_token_id=tiny.PAD_TOKEN_ID,
    )
    config._attn_implementation = "sdpa"
    return build_model(Qwen2_5_VLForConditionalGeneration, config, device, dtype)


def qwen_inputs(model: Any, batch: int, text_tokens: int) -> dict[str, torch.Tensor]:
    side = model.config.vision_config.spatial_merge_size * math.isqrt(IMAGE_TOKENS[0])
    return tiny.qwen_inputs(model, prompts(batch, text_tokens), images=[[(1, side, side)]] * batch)


def models(smoke: bool, device: torch.device, dtype: torch.dtype) -> dict[str, tuple[Any, Any, str]]:
    """name -> (builder, inputs builder, kernel_bench geometry of the FastV hot path)."""
    if smoke:
        return {
            "llava-tiny": (
                lambda: tiny.tiny_llava(image_size=14 * math.isqrt(IMAGE_TOKENS[0]), max_position_embeddings=1024),
                llava_inputs,
                "fastv@tiny-gqa",
            ),
            "qwen2.5-vl-tiny": (
                lambda: tiny.tiny_qwen2_vl(version="2.5", patch_size=14),
                qwen_inputs,
                "fastv@tiny-gqa",
            ),
        }
    return {
        "llava-1.5-7b": (lambda: llava_7b(device, dtype), llava_inputs, "fastv@llama2-7b"),
        "qwen2.5-vl-7b": (lambda: qwen25_vl_7b(device, dtype), qwen_inputs, "fastv@qwen2.5-7b"),
    }


# ------------------------------------------------------------------ measurements


def _decoder_layers(model: Any) -> Any:
    return model.model.language_model.layers


def _vision_tower(model: Any) -> Any:
    inner = model.model
    return getattr(inner, "vision_tower", None) or inner.visual


def prefill_flops(model: Any, inputs: dict[str, torch.Tensor], layer_lengths: list[float], vision_tokens: int) -> float:
    """Analytic FLOPs of one prefill (batch summed). layer_lengths[i]: mean sequence length decoder layer i sees."""
    text = model.config.text_config
    batch = inputs["input_ids"].shape[0]
    heads, head_dim = (
        text.num_attention_heads,
        getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
    )
    flops = 0.0
    for layer, length in zip(_decoder_layers(model), layer_lengths):
        params = sum(p.numel() for p in layer.parameters())
        flops += 2 * params * length + 2 * heads * head_dim * length * length  # linear + causal QK^T, AV (halved)
    flops += 2 * text.hidden_size * text.vocab_size  # lm_head on the last token
    tower = _vision_tower(model)
    vc = model.config.vision_config
    v_params = sum(p.numel() for p in tower.parameters())
    v_width = getattr(vc, "hidden_size", 0)
    v_layers = getattr(vc, "num_hidden_layers", None) or getattr(vc, "depth", 0)
    flops += 2 * v_params * vision_tokens + 4 * v_layers * v_width * vision_tokens**2
    return flops * batch


def layer_lengths(model: Any, inputs: dict[str, torch.Tensor], image_tokens: int) -> list[float]:
    """Mean sequence length each decoder layer saw in the last prefill of `model` (pruned or not)."""
    n_layers = len(_decoder_layers(model))
    full = float(inputs["input_ids"].shape[1])
    if not vtokprune.is_pruned(model):
        return [full] * n_layers
    sel = vtokprune.last_selection(model)
    if sel is None:
        return [full] * n_layers
    batch = inputs["input_ids"].shape[0]
    if sel.layer is None:  # pre-LLM: every layer sees the kept tokens only
        kept = sum(int(k.numel()) for k in sel.kept) / batch
        return [full - image_tokens + kept] * n_layers
    lengths = []
    for i in range(n_layers):
        stages = [s for s in sel.stages if s <= i]
        if not stages:
            lengths.append(full)
        else:
            kept = sum(int(k.numel()) for k in sel.stages[max(stages)]) / batch
            lengths.append(full - image_tokens + kept)
    return lengths


def measure(model: Any, inputs: dict[str, torch.Tensor], cfg: argparse.Namespace, device: torch.device) -> dict:
    def prefill() -> Any:
        with torch.no_grad():
            return model(**inputs, use_cache=True, logits_to_keep=1)

    t = time_ms(prefill, device, cfg.warmup, cfg.iters)
    peak = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        prefill()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**30
    n = cfg.decode_tokens

    def generate() -> Any:
        with torch.no_grad():
            return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    g = time_ms(generate, device, min(cfg.warmup, 1), max(1, cfg.iters // 3))
    batch = inputs["input_ids"].shape[0]
    decode_ms = g["median"] - t["median"]  # the n - 1 steps after the prefill
    return {
        "ttft_ms": t["median"],
        "ttft_min_ms": t["min"],
        "generate_ms": g["median"],
        "decode_tok_s": batch * (n - 1) / (decode_ms / 1e3) if decode_ms > 0 else None,
        "peak_GB": peak,
    }


def kernel_cost(geometry: str, batch: int, keep: int, device: torch.device, cfg: argparse.Namespace) -> dict:
    geoms = {**kernel_bench.GEOMETRIES, **kernel_bench.SMOKE_GEOMETRIES}
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, x, positions, kw = kernel_bench.make_case(geoms[geometry], batch, cfg.image_tokens, device, dtype)
    backend = "triton" if triton_available() and device.type == "cuda" else "torch"  # interpreted: kernel_bench
    t = time_ms(
        lambda: score_and_gather(q, k, x, positions, keep, backend=backend, **kw), device, cfg.warmup, cfg.iters
    )
    nbytes = kernel_bench.bytes_moved(q, k, x, positions, keep, kw)
    peak = hbm_peak(device)
    gbps = nbytes / (t["median"] * 1e-3) / 1e9
    return {"kernel": backend, "kernel_ms": t["median"], "kernel_%HBM": 100 * gbps * 1e9 / peak if peak else None}


def _set_attn(model: Any, impl: str) -> None:
    model.set_attn_implementation(impl)


def run_model(name: str, spec: tuple[Any, Any, str], cfg: argparse.Namespace, device: torch.device) -> list[dict]:
    build, make_inputs, geometry = spec
    model = build()
    model = model.to(device)
    rows: list[dict] = []
    available = vtokprune.available_strategies()
    strategies = [s for s in cfg.strategies if s in available]
    skipped = [s for s in cfg.strategies if s not in available]
    if skipped:
        print(f"[{name}] strategies not in this vtokprune: {', '.join(skipped)} (skipped)")
    try:
        vtokprune.get_adapter(model)
    except VTokPruneError as e:
        print(f"[{name}] unpruned baseline only: {e}")
        strategies = []
    for batch in cfg.batch:
        inputs = {k: v.to(device) for k, v in make_inputs(model, batch, cfg.text_tokens).items()}
        n_img = cfg.image_tokens
        with torch.no_grad():
            model(**inputs, use_cache=True, logits_to_keep=1)  # first call: lazy init, allocator, kernels
        base = measure(model, inputs, cfg, device)
        base_flops = prefill_flops(model, inputs, layer_lengths(model, inputs, n_img), n_img + 1)
        rows.append(
            {"model": name, "batch": batch, "strategy": "none", "keep": n_img, **base, "TFLOPs": base_flops / 1e12}
        )
        for strategy in strategies:
            for impl in ("sdpa", "eager") if available[strategy].acts == "llm" and cfg.eager else ("sdpa",):
                label = strategy if impl == "sdpa" else f"{strategy}/eager"
                if impl != "sdpa":
                    _set_attn(model, impl)
                try:
                    overhead = None
                    if impl == "sdpa":
                        try:
                            with vtokprune.pruned(model, strategy, keep=n_img):
                                overhead = measure(model, inputs, cfg, device)["ttft_ms"] - base["ttft_ms"]
                        except VTokPruneError as e:
                            print(f"[{name}] {strategy} keep={n_img} (overhead run) not possible: {e}")
                    for keep in cfg.keep:
                        try:
                            vtokprune.apply(model, vtokprune.get_strategy(strategy, keep=keep))
                        except VTokPruneError as e:
                            print(f"[{name}] {label} keep={keep}: {type(e).__name__}: {e}")
                            rows.append(
                                {"model": name, "batch": batch, "strategy": label, "keep": keep, "error": str(e)}
                            )
                            continue
                        try:
                            m = measure(model, inputs, cfg, device)
                            lengths = layer_lengths(model, inputs, n_img)
                        finally:
                            vtokprune.remove(model)
                        row = {
                            "model": name,
                            "batch": batch,
                            "strategy": label,
                            "keep": keep,
                            **m,
                            "speedup": base["ttft_ms"] / m["ttft_ms"],
                            "TFLOPs": prefill_flops(model, inputs, lengths, n_img + 1) / 1e12,
                            "overhead_ms": overhead,
                        }
                        if impl == "sdpa":
                            geom = "cls@clip-L336" if strategy == "cls" and geometry.endswith("7b") else geometry
                            if strategy == "cls" and not geometry.endswith("7b"):
                                geom = "cls@tiny"
                            row.update(kernel_cost(geom, batch, keep, device, cfg))
                        rows.append(row)
                finally:
                    if impl != "sdpa":
                        _set_attn(model, "sdpa")
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny models on the CPU (CI check that this script runs)")
    p.add_argument("--models", nargs="+", default=None, help="subset of model names")
    p.add_argument("--strategies", nargs="+", default=["cls", "fastv", "pdrop"])
    p.add_argument("--batch", type=int, nargs="+", default=None)
    p.add_argument("--keep", type=int, nargs="+", default=None)
    p.add_argument("--text-tokens", type=int, default=48)
    p.add_argument("--decode-tokens", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--no-eager", dest="eager", action="store_false", help="skip the original-way (eager) rows")
    p.add_argument("--json", default=None)
    cfg = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not cfg.smoke else "cpu")
    smoke = cfg.smoke or device.type != "cuda"
    cfg.batch = cfg.batch or ([2] if smoke else [1, 8])
    cfg.keep = cfg.keep or ([32] if smoke else [192, 128, 64])
    cfg.decode_tokens = cfg.decode_tokens or (3 if smoke else 32)
    cfg.warmup = cfg.warmup if cfg.warmup is not None else (0 if smoke else 3)
    cfg.iters = cfg.iters if cfg.iters is not None else (1 if smoke else 10)
    cfg.image_tokens = IMAGE_TOKENS[0] = 144 if smoke else 576
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    specs = models(smoke, device, dtype)
    names = cfg.models or list(specs)
    rows: list[dict] = []
    for name in names:
        rows += run_model(name, specs[name], cfg, device)
    cols = [
        "model", "batch", "strategy", "keep", "ttft_ms", "speedup", "decode_tok_s", "peak_GB", "TFLOPs",
        "overhead_ms", "kernel_ms", "kernel_%HBM",
    ]  # fmt: skip
    print(f"prefill on {environment(device)['device']} ({'smoke' if smoke else 'full'}, {dtype}, "
          f"{cfg.text_tokens} text tokens, {cfg.image_tokens} image tokens)")  # fmt: skip
    print(table(rows, cols))
    errors = [r for r in rows if "error" in r]
    if errors:
        print(f"{len(errors)} configurations could not run (see 'error' in the JSON)")
    write_json(cfg.json, {"env": environment(device), "smoke": smoke, "config": vars(cfg), "results": rows})
    return rows


if __name__ == "__main__":
    main()
