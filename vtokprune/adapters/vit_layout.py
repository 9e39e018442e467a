"""Where a ViT vision tower keeps its blocks, their attention modules and its [CLS] token, across module layouts.

Covered: CLIP and SigLIP (``encoder.layers[i].self_attn``, optionally wrapped in ``vision_model``), DINOv2
(``encoder.layer[i].attention``), ViT (``encoder.layers[i].attention``, or ``.attention.attention`` in older
transformers). A tower has a [CLS] token when its embeddings carry ``class_embedding`` (CLIP) or ``cls_token``
(DINOv2, ViT); SigLIP has none.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import CapabilityError

NO_CLS_ALTERNATIVES = "'divprune', 'pool', 'random', or an in-LLM strategy such as 'fastv'"


def unwrap(tower: Any) -> Any:
    """The transformer inside a tower wrapper (CLIPVisionModel / SiglipVisionModel in transformers 4 wrap one)."""
    return getattr(tower, "vision_model", tower)


def vision_blocks(tower: Any) -> nn.ModuleList:
    """The tower's transformer blocks, in order."""
    inner = unwrap(tower)
    encoder = getattr(inner, "encoder", None)
    for owner, name in ((encoder, "layers"), (encoder, "layer"), (inner, "blocks"), (inner, "layers")):
        blocks = getattr(owner, name, None) if owner is not None else None
        if isinstance(blocks, nn.ModuleList) and len(blocks):
            return blocks
    raise CapabilityError(
        f"unknown vision tower layout {type(tower).__name__}: no encoder.layers / encoder.layer / blocks; strategies "
        f"that read vision attention cannot run on it, choose one of {NO_CLS_ALTERNATIVES}"
    )


def block_attention(block: nn.Module) -> nn.Module:
    """The self-attention module of one block (the one that calls the transformers attention interface)."""
    for name in ("self_attn", "attention", "attn"):
        module = getattr(block, name, None)
        if module is None:
            continue
        inner = getattr(module, "attention", None)  # ViT / DINOv2 in transformers 4: attention.attention
        if isinstance(inner, nn.Module) and hasattr(inner, "config"):
            return inner
        return module  # type: ignore[no-any-return]
    raise CapabilityError(f"vision block {type(block).__name__} has no self_attn / attention module")


def has_cls_token(tower: Any) -> bool:
    """True when the tower prepends a [CLS] token to the patch tokens."""
    embeddings = getattr(unwrap(tower), "embeddings", None)
    return any(getattr(embeddings, name, None) is not None for name in ("class_embedding", "cls_token"))
