"""The adapter interface: how a model family exposes its vision tower, its decoder and its image placeholders.

An adapter wraps one module's `forward` (the multimodal model that merges image features into the text sequence).
On a prefill that carries images it:

1. encodes the images itself, with attention probes active on the vision layers the strategy reads;
2. lets a vision strategy choose (or merge) tokens per image;
3. shortens the placeholder runs, the ids, the mask and the positions (kept tokens keep their original positions),
   and calls the original forward with the pruned features;
4. records, keyed by the KV cache, how the sequence was shortened, so decoding steps get masks and positions that
   match the shortened cache.

In-LLM strategies are run by decoder-layer hooks (runtime.py); the adapter only describes where the layers are.

This module: the family interface, installing / removing the hooks, and the prefill flow. Step 1's output
(`EncodedImages`) and the vision-layer probes are in vision_signals.py; steps 3-4 and the decode steps (placeholder
slots, compaction, positions, cache records) are in sequence.py (`SequenceBookkeeping`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import transformers
from torch import nn

from ..compaction import Compaction
from ..compat import cache_from_output, native_cache_name, normalise_cache_args
from ..errors import CapabilityError, PruningStateError
from ..probe import install_probe, probing, uninstall_probe
from ..runtime import CacheRecord, PrunerState, Selection, active_run, decoder_pre_hook, make_stage_probe
from ..strategies.base import LLMStrategy, Strategy, VisionSelection, VisionStrategy
from .hooks import InstalledHook, LabelledForward, PrunedForward, adapter_pass, bypass_guard, encoder_hook
from .sequence import SequenceBookkeeping
from .vision_signals import EncodedImages, group_features


class Adapter(SequenceBookkeeping):
    model_types: ClassVar[tuple[str, ...]] = ()
    family: ClassVar[str] = ""
    example_model: ClassVar[str] = ""

    def __init__(self, model: nn.Module) -> None:
        self.model: Any = model

    # ------------------------------------------------------------------ structure, per family
    def wrapped_module(self) -> Any:
        raise NotImplementedError

    def decoder_layers(self) -> Any:
        raise NotImplementedError

    def text_config(self) -> Any:
        raise NotImplementedError

    def image_token_id(self) -> int:
        raise NotImplementedError

    def vision_attention(self, layer: int) -> Any:
        raise NotImplementedError

    def vision_num_layers(self) -> int:
        raise NotImplementedError

    def feature_layer(self) -> int:
        """0-based vision layer whose output is the feature the projector reads."""
        raise NotImplementedError

    def has_cls(self) -> bool:
        return False

    def mrope(self) -> bool:
        """True for 3-D (M-RoPE) positions, which always keep their original values."""
        return False

    def signal_layers(self, strategy: VisionStrategy) -> tuple[int, ...]:
        """Vision layers the strategy reads: at its in-tower stages (adapters/in_tower.py), else at feature_layer."""
        from .in_tower import probe_layers

        return probe_layers(self, strategy)

    def supported_signals(self) -> frozenset[str]:
        """Vision signals (beyond `features`) this adapter can give strategies."""
        base = frozenset({"keys", "values", "hidden", "grid"})
        return base | {"cls_attn"} if self.has_cls() else base

    def visual_token_mask(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, L] True at the placeholder tokens the visual features fill (images, and videos where supported)."""
        return ids == self.image_token_id()

    def per_token_args(self) -> tuple[str, ...]:
        """Names of extra [B, L] forward arguments that must be shortened together with `input_ids`."""
        return ()

    def placeholder_counts(self, encoded: EncodedImages) -> list[int]:
        """Placeholder tokens each image fills before pruning (default: one per feature)."""
        return [f.shape[0] for f in encoded.features]

    def expand_selection(
        self, encoded: EncodedImages, kept: list[torch.Tensor], feats: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Map each image's kept tokens (indices into what the strategy saw) to (indices into its placeholder run,
        features for those placeholders). Default: unchanged (the strategy saw the placeholder run itself)."""
        return kept, feats

    def encoder_hooks(self) -> dict[str, Callable[..., Any]]:
        """Methods of `image_encoder_module()` to wrap: name -> fn(original, bound_args, strategy) -> output."""
        return {"get_image_features": self.encode_images}

    def encoded_images(self, args: dict[str, Any], strategy: VisionStrategy) -> EncodedImages:
        """The images of a prefill, encoded (by generate() before the call, or here) with the strategy's signals."""
        out = self._encoded_output(args)
        if out is None:  # plain forward with pixel_values: encode here (generate() encodes before the call)
            out = self.image_encoder_module().get_image_features(**self.image_encoder_args(args))
        return self.encoded_from_output(out, strategy)

    def image_encoder_module(self) -> Any:
        """Module whose `get_image_features` the model (and `generate`, which pre-encodes images) calls."""
        return self.wrapped_module()

    def image_encoder_args(self, args: dict[str, Any]) -> dict[str, Any]:
        """Arguments for `get_image_features`, taken from the wrapped forward's arguments."""
        raise NotImplementedError

    def encode_images(self, original: Callable[..., Any], args: dict[str, Any], strategy: VisionStrategy) -> Any:
        """Run the original `get_image_features(**args)` with probes on; return its output with an
        :class:`EncodedImages` attached as `_vtokprune_encoded`."""
        raise NotImplementedError

    def encoded_from_output(self, out: Any, strategy: VisionStrategy) -> EncodedImages:
        """Image features that were encoded without our probes (e.g. expanded for beam search): features only."""
        encoded = getattr(out, "_vtokprune_encoded", None)
        if encoded is not None:
            return encoded  # type: ignore[no-any-return]
        if strategy.needs:
            raise PruningStateError(
                f"strategy {strategy.name!r} needs vision-tower signals, but these image features were encoded "
                "outside vtokprune (pre-computed, or expanded for num_beams/num_return_sequences > 1); pass "
                "pixel_values and use greedy or sampled generation with one sequence per prompt"
            )
        features = list(out.pooler_output)
        return group_features(features)

    def call_pruned(self, forward: Callable[..., Any], args: dict[str, Any], features: list[torch.Tensor]) -> Any:
        """Run the original forward on shortened ids/mask/positions with the given per-image features."""
        raise NotImplementedError

    # ------------------------------------------------------------------ install / remove
    def check(self, strategy: Strategy) -> None:
        """Raise CapabilityError if this model cannot give what the strategy needs."""
        if isinstance(strategy, VisionStrategy) and "cls_attn" in strategy.needs and not self.has_cls():
            raise CapabilityError(
                f"strategy {strategy.name!r} needs [CLS] attention, but the {self.family} vision tower has no [CLS] "
                "token; choose a strategy without [CLS] (e.g. 'divprune', 'pool', 'fastv')"
            )
        if isinstance(strategy, VisionStrategy):
            from .in_tower import check_in_tower

            check_in_tower(self, strategy)
            missing = set(strategy.needs) - set(self.supported_signals())
            if missing:
                raise CapabilityError(
                    f"strategy {strategy.name!r} needs vision signals {sorted(missing)} that the {self.family} adapter "
                    "does not provide; choose a strategy that reads only the projected features (e.g. 'random', "
                    "'divprune') or an in-LLM strategy such as 'fastv'"
                )
        if isinstance(strategy, LLMStrategy):
            n = len(self.decoder_layers())
            for layer in strategy.schedule(n, 1 << 20):
                if not 1 <= layer < n:
                    raise CapabilityError(
                        f"strategy {strategy.name!r} prunes before decoder layer {layer}, but the model has {n} "
                        f"layers; choose a layer in [1, {n - 1}]"
                    )

    def install(self, state: PrunerState) -> None:
        strategy = state.strategy
        module = self.wrapped_module()
        original = module.forward
        signature = inspect.signature(original)
        self.cache_name = native_cache_name(signature.parameters, f"{type(module).__name__}.forward")
        # instance attribute shadows the class method; `del` restores it
        module.forward = PrunedForward(self, state, original, signature)
        state.handles.append(("forward", module))
        top: Any = self.model
        if top is not module and "labels" in inspect.signature(top.forward).parameters:
            top.forward = LabelledForward(self, state, top.forward)
            state.handles.append(("forward", top))
        self._install_guards(state)
        if isinstance(strategy, VisionStrategy):
            encoder: Any = self.image_encoder_module()
            for name, encode in self.encoder_hooks().items():
                setattr(encoder, name, InstalledHook(encoder_hook(getattr(encoder, name), encode, strategy)))
                state.handles.append(("method", (encoder, name)))
            for layer in self.signal_layers(strategy):
                attn: Any = self.vision_attention(layer)
                install_probe(attn)
                state.handles.append(("probe", attn))
        if isinstance(strategy, LLMStrategy):
            layers: Any = self.decoder_layers()
            for stage in strategy.schedule(len(layers), 1 << 20):
                attn = layers[strategy.probe_layer(stage)].self_attn
                install_probe(attn)
                state.handles.append(("probe", attn))
            for i, decoder_layer in enumerate(layers):
                state.handles.append(
                    (
                        "hook",
                        decoder_layer.register_forward_pre_hook(InstalledHook(decoder_pre_hook(i)), with_kwargs=True),
                    )
                )

    def uninstall(self, state: PrunerState) -> None:
        for kind, obj in reversed(state.handles):
            if kind in ("forward", "get_image_features"):
                obj.__dict__.pop(kind, None)
            elif kind == "method":
                owner, name = obj
                owner.__dict__.pop(name, None)
            elif kind == "probe":
                uninstall_probe(obj)
            else:
                obj.remove()
        state.handles.clear()

    # ------------------------------------------------------------------ the wrapped forward
    def _install_guards(self, state: PrunerState) -> None:
        """A pre-hook on the first decoder layer that refuses calls which did not come through `pruned_forward`
        while a filled KV cache is in use: such a call would decode against a pruned cache as if it were whole."""
        layers: Any = self.decoder_layers()
        guard = InstalledHook(bypass_guard(state))
        state.handles.append(("hook", layers[0].register_forward_pre_hook(guard, with_kwargs=True)))

    def pruned_forward(self, state: PrunerState, original: Callable[..., Any], args: dict[str, Any]) -> Any:
        extra = args.pop("kwargs", None) or {}
        args.update(extra)
        args = normalise_cache_args(args, self.cache_name)
        with adapter_pass(state):
            return self._route(state, original, args)

    def _route(self, state: PrunerState, original: Callable[..., Any], args: dict[str, Any]) -> Any:
        past = args.get(self.cache_name)
        record = state.record_for(past)
        has_images = self._has_images(args)
        if record is not None:
            if has_images:
                raise PruningStateError(
                    "vtokprune: new images after a pruned prefill on the same cache are not supported; "
                    "start a new cache (or call vtokprune.remove(model) for multi-turn image chats)"
                )
            state.calls["decode"] += 1
            return self._decode(state, original, args, record)
        if past is not None and past.get_seq_length() > 0:
            raise PruningStateError(
                f"vtokprune: this call continues a KV cache of {past.get_seq_length()} tokens that vtokprune has no "
                f"record of (filled before vtokprune.apply, by another model, or passed in a way vtokprune did not "
                f"see; transformers {transformers.__version__}). Decoding on would mix pruned and unpruned state: "
                "prefill again with a new cache, or call vtokprune.remove(model) to continue it unpruned"
            )
        ids = args.get("input_ids")
        if not has_images or ids is None or not bool(self.visual_token_mask(ids).any()):
            state.last_selection = None
            state.calls["text_only"] += 1
            out = original(**args)  # text-only input: untouched, but its cache is known from now on
            length = (ids if ids is not None else args["inputs_embeds"]).shape[1]
            state.remember(cache_from_output(out), CacheRecord(outer=None, outer_len=length, lm_len=length))
            return out
        state.calls["prefill"] += 1
        return self._prefill(state, original, args)

    def _has_images(self, args: dict[str, Any]) -> bool:
        return args.get("pixel_values") is not None or self._encoded_output(args) is not None

    @staticmethod
    def _encoded_output(args: dict[str, Any]) -> Any:
        return (args.get("mm_encoder_outputs") or {}).get("image")

    def _prefill(self, state: PrunerState, original: Callable[..., Any], args: dict[str, Any]) -> Any:
        strategy = state.strategy
        ids = args["input_ids"]
        image_mask = self.visual_token_mask(ids)
        outer_len = ids.shape[1]
        selection: Selection
        if isinstance(strategy, VisionStrategy):
            encoded = self.encoded_images(args, strategy)
            counts = self.placeholder_counts(encoded)
            self._attach_prompts(encoded, image_mask, args)
            kept, feats = self._select(strategy, encoded)
            run_kept, run_feats = self.expand_selection(encoded, kept, feats)
            keep_mask = self._keep_mask(image_mask, run_kept, counts)
            outer = Compaction.from_keep_mask(keep_mask)
            selection = Selection(
                kept=kept,
                available=[f.shape[0] for f in encoded.features],
                sample_of=self._sample_of(image_mask, counts),
            )
            args = self.compact_args(args, outer, strategy.positions)
            out = self.call_pruned(original, args, run_feats)
            record = CacheRecord(outer=outer, outer_len=outer_len, lm_len=outer.length)
            record.contiguous = strategy.positions == "contiguous" and args["position_ids"].dim() == 2
            compaction: Compaction | None = outer
        else:
            assert isinstance(strategy, LLMStrategy)
            encoded_counts = self.image_token_counts(args)
            run = self._llm_run(state, strategy, image_mask, args.get("attention_mask"), encoded_counts)
            layers: Any = self.decoder_layers()
            probes = {id(layers[strategy.probe_layer(k)].self_attn): make_stage_probe(k) for k in run.budgets}
            with active_run(run), probing(probes):
                out = original(**args)
            record = CacheRecord(outer=None, outer_len=outer_len, lm_len=outer_len, stages=run.new_stages)
            selection = self._llm_selection(run, image_mask, encoded_counts)
            compaction = run.current
        state.last_selection = selection
        state.set_call_compaction(compaction)
        state.remember(cache_from_output(out), record)
        return out

    # ------------------------------------------------------------------ pieces
    def _attach_prompts(self, encoded: EncodedImages, image_mask: torch.Tensor, args: dict[str, Any]) -> None:
        """Give text-guided strategies the prompt (real, non-image token ids) each image belongs to."""
        ids = args["input_ids"]
        mask = args.get("attention_mask")
        valid = ~image_mask if mask is None else (~image_mask & mask.bool())
        samples = self._sample_of(image_mask, self.placeholder_counts(encoded))
        for count, members in encoded.groups.items():
            encoded.signals[count].prompt_ids = [ids[samples[i]][valid[samples[i]]] for i in members]
            encoded.signals[count].embed_tokens = self.model.get_input_embeddings()

    def _select(
        self, strategy: VisionStrategy, encoded: EncodedImages
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if encoded.preselected is not None:  # selected inside the vision tower
            return encoded.preselected
        kept: list[torch.Tensor] = [torch.empty(0)] * len(encoded.features)
        feats: list[torch.Tensor] = [torch.empty(0)] * len(encoded.features)
        for key, members in encoded.groups.items():
            k = strategy.budget(int(encoded.signals[key].features.shape[1]))
            result: VisionSelection = strategy.select(encoded.signals[key], k)
            if result.indices.shape != (len(members), k):
                raise RuntimeError(
                    f"strategy {strategy.name!r} returned {tuple(result.indices.shape)} indices, expected "
                    f"{(len(members), k)}"
                )
            for row, image in enumerate(members):
                kept[image] = result.indices[row]
                feats[image] = result.features[row]
        return kept, feats

    def image_token_counts(self, args: dict[str, Any]) -> list[int]:
        """Visual tokens per image, in placeholder order, without running the vision tower."""
        raise NotImplementedError


__all__ = ["Adapter"]
