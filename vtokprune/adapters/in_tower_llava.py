"""In-tower pruning for the LLaVA families: their `get_image_features` with the selection made inside the vision
tower (see in_tower.py for what that means and for the hooks, :class:`TowerPruning`).

- LLaVA-1.5 (:func:`encode_llava`): one selection per image among its patches.
- LLaVA-NeXT (:func:`encode_llava_next`): tile by tile, the image's budget split over its tiles (:func:`split_budget`).

Both return the original output with an :class:`EncodedImages` attached whose `preselected` holds the selection.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ..errors import CapabilityError
from .in_tower import TowerPruning, stage_keeps

if TYPE_CHECKING:
    from ..strategies.base import VisionSelection, VisionStrategy


def _checked(strategy: VisionStrategy, sel: VisionSelection, n: int, k: int) -> VisionSelection:
    if sel.indices.shape != (n, k):
        raise RuntimeError(f"strategy {strategy.name!r} returned {tuple(sel.indices.shape)} indices, expected {(n, k)}")
    return sel


def _carried(run: TowerPruning) -> torch.Tensor:
    if run.carry is None:
        raise RuntimeError(f"vtokprune: vision layer {run.layer + 1} never ran, so no in-tower selection was made")
    return run.carry


def _signals_at(patches: torch.Tensor, captured: dict[str, dict[int, torch.Tensor]], whole: bool = True) -> Any:
    """Signals over `patches`; the grid only when they are the whole image (`whole`) and square."""
    from ..strategies.base import VisionSignals

    t = patches.shape[1]
    side = math.isqrt(t)
    return VisionSignals(
        features=patches,
        grid=(side, side) if whole and side * side == t else None,
        cls_attn=captured.get("cls_attn", {}),
        keys=captured.get("keys", {}),
        values=captured.get("values", {}),
        cls_keys=captured.get("cls_keys", {}),
        cls_values=captured.get("cls_values", {}),
    )


def encode_llava(adapter: Any, original: Callable[..., Any], args: dict[str, Any], strategy: VisionStrategy) -> Any:
    """LLaVA-1.5's `get_image_features` with in-tower selection; the output carries EncodedImages with the
    selection made (`preselected`), and `pooler_output` padded back to every placeholder (zeros where dropped)."""
    from .vision_signals import EncodedImages, group_features

    if adapter._keeps_cls(args):
        raise CapabilityError(
            "in-tower pruning with vision_feature_select_strategy='full' ([CLS] among the features) is not supported"
        )

    def choose(patches: torch.Tensor, captured: dict[str, dict[int, torch.Tensor]], stage: int) -> Any:
        k = stage_keeps(run.tokens, strategy.budget(run.tokens), len(run.layers))[stage]
        k = min(k, int(patches.shape[1]))
        signals = _signals_at(patches, captured, whole=stage == 0)
        sel = _checked(strategy, strategy.select(signals, k), patches.shape[0], k)
        return sel.indices, sel.features, None

    run = TowerPruning(adapter, strategy, choose)
    args = dict(args, return_dict=True)
    with run.active(adapter._vision_layers()):
        out = original(**args)
    kept = _carried(run)
    compact = [f[: kept.shape[1]] for f in out.pooler_output]  # [k, D] per image (a fused row, if any, is last)
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
    from .vision_signals import EncodedImages

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

    def choose(patches: torch.Tensor, captured: dict[str, dict[int, torch.Tensor]], stage: int) -> Any:
        if stage:
            raise RuntimeError("vtokprune: LLaVA-NeXT in-tower selection has one stage")  # check_in_tower refuses more
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
