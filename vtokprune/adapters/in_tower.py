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

Families: LLaVA-1.5 (CLIP-style towers with [CLS]); LLaVA-NeXT, tile by tile.
Refused with CapabilityError at apply: Qwen2-VL / 2.5-VL (no [CLS]); InternVL (its 2x2 pixel-shuffle groups could be
kept whole, but the tower call does not know which tiles form one image, so a per-image budget cannot be split
there: not supported yet).

This module: what in-tower pruning accepts (:func:`validate_strategy`, :func:`check_in_tower`) and the tower hooks
(:class:`TowerPruning`). The LLaVA families' `get_image_features` with in-tower selection (`encode_llava`,
`encode_llava_next`) are in in_tower_llava.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import torch

from ..errors import BudgetError, CapabilityError
from ..probe import probing

if TYPE_CHECKING:
    from ..strategies.base import VisionStrategy
    from .base import Adapter

_ACTIVE: ContextVar[Any] = ContextVar("vtokprune_in_tower", default=None)
IN_TOWER_FAMILIES = ("LLaVA-1.5", "LLaVA-NeXT")


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
    feature_layer = adapter.wrapped_module().config.vision_feature_layer
    if not isinstance(feature_layer, int):
        raise CapabilityError(
            f"in-tower pruning needs one vision feature layer; this model concatenates layers {feature_layer}"
        )


class TowerPruning:
    """One encoder call's in-tower selection.

    `choose(patches, signals) -> (carry [P, m], hidden [P, m, D], live [P, m] | None)` picks, from the patch hidden
    states leaving `layer`, the patches that go on through the tower (indices into the P tower inputs' patches, in
    ascending order) and their hidden states; `live` False marks padding rows (tiles of one tower batch carry the same
    count m), which later layers mask out as keys. With `scatter=True` a forward hook on the tower puts every shortened hidden state of its output back at
    full length (zeros at dropped patches), for models whose feature code needs the whole grid (LLaVA-NeXT packing).
    """

    def __init__(
        self,
        adapter: Adapter,
        strategy: VisionStrategy,
        choose: Callable[
            [torch.Tensor, dict[str, dict[int, torch.Tensor]]], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
        ],
        cls_offset: int = 1,
        scatter: bool = False,
    ) -> None:
        layer = selection_layer(adapter, strategy)
        assert layer is not None
        self.adapter, self.strategy, self.choose, self.cls_offset = adapter, strategy, choose, cls_offset
        self.layer, self.scatter = layer, scatter
        self.captured: dict[str, dict[int, torch.Tensor]] = {}
        self.carry: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None  # [P, 1, 1, cls + m] additive key mask of the later layers
        self.live: torch.Tensor | None = None
        self.tokens = 0  # patch tokens per tower input before the selection

    def _select_hook(self, module: Any, args: tuple, kwargs: dict) -> Any:
        if _ACTIVE.get() is not self:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        patches = hidden[:, self.cls_offset :]
        self.tokens = int(patches.shape[1])
        self.carry, carried, live = self.choose(patches, self.captured)
        self.live = live
        self.mask = None
        if live is not None and not bool(live.all()):
            keys = torch.cat([live.new_ones((live.shape[0], self.cls_offset)), live], dim=1)
            zero = torch.zeros((), dtype=hidden.dtype, device=hidden.device)
            self.mask = torch.where(keys, zero, torch.finfo(hidden.dtype).min)[:, None, None, :]
        new = torch.cat([hidden[:, : self.cls_offset], carried.to(hidden.dtype)], 1)
        return self._mask_hook(module, *_replace_hidden(args, kwargs, new))

    def _mask_hook(self, module: Any, args: tuple, kwargs: dict) -> Any:
        """Layers after the selection, up to the feature layer: mask the padding rows as keys."""
        if _ACTIVE.get() is not self or self.mask is None:
            return None if _ACTIVE.get() is not self else (args, kwargs)
        if len(args) >= 2:
            return (args[0], self.mask, *args[2:]), kwargs
        return args, {**kwargs, "attention_mask": self.mask}

    def _drop_hook(self, module: Any, args: tuple, kwargs: dict) -> Any:
        if _ACTIVE.get() is not self:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        return _replace_hidden(args, kwargs, hidden[:, : self.cls_offset])

    def _full(self, x: Any) -> Any:
        """[P, cls + m | cls, D] -> [P, cls + tokens, D], zeros at the patches that did not go on."""
        if not torch.is_tensor(x) or x.dim() != 3 or x.shape[1] == self.cls_offset + self.tokens or self.carry is None:
            return x
        full = x.new_zeros((x.shape[0], self.cls_offset + self.tokens, x.shape[2]))
        full[:, : self.cls_offset] = x[:, : self.cls_offset]
        if x.shape[1] > self.cls_offset:
            rows = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(self.carry)
            live = self.live if self.live is not None else torch.ones_like(self.carry, dtype=torch.bool)
            cols = self.cls_offset + self.carry.to(x.device)
            full[rows[live], cols[live]] = x[:, self.cls_offset :][live]
        return full

    def _scatter_hook(self, module: Any, args: tuple, output: Any) -> Any:
        if _ACTIVE.get() is not self:
            return None
        if getattr(output, "hidden_states", None) is not None:
            output.hidden_states = tuple(self._full(h) for h in output.hidden_states)
        if getattr(output, "last_hidden_state", None) is not None:
            output.last_hidden_state = self._full(output.last_hidden_state)
        return output

    @contextmanager
    def active(self, layers: Any, tower: Any = None) -> Iterator[None]:
        from .vision_signals import vision_probe

        adapter, strategy = self.adapter, self.strategy
        probes = {
            id(adapter.vision_attention(i)): vision_probe(self.captured, i, strategy.needs, self.cls_offset)
            for i in strategy.vision_layers(adapter.vision_num_layers(), self.layer)
        }
        handles = [layers[self.layer + 1].register_forward_pre_hook(self._select_hook, with_kwargs=True)]
        feature = adapter.feature_layer()
        for i in range(self.layer + 2, feature + 1):
            handles.append(layers[i].register_forward_pre_hook(self._mask_hook, with_kwargs=True))
        if feature + 1 < len(layers):  # layers nothing reads: run them on [CLS] alone
            handles.append(layers[feature + 1].register_forward_pre_hook(self._drop_hook, with_kwargs=True))
        if self.scatter:
            handles.append(tower.register_forward_hook(self._scatter_hook))
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
