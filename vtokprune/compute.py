"""Equal-compute bookkeeping: how many visual tokens each decoder layer sees, and the prefill FLOPs that implies.

Papers compare pruning methods at equal cost, and count cost the way PyramidDrop, SparseVLM and VisionZip do: the
number of visual tokens averaged over the decoder layers. A pre-LLM strategy (``acts == "vision"``) that keeps k
tokens costs k at every layer. An in-LLM strategy sees all T tokens up to its first stage and then the count of each
stage (its :meth:`~vtokprune.strategies.base.LLMStrategy.schedule`), so FastV at keep=64 after layer 2 of 32 averages
(2 * 576 + 30 * 64) / 32 = 96 tokens: it matches a pre-LLM strategy at keep=96, not keep=64.

What ``keep`` means differs by kind, and :func:`keep_means` says it in words: the tokens that reach the language model
(pre-LLM), the tokens kept from the pruning layer on (FastV), or the tokens left after the *last* stage
(PyramidDrop, SparseVLM, AdaptInfer: earlier stages keep more).

Prefill FLOPs (:func:`prefill_flops`), for a decoder of L layers, width d, MLP width m, key/value width d_kv
(= kv_heads * head_dim) and n_l tokens at layer l; one multiply-add counts 2 FLOPs::

    per layer l:  2 * n_l * d * (2 * d + 2 * d_kv)      q, k, v, o projections
                + 2 * 2 * n_l^2 * d                       scores QK^T and the weighted sum AV (full n x n, as the
                                                          papers count it; a causal kernel does about half)
                + 2 * 3 * n_l * d * m                     gated MLP (gate, up, down; 2 * 2 * n_l * d * m if ungated)
    plus          2 * d * vocab                           the LM head on the last token only

Norms, softmax, rotary embeddings and the vision tower are left out: this is the language model's prefill, the part
pruning changes (the vision tower costs the same for every pre-LLM strategy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .strategies.base import LLMStrategy, Strategy


def visual_tokens_per_layer(strategy: Strategy | None, num_layers: int, available: int) -> list[int]:
    """Visual tokens per image entering each of the `num_layers` decoder layers (None: unpruned)."""
    if num_layers < 1 or available < 1:
        raise ValueError(f"need num_layers >= 1 and available >= 1, got {num_layers} and {available}")
    if strategy is None:
        return [available] * num_layers
    if isinstance(strategy, LLMStrategy):
        schedule = strategy.schedule(num_layers, available)
        counts, current = [], available
        for layer in range(num_layers):
            current = min(current, schedule.get(layer, current))
            counts.append(current)
        return counts
    return [strategy.budget(available)] * num_layers


def average_visual_tokens(strategy: Strategy | None, num_layers: int, available: int) -> float:
    """Visual tokens per image averaged over the decoder layers (the equal-compute count)."""
    counts = visual_tokens_per_layer(strategy, num_layers, available)
    return sum(counts) / len(counts)


def equivalent_keep(strategy: Strategy | None, num_layers: int, available: int) -> int:
    """The pre-LLM `keep` that costs what `strategy` costs: its average visual tokens, rounded (at least 1)."""
    return max(1, min(available, round(average_visual_tokens(strategy, num_layers, available))))


def keep_means(strategy: Strategy | None, num_layers: int, available: int) -> str:
    """In words: which number the strategy's budget is, and the per-layer schedule behind it."""
    if strategy is None:
        return f"unpruned: all {available} visual tokens at every layer"
    if not isinstance(strategy, LLMStrategy):
        return f"{strategy.budget(available)} of {available} visual tokens reach the language model (every layer)"
    schedule = strategy.schedule(num_layers, available)
    stages = ", ".join(f"{count} from layer {layer}" for layer, count in sorted(schedule.items()))
    if len(schedule) == 1:
        return f"all {available} visual tokens before the pruning layer, then {stages}"
    last = max(schedule)
    return (
        f"the budget is the count after the last stage (layer {last}); all {available} tokens before the first "
        f"stage, then {stages}"
    )


@dataclass(frozen=True)
class DecoderShape:
    """What prefill FLOPs depend on, read from a (text) config."""

    num_layers: int
    hidden: int
    intermediate: int
    kv_width: int
    vocab: int
    gated_mlp: bool = True

    @classmethod
    def from_config(cls, config: Any) -> DecoderShape:
        """From an HF model config or its text config (LLaVA, Qwen2-VL, InternVL, or a plain decoder)."""
        text = getattr(config, "text_config", None) or getattr(config, "llm_config", None) or config
        hidden = int(text.hidden_size)
        heads = int(text.num_attention_heads)
        kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
        act = str(getattr(text, "hidden_act", "silu"))
        return cls(
            num_layers=int(text.num_hidden_layers),
            hidden=hidden,
            intermediate=int(getattr(text, "intermediate_size", None) or 4 * hidden),
            kv_width=kv_heads * head_dim,
            vocab=int(getattr(text, "vocab_size", 0) or 0),
            gated_mlp=getattr(text, "model_type", "") not in ("gpt2", "opt") and act != "gelu_new",
        )


def prefill_flops(shape: DecoderShape, text_tokens: int, visual_per_layer: list[int]) -> float:
    """FLOPs of one sequence's prefill: `text_tokens` plus `visual_per_layer[l]` visual tokens at layer l."""
    if len(visual_per_layer) != shape.num_layers:
        raise ValueError(f"visual_per_layer has {len(visual_per_layer)} entries for {shape.num_layers} layers")
    d, m, kv = shape.hidden, shape.intermediate, shape.kv_width
    mlp_mats = 3 if shape.gated_mlp else 2
    total = 2.0 * d * shape.vocab
    for visual in visual_per_layer:
        n = text_tokens + visual
        total += 2.0 * n * d * (2 * d + 2 * kv) + 4.0 * n * n * d + 2.0 * mlp_mats * n * d * m
    return total


def prefill_tflops(config: Any, strategy: Strategy | None, available: int, text_tokens: int, images: int = 1) -> float:
    """TFLOPs of one prefill of `text_tokens` text tokens plus `images` images of `available` visual tokens each."""
    shape = DecoderShape.from_config(config)
    per_layer = [images * c for c in visual_tokens_per_layer(strategy, shape.num_layers, available)]
    return prefill_flops(shape, text_tokens, per_layer) / 1e12


def compute_record(config: Any, strategy: Strategy | None, available: int, text_tokens: int) -> dict[str, Any]:
    """The equal-compute fields `sweep` writes for every result."""
    shape = DecoderShape.from_config(config)
    per_layer = visual_tokens_per_layer(strategy, shape.num_layers, available)
    return {
        "avg_visual_tokens": round(sum(per_layer) / len(per_layer), 2),
        "equivalent_keep": equivalent_keep(strategy, shape.num_layers, available),
        "prefill_tflops": round(prefill_flops(shape, text_tokens, per_layer) / 1e12, 6),
        "keep_means": keep_means(strategy, shape.num_layers, available),
    }


__all__ = [
    "DecoderShape",
    "average_visual_tokens",
    "compute_record",
    "equivalent_keep",
    "keep_means",
    "prefill_flops",
    "prefill_tflops",
    "visual_tokens_per_layer",
]
