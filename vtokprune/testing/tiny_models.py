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
    tower: str = "clip",
    **text_overrides: Any,
) -> Any:
    """LlavaForConditionalGeneration with a small Llama and a `tower` ("clip", "dinov2" or "siglip": the last has
    no [CLS], so every patch is kept) giving (image_size/patch_size)^2 image tokens."""
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    towers = {"clip": _clip_vision, "dinov2": _dinov2_vision, "siglip": _siglip_vision}
    if tower not in towers:
        raise ValueError(f"unknown tower {tower!r}; choose one of {sorted(towers)}")
    config = LlavaConfig(  # type: ignore[call-arg]
        vision_config=towers[tower](vision_layers, image_size, patch_size),
        text_config=LlamaConfig(**_text_kwargs(text_layers, **text_overrides)),
        image_token_id=IMAGE_TOKEN_ID,
        vision_feature_layer=-2,
        vision_feature_select_strategy="full" if tower == "siglip" else "default",
        pad_token_id=PAD_TOKEN_ID,
    )
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model_cls: Any = LlavaForConditionalGeneration
    return _finish(model_cls(config), attn_implementation, dtype)


def _clip_vision(layers: int, image_size: int, patch_size: int) -> Any:
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=32,
    )


def tiny_llava_dinov2(seed: int = 0, **kwargs: Any) -> Any:
    """tiny_llava with a DINOv2 tower (layer scale, `encoder.layer[i].attention`, [CLS] in `embeddings.cls_token`)."""
    return tiny_llava(seed=seed, tower="dinov2", **kwargs)


def _dinov2_vision(layers: int, image_size: int, patch_size: int) -> Any:
    from transformers import Dinov2Config

    return Dinov2Config(
        hidden_size=32,
        mlp_ratio=2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        layerscale_value=1.0,
    )


def _siglip_vision(layers: int, image_size: int, patch_size: int) -> Any:
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
    )


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


# ---------------------------------------------------------------------- other families (same tiny text sizes)

VIDEO_TOKEN_ID = 4
VISION_START_ID = 5
VISION_END_ID = 6


