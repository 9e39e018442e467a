"""LLaVA-NeXT / LLaVA-1.6 (transformers' LlavaNextForConditionalGeneration, e.g. llava-hf/llava-v1.6-mistral-7b-hf).

An "anyres" image is encoded as a base image (the whole picture at the tower's resolution) plus a grid of crops. The
model packs the crop features into one large grid, removes the rows/columns that only cover padding ("unpadding"),
and appends an `image_newline` token after every row of that grid; the base image's tokens come first. All of it is
one image placeholder run.

How this adapter prunes it:

* The whole anyres image is one image with one budget. Strategies see its *content* tokens only: the base image's
  tokens (raster order) followed by the unpadded crop grid's tokens (raster order over the big grid, newlines left
  out). `keep=k` keeps exactly k of them and `last_selection(model).kept` indexes this content order.
* `VisionSignals.tiles` lists the content indices of each tile: tile 0 is the base image, then the crops in row-major
  crop order (a crop that unpadding removed entirely has an empty list). `grid` is the base grid when the image has no
  crops, else None (there is no single grid; use `tiles`).
* Newline tokens are not counted in the budget and are not shown to strategies. A row's newline is kept when at least
  one token of that row of the crop grid survives (so it still ends a row); rows that lose every token lose their
  newline too. An image without crops keeps its single trailing newline.
* [CLS] attention, keys, values and hidden states come per crop from the vision tower and are mapped onto the content
  tokens through the same packing and unpadding the model applies (each crop's [CLS] attends over its own crop, so
  scores of different crops are softmax-normalised separately). `cls_keys` / `cls_values` are the base image's.

In-LLM strategies (FastV...) see the placeholder run as the language model does, newline tokens included.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
    unpad_image,
)

from ..errors import PruningStateError
from ..strategies.base import VisionSignals, VisionStrategy
from . import in_tower_llava
from .llava import LlavaAdapter
from .vision_signals import EncodedImages, run_with_vision_probes


@dataclass
class AnyresLayout:
    """Where one anyres image's tokens are: content index -> placeholder-run index and -> (crop, patch) source."""

    run_len: int  # placeholder tokens of the image (newlines included)
    content_run: torch.Tensor  # [T] run index of each content token
    content_src: torch.Tensor  # [T] flat index (crop * patches_per_crop + patch) into this image's tower outputs
    content_row: torch.Tensor  # [T] row of the crop grid (-1 for base tokens)
    newline_run: torch.Tensor  # [R] run index of the newline ending each row (row -1: the base-only image's newline)
    crops: int  # crops the tower encoded (base included)
    tiles: list[list[int]]
    grid: tuple[int, int] | None
    signature: tuple[int, ...]


