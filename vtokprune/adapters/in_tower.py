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

Mechanism: forward pre-hooks on the tower's layers (the selection, the key mask of padding rows; on InternVL the mask
goes to the layers' attention modules), registered for one encoder call and active only in the context that
registered them (a ContextVar), so concurrent calls on the same model stay apart.

Families: LLaVA-1.5 (CLIP-style towers with [CLS]), in one stage or progressive stages; LLaVA-NeXT, tile by tile;
InternVL, tile by tile with each 2x2 pixel-shuffle group (one LLM token) kept or dropped whole (in_tower_internvl.py).
Refused with CapabilityError at apply: Qwen2-VL / 2.5-VL (their towers have no [CLS], whose attention these strategies
select by).

This module: what in-tower pruning accepts (:func:`validate_strategy`, :func:`check_in_tower`) and the tower hooks
(:class:`TowerPruning`). The LLaVA families' `get_image_features` with in-tower selection (`encode_llava`,
`encode_llava_next`) are in in_tower_llava.py, InternVL's (`encode_internvl`) in in_tower_internvl.py.
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
IN_TOWER_FAMILIES = ("LLaVA-1.5", "LLaVA-NeXT", "InternVL")
MULTI_STAGE_FAMILIES = ("LLaVA-1.5",)
SLICED_SIGNALS = ("cls_attn", "keys", "values")  # [P, H, T(, d)]: the token axis is 2


def _raw_layers(strategy: VisionStrategy) -> tuple[int, ...] | None:
    layer = getattr(strategy, "in_tower_layer", None)
    if layer is None:
        return None
    return tuple(layer) if isinstance(layer, (tuple, list)) else (layer,)


def validate_strategy(strategy: VisionStrategy) -> None:
    """Called when a strategy is built with in_tower_layer set."""
    layers = _raw_layers(strategy)
    if not layers or any(isinstance(x, bool) or not isinstance(x, int) for x in layers):
        raise BudgetError(
            f"{strategy.name} in_tower_layer must be an int vision layer, a tuple of them (progressive stages), or "
            f"None, got {strategy.in_tower_layer!r}"
        )
    if "cls_attn" not in strategy.needs or "hidden" in strategy.needs:
        raise CapabilityError(
            f"strategy {strategy.name!r} cannot select inside the vision tower: in_tower_layer= is for the [CLS]-"
            "attention strategies (cls, cls_multilayer, visionzip, holov) and flowcut; drop in_tower_layer"
        )


def selection_layers(adapter: Adapter, strategy: VisionStrategy) -> tuple[int, ...] | None:
    """The strategy's in-tower stage layers as 0-based indices into the adapter's tower, or None (post-tower)."""
    layers = _raw_layers(strategy)
    if layers is None:
        return None
    return tuple(int(x) if x >= 0 else adapter.vision_num_layers() + int(x) for x in layers)


def probe_layers(adapter: Adapter, strategy: VisionStrategy) -> tuple[int, ...]:
    """Vision layers whose attention the strategy reads: for in-tower stages, what each stage reads, together."""
    num = adapter.vision_num_layers()
    stages = selection_layers(adapter, strategy) or (adapter.feature_layer(),)
    return tuple(sorted({layer for s in stages for layer in strategy.vision_layers(num, s)}))


def stage_keeps(tokens: int, k: int, stages: int) -> list[int]:
    """Tokens kept after each of `stages` progressive in-tower stages: a geometric path from `tokens` to exactly `k`
    (stage i keeps round(tokens * (k / tokens) ** ((i + 1) / stages)), never fewer than k)."""
    if stages < 1 or k >= tokens:
        return [min(k, tokens)] * max(stages, 1)
    ratio = k / tokens
    keeps = [max(k, round(tokens * ratio ** ((i + 1) / stages))) for i in range(stages - 1)]
    return [*keeps, k]