def _text_kwargs(text_layers: int, **overrides: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(
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
    kwargs.update(overrides)
    return kwargs


def _finish(model: Any, attn_implementation: str, dtype: torch.dtype) -> Any:
    model = model.to(dtype).eval()
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    model.generation_config.eos_token_id = None  # random weights: never stop early, so lengths are comparable
    return model


def tiny_llava_next(
    seed: int = 0,
    attn_implementation: str = "sdpa",
    image_size: int = 28,
    patch_size: int = 7,
    text_layers: int = 4,
    vision_layers: int = 2,
    dtype: torch.dtype = torch.float32,
) -> Any:
    """LlavaNextForConditionalGeneration (anyres): crops of image_size px, (image_size/patch_size)^2 tokens each."""
    from transformers import LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    vision = _clip_vision(vision_layers, image_size, patch_size)
    s = image_size
    make: Any = LlavaNextConfig
    config = make(
        vision_config=vision,
        text_config=LlamaConfig(**_text_kwargs(text_layers)),
        image_token_index=IMAGE_TOKEN_ID,
        image_grid_pinpoints=[[s, 2 * s], [2 * s, s], [2 * s, 2 * s]],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        pad_token_id=PAD_TOKEN_ID,
    )
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model_cls: Any = LlavaNextForConditionalGeneration
    return _finish(model_cls(config), attn_implementation, dtype)


def llava_next_token_count(model: Any, size: tuple[int, int]) -> int:
    """Placeholder tokens one image of original size (height, width) takes, newline tokens included."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    cfg = model.config
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    rows, cols = get_anyres_image_grid_shape(list(size), cfg.image_grid_pinpoints, cfg.vision_config.image_size)
    grid = unpad_image(torch.empty(0, rows * side, cols * side), list(size))
    return side * side + grid.shape[1] * (grid.shape[2] + 1)


def llava_next_inputs(
    model: Any, prompts: list[list[int]], sizes: list[list[tuple[int, int]]], seed: int = 0
) -> dict[str, torch.Tensor]:
    """Left-padded batch; sample i has one image per entry of sizes[i] (original (height, width)) before its text."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    cfg = model.config
    seqs = []
    for p, image_sizes in zip(prompts, sizes):
        seq = [1]
        for size in image_sizes:
            seq += [IMAGE_TOKEN_ID] * llava_next_token_count(model, size) + [7]
        seqs.append(seq + list(p))
    flat = [s for image_sizes in sizes for s in image_sizes]
    patches = [image_size_to_num_patches(list(s), cfg.image_grid_pinpoints, cfg.vision_config.image_size) for s in flat]
    side = cfg.vision_config.image_size
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.zeros(len(flat), max(patches), 3, side, side, dtype=model.dtype)
    for i, n in enumerate(patches):
        pixels[i, :n] = torch.randn(n, 3, side, side, generator=gen).to(model.dtype)
    out = _left_pad(seqs)
    out["pixel_values"] = pixels
    out["image_sizes"] = torch.tensor(flat, dtype=torch.long)
    return out


def _left_pad(seqs: list[list[int]], type_of: Any = None) -> dict[str, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), PAD_TOKEN_ID, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s)
        mask[i, width - len(s) :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def tiny_qwen2_vl(
    seed: int = 0,
    attn_implementation: str = "sdpa",
    version: str = "2",
    text_layers: int = 4,
    vision_layers: int = 2,
    patch_size: int = 4,
    dtype: torch.dtype = torch.float32,
) -> Any:
    """Qwen2VLForConditionalGeneration (version "2") or Qwen2_5_VLForConditionalGeneration ("2.5"), tiny."""
    text: dict[str, Any] = dict(
        _text_kwargs(text_layers),
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    )
    common: dict[str, Any] = dict(
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
        vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID,
        pad_token_id=PAD_TOKEN_ID,
    )
    if version == "2":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        vision: dict[str, Any] = dict(
            depth=vision_layers, embed_dim=32, hidden_size=64, num_heads=4, patch_size=patch_size, mlp_ratio=2
        )
        make: Any = Qwen2VLConfig
        cls: Any = Qwen2VLForConditionalGeneration
    else:
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        vision = dict(
            depth=vision_layers,
            hidden_size=32,
            intermediate_size=64,
            out_hidden_size=64,
            num_heads=4,
            patch_size=patch_size,
            window_size=4 * patch_size,  # 2x2 merged tokens per window: real windowing on tiny grids
            fullatt_block_indexes=[vision_layers - 1],
        )
        make = Qwen2_5_VLConfig
        cls = Qwen2_5_VLForConditionalGeneration
    config = make(text_config=text, vision_config=vision, **common)
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return _finish(cls(config), attn_implementation, dtype)


def qwen_inputs(
    model: Any,
    prompts: list[list[int]],
    images: list[list[tuple[int, int, int]]],
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Left-padded batch like Qwen's processor makes. images[i]: (t, h, w) patch grids of sample i's visual items
    (t == 1: an image, t > 1: a video), each wrapped in vision start/end tokens before the text."""
    vc = model.config.vision_config
    merge = vc.spatial_merge_size**2
    seqs, types = [], []
    image_grids: list[tuple[int, int, int]] = []
    video_grids: list[tuple[int, int, int]] = []
    for p, items in zip(prompts, images):
        seq, typ = [1], [0]
        for t, h, w in items:
            video = t > 1
            n = t * h * w // merge
            seq += [VISION_START_ID] + [VIDEO_TOKEN_ID if video else IMAGE_TOKEN_ID] * n + [VISION_END_ID]
            typ += [0] + [2 if video else 1] * n + [0]
            (video_grids if video else image_grids).append((t, h, w))
        seqs.append(seq + list(p))
        types.append(typ + [0] * len(p))
    out = _left_pad(seqs)
    tt = torch.zeros_like(out["input_ids"])
    for i, typ in enumerate(types):
        tt[i, tt.shape[1] - len(typ) :] = torch.tensor(typ)
    out["mm_token_type_ids"] = tt
    gen = torch.Generator().manual_seed(seed)
    width = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    if image_grids:
        n = sum(t * h * w for t, h, w in image_grids)
        out["pixel_values"] = torch.randn(n, width, generator=gen).to(model.dtype)
        out["image_grid_thw"] = torch.tensor(image_grids, dtype=torch.long)
    if video_grids:
        n = sum(t * h * w for t, h, w in video_grids)
        out["pixel_values_videos"] = torch.randn(n, width, generator=gen).to(model.dtype)
        out["video_grid_thw"] = torch.tensor(video_grids, dtype=torch.long)
    return out


def tiny_internvl(
    seed: int = 0,
    attn_implementation: str = "sdpa",
    image_size: int = 32,
    patch_size: int = 4,
    text_layers: int = 4,
    vision_layers: int = 2,
    dtype: torch.dtype = torch.float32,
) -> Any:
    """InternVLForConditionalGeneration (InternViT with [CLS], pixel shuffle 0.5, Qwen2 text), tiny."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, Qwen2Config

    vision = InternVLVisionConfig(
        hidden_size=32,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=[image_size, image_size],
        patch_size=[patch_size, patch_size],
    )
    tokens = (image_size // patch_size // 2) ** 2
    make: Any = InternVLConfig
    config = make(
        vision_config=vision,
        text_config=Qwen2Config(**_text_kwargs(text_layers)),
        image_token_id=IMAGE_TOKEN_ID,
        image_seq_length=tokens,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        pad_token_id=PAD_TOKEN_ID,
    )
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return _finish(InternVLForConditionalGeneration(config), attn_implementation, dtype)


def internvl_inputs(
    model: Any, prompts: list[list[int]], tiles: list[list[int]], seed: int = 0
) -> dict[str, torch.Tensor]:
    """Left-padded batch; sample i has one image per entry of tiles[i] (its tile count), each in <img>...</img>."""
    per_tile = int(model.config.image_seq_length)
    seqs = []
    for p, counts in zip(prompts, tiles):
        seq = [1]
        for n in counts:
            seq += [VISION_START_ID] + [IMAGE_TOKEN_ID] * (per_tile * n) + [VISION_END_ID]
        seqs.append(seq + list(p))
    out = _left_pad(seqs)
    size = model.config.vision_config.image_size[0]
    gen = torch.Generator().manual_seed(seed)
    total = sum(sum(c) for c in tiles)
    out["pixel_values"] = torch.randn(total, 3, size, size, generator=gen).to(model.dtype)
    return out