class LlavaNextAdapter(LlavaAdapter):
    model_types = ("llava_next",)
    family = "LLaVA-NeXT"
    example_model = "llava-hf/llava-v1.6-mistral-7b-hf"

    # ------------------------------------------------------------------ layout
    def supported_signals(self) -> frozenset[str]:
        return super().supported_signals() - {"grid"}  # anyres: a base grid plus crops, never one grid

    def _side(self) -> int:
        vc = self.inner.config.vision_config
        return int(vc.image_size // vc.patch_size)

    def layout(self, image_size: Any) -> AnyresLayout:
        """Token layout of one image of original size (height, width), computed with the model's own helpers."""
        cfg = self.inner.config
        size = [int(v) for v in (image_size.tolist() if torch.is_tensor(image_size) else image_size)]
        side = self._side()
        hw = side * side
        n_crops = image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        base = torch.arange(hw)
        if n_crops <= 1:
            return AnyresLayout(
                run_len=hw + 1,
                content_run=base,
                content_src=base,
                content_row=torch.full((hw,), -1),
                newline_run=torch.tensor([hw]),
                crops=1,
                tiles=[list(range(hw))],
                grid=(side, side),
                signature=(1,),
            )
        rows, cols = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        # Global (row, col) of every cell of the padded crop grid, unpadded exactly as the model unpads features.
        r = torch.arange(rows * side)[:, None].expand(rows * side, cols * side)
        c = torch.arange(cols * side)[None, :].expand(rows * side, cols * side)
        kept = unpad_image(torch.stack([r, c]), size)
        height, width = int(kept.shape[1]), int(kept.shape[2])
        gr, gc = kept[0].reshape(-1), kept[1].reshape(-1)
        crop = 1 + (gr // side) * cols + (gc // side)
        src = torch.cat([base, crop * hw + (gr % side) * side + (gc % side)])
        cell = torch.arange(height * width)
        run = torch.cat([base, hw + (cell // width) * (width + 1) + cell % width])
        row = torch.cat([torch.full((hw,), -1), cell // width])
        tiles = [list(range(hw))] + [
            (hw + torch.nonzero(crop == k, as_tuple=True)[0]).tolist() for k in range(1, rows * cols + 1)
        ]
        return AnyresLayout(
            run_len=hw + height * (width + 1),
            content_run=run,
            content_src=src,
            content_row=row,
            newline_run=hw + torch.arange(height) * (width + 1) + width,
            crops=1 + rows * cols,
            tiles=tiles,
            grid=None,
            signature=(rows, cols, height, width, int(gr[0]), int(gc[0])),
        )

    # ------------------------------------------------------------------ encoding
    def image_encoder_args(self, args: dict[str, Any]) -> dict[str, Any]:
        keys = ("pixel_values", "image_sizes", "vision_feature_layer", "vision_feature_select_strategy")
        return {k: args.get(k) for k in keys} | {"return_dict": True}

    def encode_images(self, original: Callable[..., Any], args: dict[str, Any], strategy: VisionStrategy) -> Any:
        if strategy.in_tower_layer is not None:
            return in_tower_llava.encode_llava_next(self, original, args, strategy)
        if self._keeps_cls(args):
            raise NotImplementedError("vtokprune: LLaVA-NeXT with vision_feature_select_strategy='full'")
        args = dict(args)
        args["return_dict"] = True
        if strategy.needs & {"hidden", "projector"}:  # inside an outer forward, hidden states are off
            args["output_hidden_states"] = True
        out, captured = run_with_vision_probes(self, strategy, 1, lambda: original(**args))
        packed = list(out.pooler_output)
        layouts = [self.layout(s) for s in args["image_sizes"]]
        hidden_all: dict[int, torch.Tensor] = {}
        if "hidden" in strategy.needs:
            for layer in strategy.vision_layers(self.vision_num_layers(), self.feature_layer()):
                hidden_all[layer] = out.hidden_states[layer][:, 1:]
        features = [p[lay.content_run.to(p.device)] for p, lay in zip(packed, layouts)]

        offsets = [0]
        for lay in layouts:
            offsets.append(offsets[-1] + lay.crops)

        def per_image(x: torch.Tensor, i: int, head_dim: bool) -> torch.Tensor:
            """[P, (H,) hw, ...] tower output -> this image's content tokens [(H,) T, ...]."""
            part = x[offsets[i] : offsets[i + 1]]
            src = layouts[i].content_src.to(x.device)
            if head_dim:  # [P, H, hw, ...] -> [H, P*hw, ...]
                part = part.transpose(0, 1).flatten(1, 2)
                return part.index_select(1, src)
            return part.flatten(0, 1).index_select(0, src)

        keys_of: dict[tuple[int, ...], int] = {}
        groups: dict[int, list[int]] = {}
        for i, (f, lay) in enumerate(zip(features, layouts)):
            key = keys_of.setdefault((int(f.shape[0]), *lay.signature), len(keys_of))
            groups.setdefault(key, []).append(i)

        signals: dict[int, VisionSignals] = {}
        for key, members in groups.items():
            lay = layouts[members[0]]

            def stack(name: str, head_dim: bool, members: list[int] = members) -> dict[int, torch.Tensor]:
                return {
                    layer: torch.stack([per_image(x, i, head_dim) for i in members])
                    for layer, x in captured.get(name, {}).items()
                }

            signals[key] = VisionSignals(
                features=torch.stack([features[i] for i in members]),
                grid=lay.grid,
                cls_attn=stack("cls_attn", True),
                keys=stack("keys", True),
                values=stack("values", True),
                cls_keys={k: v[[offsets[i] for i in members]] for k, v in captured.get("cls_keys", {}).items()},
                cls_values={k: v[[offsets[i] for i in members]] for k, v in captured.get("cls_values", {}).items()},
                hidden={
                    layer: torch.stack([per_image(x, i, False) for i in members]) for layer, x in hidden_all.items()
                },
                tiles=lay.tiles,
            )
        out._vtokprune_encoded = EncodedImages(
            features=features, signals=signals, groups=groups, layout=(layouts, packed)
        )
        return out

    def encoded_from_output(self, out: Any, strategy: VisionStrategy) -> EncodedImages:
        encoded = getattr(out, "_vtokprune_encoded", None)
        if encoded is None:
            raise PruningStateError(
                "vtokprune: these LLaVA-NeXT image features were encoded outside vtokprune (pre-computed, or expanded "
                "for num_beams/num_return_sequences > 1), so their anyres layout is unknown; pass pixel_values and "
                "image_sizes and use one sequence per prompt"
            )
        return encoded  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ placeholders
    def placeholder_counts(self, encoded: EncodedImages) -> list[int]:
        layouts, _ = encoded.layout
        return [lay.run_len for lay in layouts]

    def expand_selection(
        self, encoded: EncodedImages, kept: list[torch.Tensor], feats: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        layouts, packed = encoded.layout
        run_kept, run_feats = [], []
        for idx, f, lay, p in zip(kept, feats, layouts, packed):
            idx_cpu = idx.cpu()
            rows = lay.content_row[idx_cpu]
            if lay.crops == 1:
                newlines = lay.newline_run
            else:
                newlines = lay.newline_run[torch.unique(rows[rows >= 0])]
            run = torch.cat([lay.content_run[idx_cpu], newlines])
            order = torch.argsort(run)
            all_feats = torch.cat([f, p[newlines.to(p.device)].to(f.dtype)])
            run_kept.append(run[order].to(idx.device))
            run_feats.append(all_feats[order.to(f.device)])
        return run_kept, run_feats

    def image_token_counts(self, args: dict[str, Any]) -> list[int]:
        encoded = self._encoded_output(args)
        if encoded is not None:
            return [int(f.shape[0]) for f in encoded.pooler_output]
        return [self.layout(s).run_len for s in args["image_sizes"]]
