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

Families: LLaVA-1.5 (CLIP-style towers with [CLS]); LLaVA-NeXT, tile by tile (see :func:`encode_llava_next`).
Refused with CapabilityError at apply: Qwen2-VL / 2.5-VL (no [CLS]); InternVL (its 2x2 pixel-shuffle groups could be
kept whole, but the tower call does not know which tiles form one image, so a per-image budget cannot be split
there: not supported yet).
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
        from .base import vision_probe

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


def _checked(strategy: VisionStrategy, sel: VisionSelection, n: int, k: int) -> VisionSelection:
    if sel.indices.shape != (n, k):
        raise RuntimeError(f"strategy {strategy.name!r} returned {tuple(sel.indices.shape)} indices, expected {(n, k)}")
    return sel


def _carried(run: TowerPruning) -> torch.Tensor:
    if run.carry is None:
        raise RuntimeError(f"vtokprune: vision layer {run.layer + 1} never ran, so no in-tower selection was made")
    return run.carry


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

    def choose(patches: torch.Tensor, captured: dict[str, dict[int, torch.Tensor]]) -> Any:
        k = strategy.budget(int(patches.shape[1]))
        sel = _checked(strategy, strategy.select(_signals_at(patches, captured), k), patches.shape[0], k)
        return sel.indices, sel.features, None

    run = TowerPruning(adapter, strategy, choose)
    args = dict(args, return_dict=True)
    with run.active(adapter._vision_layers()):
        out = original(**args)
    kept = _carried(run)
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


def split_budget(k: int, sizes: list[int]) -> list[int]:
    """k split over tiles in proportion to their candidate counts (largest remainder, ties to the lower tile),
    never above a tile's size; sums to k when k <= sum(sizes)."""
    total = sum(sizes)
    if total == 0:
        return [0] * len(sizes)
    quota = [k * s / total for s in sizes]
    alloc = [min(int(math.floor(q)), s) for q, s in zip(quota, sizes)]
    order = sorted(range(len(sizes)), key=lambda i: (-(quota[i] - alloc[i]), i))
    while sum(alloc) < k:
        for i in order:
            if sum(alloc) < k and alloc[i] < sizes[i]:
                alloc[i] += 1
    return alloc


