"""What an adapter hands a vision strategy: the encoded images grouped by token count, and the attention probes
that capture the vision-side signals ([CLS] attention, keys, values) while the tower runs.

The family adapters build :class:`EncodedImages` in their `encode_images` (usually through
:func:`run_with_vision_probes` and :func:`group_features`); `Adapter` (base.py) reads it in the prefill.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..probe import attention_rows, probing
from ..strategies.base import VisionSignals, VisionStrategy

if TYPE_CHECKING:
    from .base import Adapter


@dataclass
class EncodedImages:
    """Per-image features (what the LLM gets) and the signals the strategy asked for, grouped by token count."""

    features: list[torch.Tensor]  # per image [T_i, D]
    signals: dict[int, VisionSignals]  # group key (the token count T for most families) -> signals of its images
    groups: dict[int, list[int]]  # group key -> indices of those images (all with the same T and layout)
    layout: Any = None  # adapter-private: how each image's tokens sit in its placeholder run (e.g. LLaVA-NeXT)
    preselected: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None  # (kept, features) chosen in the tower


def group_features(features: list[torch.Tensor], **signal_fields: Any) -> EncodedImages:
    """Group per-image features by token count into VisionSignals (features only, plus the given fields)."""
    groups: dict[int, list[int]] = {}
    for i, f in enumerate(features):
        groups.setdefault(int(f.shape[0]), []).append(i)
    signals = {
        t: VisionSignals(features=torch.stack([features[i] for i in members]), **signal_fields)
        for t, members in groups.items()
    }
    return EncodedImages(features=features, signals=signals, groups=groups)


def vision_probe(signals: dict[str, dict[int, torch.Tensor]], layer: int, needs: frozenset[str], cls_offset: int):  # type: ignore[no-untyped-def]
    """Callback capturing [CLS] attention / keys / values of one vision layer into `signals`."""

    def probe(module, query, key, value, attention_mask, kwargs) -> None:  # type: ignore[no-untyped-def]
        if "cls_attn" in needs:
            rows = torch.zeros(query.shape[0], 1, dtype=torch.long, device=query.device)
            probs = attention_rows(query, key, attention_mask, rows, kwargs.get("scaling"), causal=False)
            signals.setdefault("cls_attn", {})[layer] = probs[:, :, 0, cls_offset:]
        if "keys" in needs:
            signals.setdefault("keys", {})[layer] = key[:, :, cls_offset:]
            if cls_offset:
                signals.setdefault("cls_keys", {})[layer] = key[:, :, 0]
        if "values" in needs:
            signals.setdefault("values", {})[layer] = value[:, :, cls_offset:]
            if cls_offset:
                signals.setdefault("cls_values", {})[layer] = value[:, :, 0]

    return probe


def run_with_vision_probes(
    adapter: Adapter, strategy: VisionStrategy, cls_offset: int, fn: Callable[[], Any]
) -> tuple[Any, dict[str, dict[int, torch.Tensor]]]:
    """Call `fn` (the tower's forward) with probes on the vision layers the strategy reads; return its output and
    the captured signals (name -> vision layer -> tensor)."""
    signals: dict[str, dict[int, torch.Tensor]] = {}
    layers = strategy.vision_layers(adapter.vision_num_layers(), adapter.feature_layer())
    callbacks = {
        id(adapter.vision_attention(layer)): vision_probe(signals, layer, strategy.needs, cls_offset)
        for layer in layers
    }
    with probing(callbacks if strategy.needs - {"hidden"} else {}):
        out = fn()
    return out, signals


__all__ = ["EncodedImages", "group_features", "run_with_vision_probes", "vision_probe"]
