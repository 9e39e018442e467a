"""InternVL 2.5 / 3 in transformers' format (InternVLForConditionalGeneration, e.g. OpenGVLab/InternVL3-1B-hf).

* Dynamic high resolution: an image is a few tiles (plus a thumbnail tile, last) encoded as separate tower inputs;
  the processor writes one placeholder run per image (inside <img>...</img>) holding all its tiles' tokens. The whole
  image is one image with one budget; `VisionSignals.tiles` lists the token indices of each tile, and `grid` is the
  tile grid when the image is a single tile.
* Pixel shuffle (0.5) turns each 2x2 group of vision patches into one token, so pruning happens after
  `get_image_features` (the shuffle needs the full square grid). Vision-tower signals are mapped onto the shuffled
  tokens with the model's own `pixel_shuffle`: [CLS] attention is summed over each token's 2x2 patch group (the
  attention mass the token's patches received); keys, values and hidden states are averaged over it. `cls_keys` /
  `cls_values` are those of the image's last tile (the thumbnail, for a multi-tile image).
* Tiles per image are read from the placeholder runs (run length / tokens per tile), since the model is not given
  them; two images whose placeholder runs touch (no <img>/</img> tokens between them) would count as one image.
* In-tower pruning (`in_tower_layer=`): in_tower_internvl.py; the tile counts reach the tower call through a
  ContextVar set by the model's forward (here, in `encoded_images`) and by a wrapper around `generate`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..errors import PruningStateError
from ..runtime import PrunerState
from ..strategies.base import VisionSignals, VisionStrategy
from . import in_tower_internvl
from .llava import LlavaAdapter
from .vision_signals import EncodedImages, run_with_vision_probes


class InternVLAdapter(LlavaAdapter):
    model_types = ("internvl",)
    family = "InternVL"
    example_model = "OpenGVLab/InternVL3-1B-hf"

    def _vision_layers(self) -> nn.ModuleList:
        tower: Any = self.inner.vision_tower
        return tower.encoder.layer  # type: ignore[no-any-return]

    def vision_attention(self, layer: int) -> nn.Module:
        block: Any = self._vision_layers()[layer]
        return block.attention  # type: ignore[no-any-return]

    def _groups(self, side: int, device: torch.device) -> torch.Tensor:
        """[T, 4] the vision patches (raster index in the side x side tile grid) behind each shuffled token."""
        idx = torch.arange(side * side, dtype=torch.float32).reshape(1, side, side, 1)
        shuffled = self.inner.pixel_shuffle(idx, scale_factor=self.inner.config.downsample_ratio)
        return shuffled.reshape(-1, shuffled.shape[-1]).round().long().to(device)

    @staticmethod
    def _grouped(x: torch.Tensor, dim: int, groups: torch.Tensor, reduce: str) -> torch.Tensor:
        """Patch dim `dim` (side*side) -> token dim (T = groups.shape[0]), summing or averaging each 2x2 group."""
        picked = x.index_select(dim, groups.reshape(-1))
        shape = list(x.shape)
        shape[dim : dim + 1] = [int(groups.shape[0]), int(groups.shape[1])]
        picked = picked.reshape(shape)
        return picked.sum(dim + 1) if reduce == "sum" else picked.mean(dim + 1)

    def install(self, state: PrunerState) -> None:
        super().install(state)
        strategy = state.strategy
        if isinstance(strategy, VisionStrategy) and strategy.in_tower_layer is not None:
            in_tower_internvl.install_generate(self, state)

    # ------------------------------------------------------------------ encoding
    def image_encoder_args(self, args: dict[str, Any]) -> dict[str, Any]:
        keys = ("pixel_values", "vision_feature_layer", "vision_feature_select_strategy")
        return {k: args.get(k) for k in keys} | {"return_dict": True}

    def encode_images(self, original: Callable[..., Any], args: dict[str, Any], strategy: VisionStrategy) -> Any:
        """Per tile: the features, and the strategy's signals mapped onto the shuffled tokens. Grouping tiles into
        images needs the placeholder runs, so it happens in `encoded_images`."""
        if strategy.in_tower_layer is not None:
            return in_tower_internvl.encode_internvl(self, original, args, strategy)
        cls_offset = 0 if self._keeps_cls(args) else 1
        if cls_offset == 0:
            raise NotImplementedError("vtokprune: InternVL with vision_feature_select_strategy='full'")
        args = dict(args)
        args["return_dict"] = True
        if strategy.needs & {"hidden", "projector"}:  # inside an outer forward, hidden states are off
            args["output_hidden_states"] = True
        out, captured = run_with_vision_probes(self, strategy, cls_offset, lambda: original(**args))
        features = out.pooler_output  # [P, T, D]
        t = int(features.shape[1])
        side = int(round((4 * t) ** 0.5))
        groups = self._groups(side, features.device)

        def grouped(x: torch.Tensor, dim: int, reduce: str) -> torch.Tensor:
            return self._grouped(x, dim, groups, reduce)

        tiles: dict[str, Any] = {"features": features}
        tiles["cls_attn"] = {k: grouped(v, 2, "sum") for k, v in captured.get("cls_attn", {}).items()}
        tiles["keys"] = {k: grouped(v, 2, "mean") for k, v in captured.get("keys", {}).items()}
        tiles["values"] = {k: grouped(v, 2, "mean") for k, v in captured.get("values", {}).items()}
        tiles["cls_keys"] = captured.get("cls_keys", {})
        tiles["cls_values"] = captured.get("cls_values", {})
        tiles["hidden"] = {}
        if "hidden" in strategy.needs:
            for layer in strategy.vision_layers(self.vision_num_layers(), self.feature_layer()):
                tiles["hidden"][layer] = grouped(out.hidden_states[layer][:, cls_offset:], 1, "mean")
        out._vtokprune_tiles = tiles
        return out

    @staticmethod
    def _runs(mask: torch.Tensor) -> list[tuple[int, int, int]]:
        """(sample, start, length) of every run of True in a [B, L] mask, sample by sample, left to right."""
        runs = []
        for b in range(mask.shape[0]):
            row = mask[b].to(torch.int8)
            edges = torch.diff(row, prepend=row.new_zeros(1), append=row.new_zeros(1))
            starts = torch.nonzero(edges == 1, as_tuple=True)[0].tolist()
            ends = torch.nonzero(edges == -1, as_tuple=True)[0].tolist()
            runs += [(b, s, e - s) for s, e in zip(starts, ends)]
        return runs

    def _tiles_per_image(self, ids: torch.Tensor, per_tile: int, total: int) -> list[int]:
        runs = self._runs(ids == self.image_token_id())
        counts = [length // per_tile for _, _, length in runs]
        if any(length % per_tile for _, _, length in runs) or sum(counts) != total:
            raise ValueError(
                f"the image placeholder runs ({[r[2] for r in runs]} tokens) do not match {total} tiles of "
                f"{per_tile} tokens; build inputs with the model's processor"
            )
        return counts

    def encoded_images(self, args: dict[str, Any], strategy: VisionStrategy) -> EncodedImages:
        out = self._encoded_output(args)
        if out is None:
            encoder_args = self.image_encoder_args(args)
            if strategy.in_tower_layer is None:
                out = self.image_encoder_module().get_image_features(**encoder_args)
            else:  # the tower call learns each image's tiles from the placeholder runs here
                with in_tower_internvl.tiles_from(self, args.get("input_ids"), args.get("pixel_values")):
                    out = self.image_encoder_module().get_image_features(**encoder_args)
        encoded = getattr(out, "_vtokprune_encoded", None)
        if encoded is not None:  # selected inside the tower, grouped into images there
            return encoded  # type: ignore[no-any-return]
        tiles = getattr(out, "_vtokprune_tiles", None)
        if tiles is None:
            if strategy.needs:
                raise PruningStateError(
                    f"strategy {strategy.name!r} needs vision-tower signals, but these image features were encoded "
                    "outside vtokprune (pre-computed, or expanded for num_beams/num_return_sequences > 1); pass "
                    "pixel_values and use one sequence per prompt"
                )
            tiles = {"features": out.pooler_output}
        feats = tiles["features"]
        n_tiles, per_tile = int(feats.shape[0]), int(feats.shape[1])
        side = int(round(per_tile**0.5))
        counts = self._tiles_per_image(args["input_ids"], per_tile, n_tiles)
        starts = [sum(counts[:i]) for i in range(len(counts))]
        features = [feats[s : s + n].reshape(n * per_tile, -1) for s, n in zip(starts, counts)]
        groups: dict[int, list[int]] = {}
        for i, n in enumerate(counts):
            groups.setdefault(n, []).append(i)

        def stack(name: str, head_dim: bool, members: list[int]) -> dict[int, torch.Tensor]:
            result = {}
            for layer, x in tiles.get(name, {}).items():
                parts = []
                for i in members:
                    part = x[starts[i] : starts[i] + counts[i]]  # [n, (H,) T, ...]
                    parts.append(part.transpose(0, 1).flatten(1, 2) if head_dim else part.flatten(0, 1))
                result[layer] = torch.stack(parts)
            return result

        def last_tile(name: str, members: list[int]) -> dict[int, torch.Tensor]:
            ends = [starts[i] + counts[i] - 1 for i in members]
            return {layer: x[ends] for layer, x in tiles.get(name, {}).items()}

        signals = {}
        for n, members in groups.items():
            signals[n] = VisionSignals(
                features=torch.stack([features[i] for i in members]),
                grid=(side, side) if n == 1 else None,
                cls_attn=stack("cls_attn", True, members),
                keys=stack("keys", True, members),
                values=stack("values", True, members),
                cls_keys=last_tile("cls_keys", members),
                cls_values=last_tile("cls_values", members),
                hidden=stack("hidden", False, members),
                tiles=[list(range(j * per_tile, (j + 1) * per_tile)) for j in range(n)],
            )
        return EncodedImages(features=features, signals=signals, groups=groups)

    def image_token_counts(self, args: dict[str, Any]) -> list[int]:
        return [length for _, _, length in self._runs(args["input_ids"] == self.image_token_id())]

    def call_pruned(self, forward: Callable[..., Any], args: dict[str, Any], features: list[torch.Tensor]) -> Any:
        args = dict(args)
        args["pixel_values"] = None
        pooled = torch.cat(features)[None]
        args["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=pooled)}
        return forward(**args)