def _select_tile(
    strategy: VisionStrategy,
    patches: torch.Tensor,
    captured: dict[str, dict[int, torch.Tensor]],
    p: int,
    cand: torch.Tensor,
    k: int,
    side: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tile p of the tower batch: the strategy picks k of its candidate patches `cand` -> (patch indices, hidden)."""
    from ..strategies.base import VisionSignals

    def rows(name: str) -> dict[int, torch.Tensor]:
        return {layer: x[p : p + 1][:, :, cand] for layer, x in captured.get(name, {}).items()}

    def own(name: str) -> dict[int, torch.Tensor]:
        return {layer: x[p : p + 1] for layer, x in captured.get(name, {}).items()}

    signals = VisionSignals(
        features=patches[p : p + 1, cand],
        grid=(side, side) if cand.numel() == side * side else None,
        cls_attn=rows("cls_attn"),
        keys=rows("keys"),
        values=rows("values"),
        cls_keys=own("cls_keys"),
        cls_values=own("cls_values"),
    )
    sel = _checked(strategy, strategy.select(signals, k), 1, k)
    return cand[sel.indices[0]], sel.features[0]


def encode_llava_next(
    adapter: Any, original: Callable[..., Any], args: dict[str, Any], strategy: VisionStrategy
) -> Any:
    """LLaVA-NeXT anyres: each tile (base image and crops) is pruned in the tower on its own, among its patches that
    survive unpadding, with the image's budget split over the tiles in proportion to those counts. Tiles of one
    tower batch must carry the same number of tokens: a tile with a smaller share carries its next patches in index
    order as fillers through the later layers (dropped afterwards), so each image keeps exactly its budget."""
    from .base import EncodedImages

    if adapter._keeps_cls(args):
        raise CapabilityError("in-tower pruning with vision_feature_select_strategy='full' is not supported")
    side = adapter._side()
    hw = side * side
    layouts = [adapter.layout(s) for s in args["image_sizes"]]
    cands: list[torch.Tensor] = []
    budgets: list[int] = []
    for lay in layouts:
        crop_of, patch_of = lay.content_src // hw, lay.content_src % hw
        per_tile = [torch.sort(patch_of[crop_of == c]).values for c in range(lay.crops)]
        cands += per_tile
        budgets += split_budget(strategy.budget(int(lay.content_src.numel())), [int(c.numel()) for c in per_tile])

    chosen: list[torch.Tensor] = []

    def choose(patches: torch.Tensor, captured: dict[str, dict[int, torch.Tensor]]) -> Any:
        if patches.shape[0] != len(cands):
            raise RuntimeError(f"vtokprune: {patches.shape[0]} tower inputs, but the layouts describe {len(cands)}")
        device = patches.device
        tiles = []
        chosen.clear()
        for p, (cand, k) in enumerate(zip(cands, budgets)):
            cand = cand.to(device)
            idx, feats = (
                _select_tile(strategy, patches, captured, p, cand, k, side) if k else (cand[:0], patches[p, :0])
            )
            chosen.append(idx.cpu())
            carry, hidden = idx, feats.to(patches.dtype)
            if k == cand.numel() and k < hw:  # every candidate kept: the tile runs whole, its padding patches too
                pad = torch.ones(hw, dtype=torch.bool, device=device)
                pad[cand] = False
                rest = torch.nonzero(pad, as_tuple=True)[0]
                carry, hidden = torch.cat([carry, rest]), torch.cat([hidden, patches[p, rest]])
            order = torch.sort(carry).indices
            tiles.append((carry[order], hidden[order]))
        width = max(int(c.numel()) for c, _ in tiles)
        carry_all = torch.zeros((len(tiles), width), dtype=torch.long, device=device)
        hidden_all = patches.new_zeros((len(tiles), width, patches.shape[2]))
        live = torch.zeros((len(tiles), width), dtype=torch.bool, device=device)
        for p, (c, h) in enumerate(tiles):
            n = int(c.numel())
            # Padding rows: copies of the tile's first carried patch (or patch 0), masked out as keys afterwards.
            carry_all[p, :n], hidden_all[p, :n], live[p, :n] = c, h, True
            carry_all[p, n:] = c[0] if n else 0
            hidden_all[p, n:] = h[0] if n else patches[p, 0]
        return carry_all, hidden_all, live

    run = TowerPruning(adapter, strategy, choose, scatter=True)
    args = dict(args, return_dict=True)
    with run.active(adapter._vision_layers(), adapter.inner.vision_tower):
        out = original(**args)
    _carried(run)
    packed = list(out.pooler_output)
    features = [p[lay.content_run.to(p.device)] for p, lay in zip(packed, layouts)]
    kept, kept_feats = [], []
    start = 0
    for f, lay in zip(features, layouts):
        content_of = torch.full((lay.crops * hw,), -1, dtype=torch.long)
        content_of[lay.content_src] = torch.arange(lay.content_src.numel())
        flat = torch.cat([c * hw + chosen[start + c] for c in range(lay.crops)])
        idx = torch.sort(content_of[flat]).values
        assert bool((idx >= 0).all()), "an in-tower pick fell outside the unpadded image"
        kept.append(idx.to(f.device))
        kept_feats.append(f[idx.to(f.device)])
        start += lay.crops
    keys_of: dict[tuple[int, ...], int] = {}
    groups: dict[int, list[int]] = {}
    for i, (f, lay) in enumerate(zip(features, layouts)):
        groups.setdefault(keys_of.setdefault((int(f.shape[0]), *lay.signature), len(keys_of)), []).append(i)
    from ..strategies.base import VisionSignals

    signals = {
        key: VisionSignals(
            features=torch.stack([features[i] for i in members]),
            grid=layouts[members[0]].grid,
            tiles=layouts[members[0]].tiles,
        )
        for key, members in groups.items()
    }
    out._vtokprune_encoded = EncodedImages(
        features=features, signals=signals, groups=groups, layout=(layouts, packed), preselected=(kept, kept_feats)
    )
    return out
