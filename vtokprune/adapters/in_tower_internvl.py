"""In-tower pruning for InternVL (see in_tower.py for what in-tower pruning means and for :class:`TowerPruning`).

* Selection unit: a shuffled token, i.e. one 2x2 group of vision patches (`InternVLAdapter._groups`), the unit the
  language model sees after pixel shuffle. At the selection layer each tile's strategy sees its tokens exactly as the
  post-tower path shows them ([CLS] attention summed over the group, keys / values averaged, `grid` only for a
  single-tile image, `tiles` the tile's own tokens), with `features` the group's 4 patch hidden states concatenated in
  pixel-shuffle order ([T, 4 * D]); a merged feature (visionzip) splits back into 4 patch rows. The 4 patches of
  every kept token go on through the later layers with [CLS]; after the tower they are scattered back onto the full
  patch grid (zeros elsewhere) so the model's own pixel shuffle and projector (`mlp1`) run, and the kept tokens'
  features are picked (they land at their original placeholder positions). Groups are never split.
* Budget: per image (tiles + thumbnail, one placeholder run), split evenly over its tiles, the remainder to the
  earlier tiles (:func:`in_tower_llava.split_budget` with equal sizes); each image keeps exactly its budget. Tiles of
  one tower batch carry the same number of rows: a tile with a smaller share carries masked padding rows.
* Tile counts: the tower call (`get_image_features`) has no input_ids, so the adapter reads them from the placeholder
  runs where it has them (the model's forward; a wrapper around `generate`, which may encode images before the
  forward) and passes them in a ContextVar (:func:`tiles_from`). A direct `get_image_features` call raises
  PruningStateError rather than guessing.
* One stage only (a tuple in_tower_layer is refused at apply); `in_tower_fuse=True` works (the fused row is dropped
  before the scatter). The InternViT layers take no attention mask, so the key mask of the later layers is given to
  their attention modules (`TowerPruning(mask_attention=True)`).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import torch

from ..errors import CapabilityError, PruningStateError
from .hooks import InstalledHook
from .in_tower import TowerPruning
from .in_tower_llava import _carried, _checked, split_budget

if TYPE_CHECKING:
    from ..runtime import PrunerState
    from ..strategies.base import VisionSignals, VisionStrategy

_TILES: ContextVar[tuple[int, ...] | None] = ContextVar("vtokprune_internvl_tiles", default=None)


def _patch_side(adapter: Any, pixel_values: torch.Tensor) -> int:
    """Patches per side of one tile (tiles are square)."""
    patch = adapter.inner.config.vision_config.patch_size
    ph, pw = (patch, patch) if isinstance(patch, int) else (int(patch[0]), int(patch[1]))
    h, w = int(pixel_values.shape[-2]) // ph, int(pixel_values.shape[-1]) // pw
    if h != w:
        raise CapabilityError(f"in-tower pruning on InternVL needs square tiles, got {h} x {w} patches")
    return h


def tokens_per_tile(adapter: Any, pixel_values: torch.Tensor) -> int:
    """Shuffled tokens (LLM placeholders) per tile."""
    side = _patch_side(adapter, pixel_values)
    return int(round(side * side * float(adapter.inner.config.downsample_ratio) ** 2))


@contextmanager
def tiles_from(adapter: Any, input_ids: Any, pixel_values: Any) -> Iterator[None]:
    """Within the block, encoder calls know how many tiles each image has (from the placeholder runs of
    `input_ids`); a no-op when either is missing."""
    if not torch.is_tensor(input_ids) or not torch.is_tensor(pixel_values):
        yield
        return
    total = int(pixel_values.shape[0])
    counts = adapter._tiles_per_image(input_ids, tokens_per_tile(adapter, pixel_values), total)
    token = _TILES.set(tuple(counts))
    try:
        yield
    finally:
        _TILES.reset(token)


class _Restore:
    """Handle that puts an instance attribute back as it was (absent, or its earlier value) on `remove()`."""

    def __init__(self, owner: Any, name: str) -> None:
        self.owner, self.name = owner, name
        self.had = name in vars(owner)
        self.before = vars(owner).get(name)

    def remove(self) -> None:
        if self.had:
            vars(self.owner)[self.name] = self.before
        else:
            vars(self.owner).pop(self.name, None)


def install_generate(adapter: Any, state: PrunerState) -> None:
    """Wrap the top-level model's `generate` so that the image encoding it may do before the first forward knows the
    tiles of each image. Removed with the other hooks (state.handles), restoring the attribute exactly."""
    top = adapter.model
    original = getattr(top, "generate", None)
    if original is None:
        return

    def generate(*args: Any, **kwargs: Any) -> Any:
        ids = kwargs.get("input_ids")
        if ids is None:
            ids = kwargs.get("inputs", args[0] if args else None)
        with tiles_from(adapter, ids, kwargs.get("pixel_values")):
            return original(*args, **kwargs)

    hook = InstalledHook(generate)
    with suppress(TypeError, ValueError):
        hook.__signature__ = inspect.signature(original)  # type: ignore[attr-defined]
    handle = _Restore(top, "generate")
    vars(top)["generate"] = hook
    state.handles.append(("hook", handle))


def _tile_signals(
    adapter: Any,
    patches: torch.Tensor,
    captured: dict[str, dict[int, torch.Tensor]],
    p: int,
    groups: torch.Tensor,
    whole: bool,
) -> VisionSignals:
    """Tile p's signals over its shuffled tokens; features [1, T, 4 * D] (the group's patches, pixel-shuffle order)."""
    from ..strategies.base import VisionSignals

    t, g = int(groups.shape[0]), int(groups.shape[1])

    def grouped(name: str, reduce: str) -> dict[int, torch.Tensor]:
        return {
            layer: adapter._grouped(x[p : p + 1], 2, groups.to(x.device), reduce)
            for layer, x in captured.get(name, {}).items()
        }

    def own(name: str) -> dict[int, torch.Tensor]:
        return {layer: x[p : p + 1] for layer, x in captured.get(name, {}).items()}

    side = math.isqrt(t)
    return VisionSignals(
        features=patches[p : p + 1, groups.reshape(-1)].reshape(1, t, g * patches.shape[2]),
        grid=(side, side) if whole and side * side == t else None,
        cls_attn=grouped("cls_attn", "sum"),
        keys=grouped("keys", "mean"),
        values=grouped("values", "mean"),
        cls_keys=own("cls_keys"),
        cls_values=own("cls_values"),
        tiles=[list(range(t))],
    )


def _padded(
    tiles: list[tuple[torch.Tensor, torch.Tensor]], patches: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-tile (carry [m_p], hidden [m_p, D]) -> [P, m] carry, [P, m, D] hidden, [P, m] live (False: padding rows,
    copies of the tile's first carried patch, or of patch 0 when it carries none)."""
    device = patches.device
    width = max(int(c.numel()) for c, _ in tiles)
    carry = torch.zeros((len(tiles), width), dtype=torch.long, device=device)
    hidden = patches.new_zeros((len(tiles), width, patches.shape[2]))
    live = torch.zeros((len(tiles), width), dtype=torch.bool, device=device)
    for p, (c, h) in enumerate(tiles):
        n = int(c.numel())
        carry[p, :n], hidden[p, :n], live[p, :n] = c, h, True
        carry[p, n:] = c[0] if n else 0
        hidden[p, n:] = h[0] if n else patches[p, 0]
    return carry, hidden, live


