"""Tiny randomly initialised models built from transformers configs: the offline stand-ins for real checkpoints.

They run the same classes and code paths as `llava-hf/...` checkpoints, just small. Used by the tests, the CLI's
embedded default and the benchmarks' smoke runs.
"""

from __future__ import annotations

from typing import Any

import torch

IMAGE_TOKEN_ID = 3
PAD_TOKEN_ID = 0
VOCAB = 96


def tiny_llava(
    seed: int = 0,
    attn_implementation: str = "sdpa",
    image_size: int = 56,
    patch_size: int = 14,
    text_layers: int = 4,
    vision_layers: int = 3,
    dtype: torch.dtype = torch.float32,
    **text_overrides: Any,
) -> Any:
    """LlavaForConditionalGeneration with a CLIP tower ((image_size/patch_size)^2 tokens) and a small Llama."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=32,
    )
    text_kwargs: dict[str, Any] = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=PAD_TOKEN_ID,
        bos_token_id=1,
        eos_token_id=2,
    )
    text_kwargs.update(text_overrides)
    text = LlamaConfig(**text_kwargs)
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN_ID,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        pad_token_id=PAD_TOKEN_ID,
    )
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).to(dtype).eval()
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    model.generation_config.eos_token_id = None  # random weights: never stop early, so lengths are comparable
    return model


def image_tokens(model: Any) -> int:
    vc = model.config.vision_config
    return int((vc.image_size // vc.patch_size) ** 2)


def llava_inputs(
    model: Any,
    prompts: list[list[int]],
    images: int | list[int] = 1,
    seed: int = 0,
    padding: str = "left",
) -> dict[str, torch.Tensor]:
    """Batch of prompts (token ids, each with `images` image slots before the text) padded like a processor would.

    `images` may be a list (images per prompt; 0 = text only).
    """
    n_tok = image_tokens(model)
    per = images if isinstance(images, list) else [images] * len(prompts)
    seqs = [[1] + [IMAGE_TOKEN_ID] * (n_tok * k) + list(p) for p, k in zip(prompts, per)]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), PAD_TOKEN_ID, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        if padding == "left":
            ids[i, width - len(s) :] = torch.tensor(s)
            mask[i, width - len(s) :] = 1
        else:
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
    size = model.config.vision_config.image_size
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randn(sum(per), 3, size, size, generator=gen, dtype=model.dtype)
    out = {"input_ids": ids, "attention_mask": mask}
    if sum(per):
        out["pixel_values"] = pixels
    return out
