"""model_type -> adapter table."""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from .base import Adapter
from .internvl import InternVLAdapter
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .qwen2_vl import Qwen2VLAdapter, Qwen25VLAdapter

ADAPTERS: dict[str, type[Adapter]] = {}
for _cls in (LlavaAdapter, LlavaNextAdapter, Qwen2VLAdapter, Qwen25VLAdapter, InternVLAdapter):
    for _t in _cls.model_types:
        ADAPTERS[_t] = _cls


def model_type_of(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def get_adapter(model: nn.Module) -> Adapter:
    model_type = model_type_of(model)
    if model_type not in ADAPTERS:
        raise UnsupportedModelError(
            f"vtokprune has no adapter for model_type={model_type!r} ({type(model).__name__}); "
            f"supported model types: {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[model_type](model)


__all__ = ["ADAPTERS", "Adapter", "get_adapter", "model_type_of"]
