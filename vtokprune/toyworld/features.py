"""Frozen DINOv2 features of toy-world scenes, cached once in shards so that training never runs the tower."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from .model import build_processor
from .scenes import make_scene, render, train_seed, validation


@torch.no_grad()
def cache_features(seeds: list[int], out: Path, batch: int = 16) -> None:
    """Frozen DINOv2 patch features (the projector's input: layer -1, [CLS] dropped) for `seeds`, fp16, to `out`."""
    from .dinov2_convert import convert
    from .model import VISION_FEATURE_LAYER

    tower = convert()
    processor = build_processor()
    feats = []
    for i in range(0, len(seeds), batch):
        images = [render(make_scene(s)) for s in seeds[i : i + batch]]
        pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        hidden = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[VISION_FEATURE_LAYER]
        feats.append(hidden[:, 1:].half())
    tmp = out.with_suffix(".tmp")
    torch.save({"seeds": torch.tensor(seeds), "features": torch.cat(feats)}, tmp)
    tmp.rename(out)


def cache_main(directory: str, train_scenes: int, val_scenes: int, shard: int = 250, log: Callable = print) -> None:
    """Write val.pt then train-00000.pt, ... (shards of `shard` scenes) into `directory`; skips existing shards."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    start = time.time()
    if not (root / "val.pt").exists():
        cache_features(sorted({s.scene.seed for s in validation(val_scenes)}), root / "val.pt")
        log(f"val cached, {time.time() - start:.0f}s")
    for k in range(0, train_scenes, shard):
        path = root / f"train-{k // shard:05d}.pt"
        if not path.exists():
            cache_features([train_seed(i) for i in range(k, min(k + shard, train_scenes))], path)
            log(f"{path.name} cached, {time.time() - start:.0f}s")


def load_shards(root: Path) -> tuple[list[int], torch.Tensor]:
    seeds, feats = [], []
    for path in sorted(root.glob("train-*.pt")):
        data = torch.load(path)
        seeds += data["seeds"].tolist()
        feats.append(data["features"])
    if not feats:
        raise FileNotFoundError(f"no train-*.pt shards in {root}: run `vtokprune train-toy --cache-only` first")
    return seeds, torch.cat(feats)