def encode_internvl(adapter: Any, original: Callable[..., Any], args: dict[str, Any], strategy: VisionStrategy) -> Any:
    """InternVL's `get_image_features` with in-tower selection, tile by tile, the image's budget split evenly over its
    tiles; the output carries an EncodedImages (per image, grouped by tile count) whose `preselected` holds the
    selection, and `pooler_output` keeps every token's slot (zeros at dropped tokens)."""
    from ..strategies.base import VisionSignals
    from .vision_signals import EncodedImages

    if adapter._keeps_cls(args):
        raise CapabilityError("in-tower pruning with vision_feature_select_strategy='full' is not supported")
    pixels = args["pixel_values"]
    n_tiles = int(pixels.shape[0])
    counts = _TILES.get()
    if counts is None:
        raise PruningStateError(
            "vtokprune: in-tower pruning on InternVL splits each image's budget over its tiles, but this "
            "get_image_features call does not say which tiles form one image (it has no input_ids); call the model "
            "(model(**inputs)) or model.generate(**inputs), which read the tiles from the image placeholders, or "
            "apply the strategy without in_tower_layer"
        )
    if sum(counts) != n_tiles:
        raise PruningStateError(
            f"vtokprune: the prompt's image placeholders describe {sum(counts)} tiles ({list(counts)} per image), "
            f"but get_image_features was given {n_tiles}; encode the same pixel_values the prompt was built for"
        )
    side = _patch_side(adapter, pixels)
    groups_cpu = adapter._groups(side, torch.device("cpu"))
    t = int(groups_cpu.shape[0])
    budgets: list[int] = []
    whole: list[bool] = []
    for n in counts:
        budgets += split_budget(strategy.budget(n * t), [t] * n)
        whole += [n == 1] * n
    chosen: list[torch.Tensor] = []

    def choose(patches: torch.Tensor, captured: dict[str, dict[int, torch.Tensor]], stage: int) -> Any:
        if stage:
            raise RuntimeError("vtokprune: InternVL in-tower selection has one stage")  # check_in_tower refuses more
        if patches.shape[0] != n_tiles or patches.shape[1] != side * side:
            raise RuntimeError(
                f"vtokprune: the tower carries {tuple(patches.shape[:2])} patches, expected {(n_tiles, side * side)}"
            )
        groups = groups_cpu.to(patches.device)
        chosen.clear()
        tiles = []
        for p, k in enumerate(budgets):
            if k:
                sel = _checked(
                    strategy, strategy.select(_tile_signals(adapter, patches, captured, p, groups, whole[p]), k), 1, k
                )
                tok, merged = sel.indices[0].to(patches.device), sel.features[0]
            else:
                tok, merged = groups[:0, 0], patches.new_zeros((0, patches.shape[2] * groups.shape[1]))
            chosen.append(torch.sort(tok).values.cpu())  # ascending, as VisionSelection promises
            carry = groups[tok].reshape(-1)  # each kept token's patches, whole
            hidden = merged.reshape(carry.numel(), patches.shape[2]).to(patches.dtype)
            order = torch.sort(carry).indices
            tiles.append((carry[order], hidden[order]))
        return _padded(tiles, patches)

    run = TowerPruning(adapter, strategy, choose, scatter=True, mask_attention=True)
    args = dict(args, return_dict=True)
    with run.active(adapter._vision_layers(), adapter.inner.vision_tower):
        out = original(**args)
    _carried(run)
    pooled = out.pooler_output  # [P, T, D]: pixel shuffle + projector on the scattered grid
    keep = torch.zeros((n_tiles, t), dtype=torch.bool)
    for p, tok in enumerate(chosen):
        keep[p, tok] = True
    pooled = torch.where(keep.to(pooled.device)[..., None], pooled, torch.zeros((), dtype=pooled.dtype))
    out.pooler_output = pooled
    starts = [sum(counts[:i]) for i in range(len(counts))]
    features = [pooled[s : s + n].reshape(n * t, -1) for s, n in zip(starts, counts)]
    kept, kept_feats = [], []
    for f, s, n in zip(features, starts, counts):
        idx = torch.cat([j * t + chosen[s + j] for j in range(n)]).to(f.device)  # ascending: tiles in order
        kept.append(idx)
        kept_feats.append(f[idx])
    members: dict[int, list[int]] = {}
    for i, n in enumerate(counts):
        members.setdefault(n, []).append(i)
    grid_side = math.isqrt(t)
    signals = {
        n: VisionSignals(
            features=torch.stack([features[i] for i in images]),
            grid=(grid_side, grid_side) if n == 1 else None,
            tiles=[list(range(j * t, (j + 1) * t)) for j in range(n)],
        )
        for n, images in members.items()
    }
    out._vtokprune_encoded = EncodedImages(
        features=features, signals=signals, groups=members, preselected=(kept, kept_feats)
    )
    return out
