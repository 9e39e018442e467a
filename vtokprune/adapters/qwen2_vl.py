"""Qwen2-VL and Qwen2.5-VL (transformers' Qwen2VLForConditionalGeneration / Qwen2_5_VLForConditionalGeneration).

* A visual token is one merged 2x2 group of vision patches; an image with patch grid (1, h, w) has (h/2)*(w/2)
  tokens in raster order and `VisionSignals.grid == (h/2, w/2)`. A video with grid (t, h, w), t > 1, is one item of
  t*(h/2)*(w/2) tokens with one budget; `grid` is None and `tiles` lists each frame's token indices.
* Images and videos may be mixed and several per prompt; items are handled in the order of their placeholders.
* The vision tower has no [CLS] token, so [CLS]-attention strategies raise CapabilityError at `apply`. Strategies
  that read only the projected features (random, pool, divprune...) and in-LLM strategies (fastv...) work.
* M-RoPE: positions are computed with the model's own `get_rope_index` on the unpruned sequence (or taken from the
  caller, e.g. `generate`, which passes them), and the columns of surviving tokens are kept, so every kept token keeps
  its 3-D position. `mm_token_type_ids` is shortened with the ids. The model's `rope_deltas` is set to
  `max kept position + 1 - pruned length` so that its own decoding arithmetic stays right, and decoding steps without
  explicit positions get `max kept position + 1 + tokens generated so far`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..compat import cache_from_output
from ..errors import PruningStateError
from ..runtime import CacheRecord, PrunerState
from ..strategies.base import VisionSignals, VisionStrategy
from .base import Adapter
from .vision_signals import EncodedImages

IMAGE, VIDEO = 1, 2


class Qwen2VLAdapter(Adapter):
    model_types = ("qwen2_vl",)
    family = "Qwen2-VL"
    example_model = "Qwen/Qwen2-VL-7B-Instruct"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.inner: Any = model.model if hasattr(model, "lm_head") else model
        self._next_position: weakref.WeakKeyDictionary[Any, torch.Tensor] = weakref.WeakKeyDictionary()

    # ------------------------------------------------------------------ structure
    def wrapped_module(self) -> nn.Module:
        return self.inner

    def decoder_layers(self) -> nn.ModuleList:
        return self.inner.language_model.layers  # type: ignore[no-any-return]

    def text_config(self) -> Any:
        return self.inner.config.text_config

    def image_token_id(self) -> int:
        return int(self.inner.config.image_token_id)

    def video_token_id(self) -> int:
        return int(self.inner.config.video_token_id)

    def vision_attention(self, layer: int) -> nn.Module:
        return self.inner.visual.blocks[layer].attn  # type: ignore[no-any-return]

    def vision_num_layers(self) -> int:
        return len(self.inner.visual.blocks)

    def feature_layer(self) -> int:
        return self.vision_num_layers() - 1

    def mrope(self) -> bool:
        return True

    def supported_signals(self) -> frozenset[str]:
        return frozenset({"grid"})  # an image's merged tokens form an (h/2, w/2) grid; videos do not

    def visual_token_mask(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids == self.image_token_id()) | (ids == self.video_token_id())

    def per_token_args(self) -> tuple[str, ...]:
        return ("mm_token_type_ids",)

    def _merge(self) -> int:
        return int(self.inner.config.vision_config.spatial_merge_size)

    # ------------------------------------------------------------------ encoding
    def _has_images(self, args: dict[str, Any]) -> bool:
        encoded = args.get("mm_encoder_outputs") or {}
        return any(
            x is not None
            for x in (
                args.get("pixel_values"),
                args.get("pixel_values_videos"),
                encoded.get("image"),
                encoded.get("video"),
            )
        )

    def encoder_hooks(self) -> dict[str, Callable[..., Any]]:
        return {"get_image_features": self._encode, "get_video_features": self._encode}

    def _encode(self, original: Callable[..., Any], args: dict[str, Any], strategy: VisionStrategy) -> Any:
        args = dict(args)
        args["return_dict"] = True
        out = original(**args)
        grid = args.get("image_grid_thw", args.get("video_grid_thw"))
        out._vtokprune_grid = grid  # generate() hands the forward the features but not the grids
        return out

    def image_encoder_args(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"pixel_values": args["pixel_values"], "image_grid_thw": args.get("image_grid_thw"), "return_dict": True}

    def _outputs(self, args: dict[str, Any]) -> dict[int, tuple[list[torch.Tensor], torch.Tensor | None]]:
        """kind -> (per-item features, [n, 3] grids or None), encoding here what generate() did not encode."""
        encoded = args.get("mm_encoder_outputs") or {}
        result: dict[int, tuple[list[torch.Tensor], torch.Tensor | None]] = {}
        for kind, name, pixels, grid_name in (
            (IMAGE, "image", "pixel_values", "image_grid_thw"),
            (VIDEO, "video", "pixel_values_videos", "video_grid_thw"),
        ):
            out = encoded.get(name)
            if out is None and args.get(pixels) is not None:
                encode = getattr(self.inner, f"get_{name}_features")
                out = encode(args[pixels], args.get(grid_name), return_dict=True)
            if out is None:
                continue
            grid = getattr(out, "_vtokprune_grid", None)
            result[kind] = (list(out.pooler_output), grid if grid is not None else args.get(grid_name))
        return result

    def _order(self, ids: torch.Tensor, counts: dict[int, list[int]]) -> list[tuple[int, int]]:
        """(kind, index within kind) of every visual item, in placeholder order (sample by sample, left to right)."""
        entries = []
        for kind, token in ((IMAGE, self.image_token_id()), (VIDEO, self.video_token_id())):
            rows, cols = (ids == token).nonzero(as_tuple=True)
            want = sum(counts.get(kind, []))
            if int(rows.shape[0]) != want:
                raise ValueError(
                    f"the prompt has {int(rows.shape[0])} {'image' if kind == IMAGE else 'video'} placeholder tokens "
                    f"but the inputs give {want} features; build inputs with the model's processor"
                )
            start = 0
            for j, n in enumerate(counts.get(kind, [])):
                entries.append((int(rows[start]), int(cols[start]), kind, j))
                start += n
        return [(kind, j) for _, _, kind, j in sorted(entries)]

    def encoded_images(self, args: dict[str, Any], strategy: VisionStrategy) -> EncodedImages:
        outputs = self._outputs(args)
        counts = {kind: [int(f.shape[0]) for f in feats] for kind, (feats, _) in outputs.items()}
        order = self._order(args["input_ids"], counts)
        features: list[torch.Tensor] = []
        keys_of: dict[tuple[int, ...], int] = {}
        groups: dict[int, list[int]] = {}
        shapes: dict[int, tuple[int, int, int] | None] = {}
        merge = self._merge()
        for i, (kind, j) in enumerate(order):
            feats, grids = outputs[kind]
            features.append(feats[j])
            thw = None if grids is None else tuple(int(v) for v in grids[j])
            shape = None if thw is None else (thw[0], thw[1] // merge, thw[2] // merge)
            key = keys_of.setdefault((int(feats[j].shape[0]), *(shape or ())), len(keys_of))
            groups.setdefault(key, []).append(i)
            shapes[key] = shape
        signals = {}
        for key, members in groups.items():
            shape = shapes[key]
            grid, tiles = None, None
            if shape is not None:
                t, h, w = shape
                if t == 1:
                    grid = (h, w)
                else:
                    tiles = [list(range(f * h * w, (f + 1) * h * w)) for f in range(t)]
            signals[key] = VisionSignals(features=torch.stack([features[i] for i in members]), grid=grid, tiles=tiles)
        return EncodedImages(features=features, signals=signals, groups=groups, layout=order)

    def image_token_counts(self, args: dict[str, Any]) -> list[int]:
        encoded = args.get("mm_encoder_outputs") or {}
        counts: dict[int, list[int]] = {}
        merge = self._merge() ** 2
        for kind, name, grid_name in ((IMAGE, "image", "image_grid_thw"), (VIDEO, "video", "video_grid_thw")):
            if encoded.get(name) is not None:
                counts[kind] = [int(f.shape[0]) for f in encoded[name].pooler_output]
            elif args.get(grid_name) is not None:
                counts[kind] = [int(v) // merge for v in args[grid_name].prod(-1)]
        return [counts[kind][j] for kind, j in self._order(args["input_ids"], counts)]

    # ------------------------------------------------------------------ positions
    def default_positions(self, args: dict[str, Any], past_len: int) -> torch.Tensor:
        """The model's own M-RoPE positions [3, B, L] for the unpruned sequence."""
        if args.get("mm_token_type_ids") is None:
            raise ValueError(
                "vtokprune: Qwen-VL inputs need `mm_token_type_ids` (the processor returns it) to compute M-RoPE "
                "positions; pass it, or pass position_ids"
            )
        ids = args["input_ids"]
        grids = {k: args.get(k) for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")}
        encoded = args.get("mm_encoder_outputs") or {}
        for name, grid_name in (("image", "image_grid_thw"), ("video", "video_grid_thw")):
            if grids[grid_name] is None and encoded.get(name) is not None:
                grids[grid_name] = getattr(encoded[name], "_vtokprune_grid", None)
        if (
            bool((ids == self.image_token_id()).any())
            and grids["image_grid_thw"] is None
            or bool((ids == self.video_token_id()).any())
            and grids["video_grid_thw"] is None
        ):
            raise ValueError("vtokprune: Qwen-VL inputs with images/videos need image_grid_thw / video_grid_thw")
        kwargs = {k: v for k, v in grids.items() if v is not None}
        positions, _ = self.inner.get_rope_index(
            ids, mm_token_type_ids=args["mm_token_type_ids"], attention_mask=args.get("attention_mask"), **kwargs
        )
        return positions  # type: ignore[no-any-return]

    def call_pruned(self, forward: Callable[..., Any], args: dict[str, Any], features: list[torch.Tensor]) -> Any:
        args = dict(args)
        ids = args["input_ids"]
        counts = [int(f.shape[0]) for f in features]
        slots = self._image_slots(self.visual_token_mask(ids), counts)
        per_kind: dict[str, list[torch.Tensor]] = {"image": [], "video": []}
        for (sample, cols), f in zip(slots, features):
            kind = "video" if int(ids[sample, cols[0]]) == self.video_token_id() else "image"
            per_kind[kind].append(f)
        args["pixel_values"] = None
        args["pixel_values_videos"] = None
        args["mm_encoder_outputs"] = {
            kind: BaseModelOutputWithPooling(pooler_output=tuple(fs))  # type: ignore[arg-type]
            for kind, fs in per_kind.items()
            if fs
        }
        # Next position after the prompt, per sample: what decoding continues from (as if nothing had been pruned).
        positions = args["position_ids"][-3:]
        valid = (
            args["attention_mask"].bool()
            if args.get("attention_mask") is not None
            else torch.ones_like(ids, dtype=torch.bool)
        )
        top = positions.masked_fill(~valid[None], torch.iinfo(positions.dtype).min).amax(dim=(0, 2))
        next_position = top + 1
        self.inner.rope_deltas = (next_position - valid.sum(dim=1))[:, None]
        out = forward(**args)
        cache = cache_from_output(out)
        if cache is not None:
            self._next_position[cache] = next_position
        return out

    def _prefill(self, state: PrunerState, original: Callable[..., Any], args: dict[str, Any]) -> Any:
        out = super()._prefill(state, original, args)
        cache = cache_from_output(out)
        deltas = getattr(self.inner, "rope_deltas", None)
        if cache is not None and cache not in self._next_position and deltas is not None:
            # In-LLM strategies: the model computed the positions itself; continue from them the way it would.
            mask = args.get("attention_mask")
            ids = args["input_ids"]
            length = mask.sum(dim=1) if mask is not None else torch.full((ids.shape[0],), ids.shape[1])
            self._next_position[cache] = length.to(deltas.device) + deltas[:, 0]
        return out

    def _decode(
        self, state: PrunerState, original: Callable[..., Any], args: dict[str, Any], record: CacheRecord
    ) -> Any:
        if args.get("position_ids") is None and record.outer is None and record.stages:
            # transformers' own fallback (positions from the whole 2-D mask) breaks on one-token decoding steps.
            args["position_ids"] = self.decode_positions(args, record, args[self.cache_name].get_seq_length())
        return super()._decode(state, original, args, record)

    def decode_positions(self, args: dict[str, Any], record: CacheRecord, past_len: int) -> torch.Tensor:
        ids = args["input_ids"] if args.get("input_ids") is not None else args["inputs_embeds"][..., 0]
        b, q = ids.shape[:2]
        start = self._next_position.get(args[self.cache_name])
        if start is None:
            raise PruningStateError(
                "vtokprune: no M-RoPE start position was recorded for this pruned KV cache; the prefill did not "
                "return its cache where this transformers release was expected to"
            )
        steps = torch.arange(q, device=ids.device) + (past_len - record.lm_len)
        return (start.to(ids.device)[:, None] + steps[None]).expand(3, b, q)


class Qwen25VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL: same token layout and M-RoPE (plus `second_per_grid_ts` for videos); its vision tower uses window
    attention, which changes nothing here because strategies read the projected features only."""

    model_types = ("qwen2_5_vl",)
    family = "Qwen2.5-VL"
    example_model = "Qwen/Qwen2.5-VL-7B-Instruct"