def check_in_tower(adapter: Adapter, strategy: VisionStrategy) -> None:
    """CapabilityError at apply when in-tower pruning makes no sense for this model."""
    layers = selection_layers(adapter, strategy)
    if layers is None:
        return
    if adapter.family not in IN_TOWER_FAMILIES:
        why = "has no [CLS] token" if not adapter.has_cls() else "is not supported for in-tower pruning yet"
        raise CapabilityError(
            f"in_tower_layer={strategy.in_tower_layer}: the {adapter.family} vision tower {why}; prune after the "
            f"tower (drop in_tower_layer). In-tower pruning works on: {', '.join(IN_TOWER_FAMILIES)}"
        )
    feature = adapter.feature_layer()
    for layer in layers:
        if not 0 <= layer < feature:
            raise CapabilityError(
                f"in_tower_layer={strategy.in_tower_layer}: vision layer {layer} must come before the feature layer "
                f"({feature}) of this {adapter.vision_num_layers()}-layer tower to prune anything inside it; choose "
                f"layers in [0, {feature - 1}], or None to prune after the tower"
            )
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise CapabilityError(
            f"in_tower_layer={strategy.in_tower_layer}: progressive stages must be strictly increasing vision layers "
            f"(here {list(layers)})"
        )
    if len(layers) > 1 and adapter.family not in MULTI_STAGE_FAMILIES:
        raise CapabilityError(
            f"in_tower_layer={strategy.in_tower_layer}: progressive in-tower stages work on "
            f"{', '.join(MULTI_STAGE_FAMILIES)}; on {adapter.family} give one layer"
        )
    feature_layer = adapter.wrapped_module().config.vision_feature_layer
    if not isinstance(feature_layer, int):
        raise CapabilityError(
            f"in-tower pruning needs one vision feature layer; this model concatenates layers {feature_layer}"
        )


