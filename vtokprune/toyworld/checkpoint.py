"""The shippable checkpoint: converted DINOv2 tower + trained projector and decoder, fp16 safetensors in two shards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .model import build_model, build_processor


def finalize(out: str | Path, checkpoint: str | Path, summary: dict[str, Any] | None = None) -> None:
    """Assemble the shippable checkpoint: the converted DINOv2 tower + the best trained state, fp16 safetensors."""
    from .dinov2_convert import convert

    cfg = (summary or {}).get("config", {})
    model = build_model(cfg.get("text_width", 256), cfg.get("text_layers", 4), cfg.get("heads", 4), vision=convert())
    state = torch.load(checkpoint)["state"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("vision_tower" in m for m in missing), (missing, unexpected)
    save(model, build_processor(), out, summary or {})


def save(model: Any, processor: Any, out: str | Path, summary: dict[str, Any]) -> None:
    """fp16 safetensors + config + processor files: a directory `from_pretrained` loads offline.

    Two shards: the vision tower (the converted DINOv2, identical across retrainings, so git stores it once) and the
    trained projector + language model."""
    from safetensors.torch import load_file, save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.half().save_pretrained(str(out), safe_serialization=True, max_shard_size="10GB")
    model.float()
    processor.save_pretrained(str(out))
    single = out / "model.safetensors"
    state = load_file(str(single))
    names = {"tower": "model-00001-of-00002.safetensors", "rest": "model-00002-of-00002.safetensors"}
    shards: dict[str, dict[str, torch.Tensor]] = {"tower": {}, "rest": {}}
    for key, value in state.items():
        shards["tower" if "vision_tower." in key else "rest"][key] = value.contiguous()
    weight_map = {}
    for part, tensors in shards.items():
        save_file(dict(sorted(tensors.items())), str(out / names[part]), metadata={"format": "pt"})
        weight_map.update({key: names[part] for key in tensors})
    total = sum(v.numel() * v.element_size() for v in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")
    single.unlink()
    if summary:
        (out / "training.json").write_text(json.dumps(summary, indent=1) + "\n")
