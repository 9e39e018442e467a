"""Loading real models by id or path: safetensors only, ids and paths checked before anything is read."""

from __future__ import annotations

import os
import re
from typing import Any

from .errors import UnsupportedModelError, VTokPruneError

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_model_ref(name: str) -> str:
    """A local directory, or a hub id `owner/name`; anything else is refused with the fix."""
    if os.path.isdir(name):
        return os.path.abspath(name)
    if os.path.exists(name):
        raise VTokPruneError(f"{name!r} is a file; pass the model's directory (with config.json) or a hub id")
    if not _HUB_ID.match(name) or ".." in name:
        raise VTokPruneError(f"{name!r} is neither an existing directory nor a hub id like 'llava-hf/llava-1.5-7b-hf'")
    return name


def load_pretrained(
    name: str, dtype: Any = "auto", device_map: Any = None, processor: bool = True, **kwargs: Any
) -> tuple[Any, Any, str]:
    """(model, processor, description) for any model type vtokprune has an adapter for. Weights: safetensors only.

    `processor=False` skips the processor (None is returned in its place), for checkpoints saved without one.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from .adapters import ADAPTERS

    ref = check_model_ref(name)
    config = AutoConfig.from_pretrained(ref)
    if config.model_type not in ADAPTERS:
        raise UnsupportedModelError(
            f"{name!r} is a {config.model_type!r} model; vtokprune supports: {', '.join(sorted(ADAPTERS))}"
        )
    kwargs.setdefault("attn_implementation", "sdpa")
    model = AutoModelForImageTextToText.from_pretrained(
        ref, dtype=dtype, device_map=device_map, use_safetensors=True, **kwargs
    ).eval()
    loaded = AutoProcessor.from_pretrained(ref) if processor else None
    return model, loaded, f"{name} ({config.model_type})"
