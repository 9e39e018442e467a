"""Pruning inside the vision tower: select at an intermediate vision layer, run the later layers on the kept tokens.

With ``in_tower_layer=l`` on a [CLS]-attention strategy (cls, cls_multilayer, visionzip, holov) or FlowCut, the
strategy's signals are read at vision layers up to ``l`` (as if ``l`` were the feature layer), the strategy selects
(or merges) patch tokens from the *hidden states* leaving layer ``l``, and layers ``l+1 ..`` of the tower run on
[CLS] + the kept tokens only. Position embeddings were added before layer 0, so every kept token keeps its position;
[CLS] always stays. Layers after the feature layer (e.g. CLIP's last layer when LLaVA reads the penultimate one) run
on [CLS] alone, since nothing reads them. The projector then sees only the kept tokens, and the language model gets
them at their original placeholder positions, exactly as a post-tower selection of the same indices would place them.

What changes against post-tower pruning: the kept tokens' features are computed without the dropped tokens in the
later layers' attention (that is the saving, and the accuracy trade-off), and merging strategies (visionzip) merge
hidden states of layer ``l`` rather than projected features (as the VisionZip paper does).

Mechanism: two forward pre-hooks on the tower's layers, registered for one encoder call and active only in the
context that registered them (a ContextVar), so concurrent calls on the same model stay apart.

Families: LLaVA-1.5 (CLIP-style towers with [CLS]). LLaVA-NeXT (anyres tiles) and InternVL (pixel-shuffle groups) are
not supported yet, Qwen2-VL has no [CLS]: each raises CapabilityError at apply.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import torch

from ..errors import BudgetError, CapabilityError
from ..probe import probing

if TYPE_CHECKING:
    from ..strategies.base import VisionSelection, VisionStrategy
    from .base import Adapter

_ACTIVE: ContextVar[Any] = ContextVar("vtokprune_in_tower", default=None)
IN_TOWER_FAMILIES = ("LLaVA-1.5",)


def validate_strategy(strategy: VisionStrategy) -> None:
    """Called when a strategy is built with in_tower_layer set."""
    layer = strategy.in_tower_layer
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise BudgetError(f"{strategy.name} in_tower_layer must be an int vision layer or None, got {layer!r}")
    if "cls_attn" not in strategy.needs or "hidden" in strategy.needs:
        raise CapabilityError(
            f"strategy {strategy.name!r} cannot select inside the vision tower: in_tower_layer= is for the [CLS]-"
            "attention strategies (cls, cls_multilayer, visionzip, holov) and flowcut; drop in_tower_layer"
        )


def selection_layer(adapter: Adapter, strategy: VisionStrategy) -> int | None:
    """The strategy's in-tower layer as a 0-based index into the adapter's tower, or None (post-tower)."""
    layer = getattr(strategy, "in_tower_layer", None)
    if layer is None:
        return None
    return int(layer) if layer >= 0 else adapter.vision_num_layers() + int(layer)


def check_in_tower(adapter: Adapter, strategy: VisionStrategy) -> None:
    """CapabilityError at apply when in-tower pruning makes no sense for this model."""
    layer = selection_layer(adapter, strategy)
    if layer is None:
        return
    if adapter.family not in IN_TOWER_FAMILIES:
        why = "has no [CLS] token" if not adapter.has_cls() else "is not supported for in-tower pruning yet"
        raise CapabilityError(
            f"in_tower_layer={strategy.in_tower_layer}: the {adapter.family} vision tower {why}; prune after the "
            f"tower (drop in_tower_layer). In-tower pruning works on: {', '.join(IN_TOWER_FAMILIES)}"
        )
    feature = adapter.feature_layer()
    if not 0 <= layer < feature:
        raise CapabilityError(
            f"in_tower_layer={strategy.in_tower_layer} is vision layer {layer}, but it must come before the feature "
            f"layer ({feature}) of this {adapter.vision_num_layers()}-layer tower to prune anything inside it; choose "
            f"a layer in [0, {feature - 1}], or None to prune after the tower"
        )
    feature_layer = adapter.inner.config.vision_feature_layer
    if not isinstance(feature_layer, int):
        raise CapabilityError(
            f"in-tower pruning needs one vision feature layer; this model concatenates layers {feature_layer}"
        )


class TowerPruning:
    """One encoder call's in-tower selection. `choose(patches, signals) -> VisionSelection` picks from the patch
    hidden states leaving `layer`; the kept rows go on through the tower."""

    def __init__(
        self,
        adapter: Adapter,
        strategy: VisionStrategy,
        choose: Callable[[torch.Tensor, dict[str, dict[int, torch.Tensor]]], VisionSelection],
        cls_offset: int = 1,
    ) -> None:
        layer = selection_layer(adapter, strategy)
        assert layer is not None
        self.adapter, self.strategy, self.choose, self.cls_offset = adapter, strategy, choose, cls_offset
        self.layer = layer
        self.captured: dict[str, dict[int, torch.Tensor]] = {}
        self.selection: VisionSelection | None = None
        self.tokens = 0  # patch tokens per tower input before the selection

    def _select_hook(self, module: Any, args: tuple, kwargs: dict) -> Any:
        if _ACTIVE.get() is not self:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        patches = hidden[:, self.cls_offset :]
        self.tokens = int(patches.shape[1])
        sel = self.choose(patches, self.captured)
        self.selection = sel
        return _replace_hidden(args, kwargs, torch.cat([hidden[:, : self.cls_offset], sel.features.to(hidden.dtype)], 1))

    def _drop_hook(self, module: Any, args: tuple, kwargs: dict) -> Any:
        if _ACTIVE.get() is not self:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        return _replace_hidden(args, kwargs, hidden[:, : max(self.cls_offset, 1)])

    @contextmanager
    def active(self, layers: Any) -> Iterator[None]:
        from .base import vision_probe

        adapter, strategy = self.adapter, self.strategy
        probes = {
            id(adapter.vision_attention(i)): vision_probe(self.captured, i, strategy.needs, self.cls_offset)
            for i in strategy.vision_layers(adapter.vision_num_layers(), self.layer)
        }
        handles = [layers[self.layer + 1].register_forward_pre_hook(self._select_hook, with_kwargs=True)]
        feature = adapter.feature_layer()
        if feature + 1 < len(layers):  # layers nothing reads: run them on [CLS] alone
            handles.append(layers[feature + 1].register_forward_pre_hook(self._drop_hook, with_kwargs=True))
        token = _ACTIVE.set(self)
        try:
            with probing(probes):
                yield
        finally:
            _ACTIVE.reset(token)
            for h in handles:
                h.remove()


def _replace_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _signals_at(patches: torch.Tensor, captured: dict[str, dict[int, torch.Tensor]]) -> Any:
    from ..strategies.base import VisionSignals

    t = patches.shape[1]
    side = math.isqrt(t)
    return VisionSignals(
        features=patches,
        grid=(side, side) if side * side == t else None,
        cls_attn=captured.get("cls_attn", {}),
        keys=captured.get("keys", {}),
        values=captured.get("values", {}),
        cls_keys=captured.get("cls_keys", {}),
        cls_values=captured.get("cls_values", {}),
    )


def encode_llava(adapter: Any, original: Callable[..., Any], args: dict[str, Any], strategy: VisionStrategy) -> Any:
    """LLaVA-1.5's `get_image_features` with in-tower selection; the output carries EncodedImages with the
    selection made (`preselected`), and `pooler_output` padded back to every placeholder (zeros where dropped)."""
    from .base import EncodedImages, group_features

    if adapter._keeps_cls(args):
        raise CapabilityError(
            "in-tower pruning with vision_feature_select_strategy='full' ([CLS] among the features) is not supported"
        )

    def choose(patches: torch.Tensor, captured: dict[str, dict[int, torch.Tensor]]) -> VisionSelection:
        k = strategy.budget(int(patches.shape[1]))
        sel = strategy.select(_signals_at(patches, captured), k)
        if sel.indices.shape != (patches.shape[0], k):
            raise RuntimeError(f"strategy {strategy.name!r} returned {tuple(sel.indices.shape)} indices, expected k={k}")
        return sel

    run = TowerPruning(adapter, strategy, choose)
    args = dict(args, return_dict=True)
    with run.active(adapter._vision_layers()):
        out = original(**args)
    if run.selection is None:
        raise RuntimeError(f"vtokprune: vision layer {run.layer + 1} never ran, so no in-tower selection was made")
    kept = run.selection.indices
    compact = list(out.pooler_output)  # [k, D] per image
    n_patches = run.tokens
    full = []
    for idx, f in zip(kept, compact):
        dense = f.new_zeros((n_patches, f.shape[-1]))
        dense[idx.to(f.device)] = f
        full.append(dense)
    out.pooler_output = full
    encoded: EncodedImages = group_features(full)
    side = math.isqrt(n_patches)
    for signals in encoded.signals.values():
        signals.grid = (side, side) if side * side == n_patches else None
    encoded.preselected = (list(kept), compact)
    out._vtokprune_encoded = encoded
    return out

