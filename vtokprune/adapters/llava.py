"""LLaVA-1.5 (transformers' LlavaForConditionalGeneration / LlavaModel, e.g. llava-hf/llava-1.5-7b-hf)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..strategies.base import VisionSignals, VisionStrategy
from . import in_tower_llava
from .base import Adapter
from .vision_signals import EncodedImages, run_with_vision_probes
from .vit_layout import block_attention, has_cls_token, vision_blocks


class LlavaAdapter(Adapter):
    model_types = ("llava",)
    family = "LLaVA-1.5"
    example_model = "llava-hf/llava-1.5-7b-hf"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.inner: Any = model.model if hasattr(model, "lm_head") else model

    def wrapped_module(self) -> Any:
        return self.inner

    def decoder_layers(self) -> Any:
        return self.inner.language_model.layers

    def text_config(self) -> Any:
        return self.inner.config.text_config

    def image_token_id(self) -> int:
        return int(self.inner.config.image_token_id)

    def _vision_layers(self) -> Any:
        return vision_blocks(self.inner.vision_tower)  # CLIP, SigLIP, DINOv2, ViT layouts

    def vision_attention(self, layer: int) -> Any:
        return block_attention(self._vision_layers()[layer])

    def vision_num_layers(self) -> int:
        return len(self._vision_layers())

    def _feature_hidden_index(self, layer: Any = None) -> int:
        layer = self.inner.config.vision_feature_layer if layer is None else layer
        if not isinstance(layer, int):
            layer = max(self._normalise(i) for i in layer)
        return self._normalise(layer)

    def _normalise(self, index: int) -> int:
        return index if index >= 0 else self.vision_num_layers() + 1 + index

    def feature_layer(self) -> int:
        # hidden_states[i] is the output of layer i-1; the attention that made the features is in that layer.
        return max(self._feature_hidden_index() - 1, 0)

    def has_cls(self) -> bool:
        return has_cls_token(self.inner.vision_tower)  # SigLIP towers have none

    def supported_signals(self) -> frozenset[str]:
        # the projector maps each feature-layer token alone to one LLM token only in plain LLaVA-1.5
        exact = type(self) is LlavaAdapter and isinstance(self.inner.config.vision_feature_layer, int)
        return super().supported_signals() | ({"projector"} if exact else set())

    def _keeps_cls(self, args: dict[str, Any]) -> bool:
        strategy = args.get("vision_feature_select_strategy") or self.inner.config.vision_feature_select_strategy
        return strategy == "full"

    def image_encoder_args(self, args: dict[str, Any]) -> dict[str, Any]:
        keys = ("pixel_values", "vision_feature_layer", "vision_feature_select_strategy")
        return {k: args.get(k) for k in keys} | {"return_dict": True}

    def encode_images(self, original: Callable[..., Any], args: dict[str, Any], strategy: VisionStrategy) -> Any:
        if strategy.in_tower_layer is not None:
            return in_tower_llava.encode_llava(self, original, args, strategy)
        cls_offset = 0 if self._keeps_cls(args) else 1
        args = dict(args)
        args["return_dict"] = True
        exact = "projector" in self.supported_signals()
        wants_cls = exact and cls_offset == 1 and "cls_feature" in strategy.wants
        wants_projector = exact and "projector" in strategy.needs | strategy.wants
        if "hidden" in strategy.needs or wants_cls or wants_projector:  # inside an outer forward, hidden states are off
            args["output_hidden_states"] = True
        out, captured = run_with_vision_probes(self, strategy, cls_offset, lambda: original(**args))
        features = list(out.pooler_output)
        hidden: dict[int, torch.Tensor] = {}
        if "hidden" in strategy.needs:
            for layer in strategy.vision_layers(self.vision_num_layers(), self.feature_layer()):
                hidden[layer] = out.hidden_states[layer][:, cls_offset:]
        t = features[0].shape[0]
        projector_input = None
        if wants_projector:
            projector_input = out.hidden_states[self._feature_hidden_index()][:, cls_offset:]
        side = math.isqrt(t)
        signals = VisionSignals(
            features=torch.stack(features),
            grid=(side, side) if side * side == t else None,
            cls_attn=captured.get("cls_attn", {}),
            keys=captured.get("keys", {}),
            values=captured.get("values", {}),
            cls_keys=captured.get("cls_keys", {}),
            cls_values=captured.get("cls_values", {}),
            hidden=hidden,
            projector=self.inner.multi_modal_projector if projector_input is not None else None,
            projector_input=projector_input,
        )
        if wants_cls:
            cls_hidden = out.hidden_states[self._feature_hidden_index()][:, 0]
            signals.cls_feature = self.inner.multi_modal_projector(cls_hidden)
        out._vtokprune_encoded = EncodedImages(
            features=features, signals={t: signals}, groups={t: list(range(len(features)))}
        )
        return out

    def image_token_counts(self, args: dict[str, Any]) -> list[int]:
        encoded = self._encoded_output(args)
        if encoded is not None:
            return [int(f.shape[0]) for f in encoded.pooler_output]
        n_images = args["pixel_values"].shape[0]
        total = int((args["input_ids"] == self.image_token_id()).sum())
        return [total // n_images] * n_images

    def call_pruned(self, forward: Callable[..., Any], args: dict[str, Any], features: list[torch.Tensor]) -> Any:
        args = dict(args)
        args["pixel_values"] = None
        args["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=features)}  # type: ignore[arg-type]
        return forward(**args)