class TowerPruning:
    """One encoder call's in-tower selection, in one stage or several (progressive: each stage selects among the
    tokens the previous one kept, and the layers between run on those).

    `choose(patches, signals, stage) -> (carry [P, m], hidden [P, m, D], live [P, m] | None)` picks, from the patch
    hidden states leaving the stage's layer, the patches that go on through the tower (indices into the `patches` it
    is given, in ascending order) and their hidden states; `live` False marks padding rows (tiles of one tower batch
    carry the same count m), which later layers mask out as keys (single-stage only). The signals a stage sees cover
    the tokens it chooses among (earlier layers' captures are cut down to them). `carry` accumulates indices into the
    P tower inputs' original patches. With `scatter=True` a forward hook on the tower puts every shortened hidden state
    of its output back at full length (zeros at dropped patches), for models whose feature code needs the whole grid
    (LLaVA-NeXT packing). With `mask_attention=True` the key mask of the later layers goes to their attention modules
    (`adapter.vision_attention(i)`, as its `attention_mask` keyword) instead of the layers, for towers whose layers
    take no mask (InternViT).
    """

    def __init__(
        self,
        adapter: Adapter,
        strategy: VisionStrategy,
        choose: Callable[
            [torch.Tensor, dict[str, dict[int, torch.Tensor]], int],
            tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
        ],
        cls_offset: int = 1,
        scatter: bool = False,
        mask_attention: bool = False,
    ) -> None:
        layers = selection_layers(adapter, strategy)
        assert layers is not None
        self.adapter, self.strategy, self.choose, self.cls_offset = adapter, strategy, choose, cls_offset
        self.layers, self.scatter, self.mask_attention = layers, scatter, mask_attention
        self.layer = layers[0]
        self.captured: dict[str, dict[int, torch.Tensor]] = {}
        self.carry: torch.Tensor | None = None
        self.stages_run = 0
        self.mask: torch.Tensor | None = None  # [P, 1, 1, cls + m] additive key mask of the later layers
        self.live: torch.Tensor | None = None
        self.tokens = 0  # patch tokens per tower input before the first selection
        self.fuse = bool(getattr(strategy, "in_tower_fuse", False))
        self.fused_size: torch.Tensor | None = None  # [P] patches the fused row (last) stands for, once there is one

    def _select_hook(self, stage: int) -> Callable[..., Any]:
        def hook(module: Any, args: tuple, kwargs: dict) -> Any:
            if _ACTIVE.get() is not self:
                return None
            return self._select(stage, module, args, kwargs)

        return hook

    def _select(self, stage: int, module: Any, args: tuple, kwargs: dict) -> Any:
        hidden = args[0] if args else kwargs["hidden_states"]
        before, fused_before = self.carry, None
        if stage == 0:
            patches = hidden[:, self.cls_offset :]
            self.tokens = int(patches.shape[1])
        else:
            width = -1 if before is None else int(before.shape[1])
            rows = hidden.shape[1] - self.cls_offset - (self.fused_size is not None)
            if before is None or self.stages_run != stage or rows != width:
                raise RuntimeError(
                    f"vtokprune: in-tower stage {stage} at vision layer {self.layers[stage]} found {rows} patches, "
                    f"but stage {self.stages_run - 1} carried {width}"
                )
            patches = hidden[:, self.cls_offset : self.cls_offset + width]
            if self.fused_size is not None:
                fused_before = hidden[:, self.cls_offset + width]
                self._cut_signals(None, width)  # the fused row is no candidate
        local, carried, live = self.choose(patches, self.captured, stage)
        if stage > 0 and live is not None:
            raise RuntimeError("vtokprune: padding rows are only supported in single-stage in-tower selection")
        self.carry = local if stage == 0 or before is None else torch.gather(before, 1, local.to(before.device))
        self.stages_run = stage + 1
        if len(self.layers) > stage + 1:
            self._cut_signals(local)
        fused = self._fuse(patches, local, fused_before, live) if self.fuse else None
        self.live = live
        self.mask = None
        zero = torch.zeros((), dtype=hidden.dtype, device=hidden.device)
        low = torch.finfo(hidden.dtype).min
        if (live is not None and not bool(live.all())) or fused is not None:
            keys = torch.ones((carried.shape[0], self.cls_offset + carried.shape[1]), dtype=torch.bool)
            if live is not None:
                keys[:, self.cls_offset :] = live.cpu()
            bias = torch.where(keys.to(hidden.device), zero, low)
            if fused is not None and self.fused_size is not None:
                size = self.fused_size.to(hidden.device)
                bias = torch.cat(
                    [bias, torch.where(size > 0, size.clamp(min=1).log().to(hidden.dtype), low)[:, None]], 1
                )
            self.mask = bias[:, None, None, :]
        parts = [hidden[:, : self.cls_offset], carried.to(hidden.dtype)]
        new = torch.cat([*parts, fused.to(hidden.dtype)] if fused is not None else parts, 1)
        if self.mask_attention:  # the attention modules' own hooks give them the mask
            return _replace_hidden(args, kwargs, new)
        return self._mask_hook(module, *_replace_hidden(args, kwargs, new))

    def _fuse(
        self, patches: torch.Tensor, local: torch.Tensor, before: torch.Tensor | None, live: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """EViT's fused token: the patches this stage drops (with what earlier stages fused), averaged into one row
        that rides through the later layers as attention context with a log(size) key bias (ToMe's proportional
        attention: it weighs as the tokens it stands for). None while nothing was dropped."""
        dropped = torch.ones(patches.shape[:2], dtype=torch.bool, device=patches.device)
        local = local.to(patches.device)
        if live is None:
            dropped.scatter_(1, local, False)
        else:  # padding rows (live False) repeat a kept index, or patch 0 in a tile that keeps none: not kept
            rows = torch.arange(local.shape[0], device=patches.device)[:, None].expand_as(local)
            on = live.to(patches.device)
            dropped[rows[on], local[on]] = False
        count = dropped.sum(dim=1).float()
        total = (patches.float() * dropped[..., None]).sum(dim=1)
        if before is not None and self.fused_size is not None:
            prior = self.fused_size.to(patches.device)
            total, count = total + prior[:, None] * before.float(), count + prior
        if self.fused_size is None and not bool((count > 0).any()):
            return None
        self.fused_size = count
        return (total / count.clamp(min=1)[:, None])[:, None]

    def _cut_signals(self, local: torch.Tensor | None, width: int = 0) -> None:
        """Captured signals of the layers so far, down to the tokens the stage kept (token axis 2), or (local None)
        to their first `width` tokens."""
        for name in SLICED_SIGNALS:
            for layer, x in self.captured.get(name, {}).items():
                if local is None:
                    self.captured[name][layer] = x[:, :, :width]
                    continue
                idx = local.to(x.device)[:, None, :]
                idx = idx.expand(x.shape[0], x.shape[1], -1)
                if x.dim() == 4:
                    idx = idx[..., None].expand(-1, -1, -1, x.shape[3])
                self.captured[name][layer] = torch.gather(x, 2, idx)

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
        """[P, cls + m (+ fused) | cls, D] -> [P, cls + tokens, D], zeros at the patches that did not go on."""
        if not torch.is_tensor(x) or x.dim() != 3 or x.shape[1] == self.cls_offset + self.tokens or self.carry is None:
            return x
        x = x[:, : self.cls_offset + self.carry.shape[1]]
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
            for i in probe_layers(adapter, strategy)
        }
        handles = [
            layers[layer + 1].register_forward_pre_hook(self._select_hook(stage), with_kwargs=True)
            for stage, layer in enumerate(self.layers)
        ]
        feature = adapter.feature_layer()
        for i in range(self.layer + 1, feature + 1):
            if self.mask_attention:
                attn: Any = adapter.vision_attention(i)
                handles.append(attn.register_forward_pre_hook(self._mask_hook, with_kwargs=True))
            elif i > self.layer + 1 and i - 1 not in self.layers:
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
