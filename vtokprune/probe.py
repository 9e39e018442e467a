"""Attention probes: read the few attention rows a strategy needs from a layer's real q and k.

A probed attention module gets a private copy of its config whose `_attn_implementation` names our registered
function. That function calls the probe callback active in the current context (if any) with the module's q, k, v
and mask, then hands over to the implementation the model was using (SDPA, eager, flash...). Nothing else changes, so
outputs stay bit-identical, and the full attention map is never materialised: a strategy that needs the last token's
row computes one row. The rows themselves are computed by :func:`vtokprune.kernels.attention_rows` (re-exported
here), so the kernel backend choice covers them.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

from .kernels import attention_rows, repeat_kv_heads

PROBE_IMPL = "vtokprune_probe"

ProbeCallback = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, Any, dict], None]
_ACTIVE: ContextVar[dict[int, ProbeCallback] | None] = ContextVar("vtokprune_probes", default=None)
_registered = False

__all__ = ["PROBE_IMPL", "attention_rows", "install_probe", "probing", "repeat_kv_heads", "uninstall_probe"]


def _original_attention(module: nn.Module) -> Callable[..., Any]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    impl = module._vtokprune_config._attn_implementation  # type: ignore[union-attr]
    if impl and impl != "eager" and impl in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[impl]
    # "eager" is each modeling file's own function, not a registry entry.
    return sys.modules[type(module).__module__].eager_attention_forward  # type: ignore[no-any-return]


def _probe_attention(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any, **kwargs: Any
) -> Any:
    probes = _ACTIVE.get()
    if probes:
        callback = probes.get(id(module))
        if callback is not None:
            callback(module, query, key, value, attention_mask, kwargs)
    return _original_attention(module)(module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PROBE_IMPL, _probe_attention)  # type: ignore[arg-type]
    # Only modules that are probed see this name, never a mask builder; registered for safety all the same.
    AttentionMaskInterface.register(PROBE_IMPL, AttentionMaskInterface._global_mapping["sdpa"])  # type: ignore[arg-type]
    _registered = True


def install_probe(module: Any) -> None:
    """Route `module`'s attention through the probe function (idempotent)."""
    _register()
    if hasattr(module, "_vtokprune_config"):
        return
    config = module.config  # type: ignore[union-attr]
    private = copy.copy(config)
    private._attn_implementation_internal = PROBE_IMPL
    module._vtokprune_config = config
    module.config = private


def uninstall_probe(module: Any) -> None:
    if hasattr(module, "_vtokprune_config"):
        module.config = module._vtokprune_config
        del module._vtokprune_config


@contextmanager
def probing(callbacks: dict[int, ProbeCallback]) -> Iterator[None]:
    """Activate callbacks (keyed by id(module)) for the current thread / task only."""
    current = _ACTIVE.get() or {}
    token = _ACTIVE.set({**current, **callbacks})
    try:
        yield
    finally:
        _ACTIVE.reset(token)
