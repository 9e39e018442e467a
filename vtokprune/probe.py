"""Attention probes: read the few attention rows a strategy needs from a layer's real q and k.

A probed attention module gets a private copy of its config whose `_attn_implementation` names our registered
function. That function calls the probe callback active in the current context (if any) with the module's q, k, v
and mask, then hands over to the implementation the model was using (SDPA, eager, flash...). Nothing else changes, so
outputs stay bit-identical, and the full attention map is never materialised: a strategy that needs the last token's
row computes one row.
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

PROBE_IMPL = "vtokprune_probe"

ProbeCallback = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, Any, dict], None]
_ACTIVE: ContextVar[dict[int, ProbeCallback] | None] = ContextVar("vtokprune_probes", default=None)
_registered = False


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


def repeat_kv_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, Hkv, L, d] -> [B, num_heads, L, d] for grouped-query attention."""
    groups = num_heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def attention_rows(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    rows: torch.Tensor,
    scaling: float | None,
    causal: bool,
) -> torch.Tensor:
    """Softmax attention probabilities of selected query rows, in float32, without the full map.

    query [B, H, Lq, d], key [B, Hkv, Lk, d], rows [B, R] indices into Lq. attention_mask: None, or a 4D mask
    [B, 1|H, Lq, Lk], boolean (True = attend) or additive float. Returns [B, H, R, Lk].
    """
    b, h, lq, d = query.shape
    lk = key.shape[2]
    idx = rows[:, None, :, None].expand(b, h, rows.shape[1], d)
    q = torch.gather(query, 2, idx).float()
    k = repeat_kv_heads(key, h).float()
    scale = scaling if scaling is not None else d**-0.5
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale
    if attention_mask is not None and attention_mask.dim() == 4:
        m = attention_mask
        m_idx = rows[:, None, :, None].expand(b, m.shape[1], rows.shape[1], m.shape[-1])
        m_rows = torch.gather(m, 2, m_idx)
        if m_rows.dtype == torch.bool:
            logits = logits.masked_fill(~m_rows, -torch.inf)
        else:
            logits = logits + m_rows.float()
    elif causal:
        q_pos = rows + (lk - lq)  # absolute position of each query row when a cache precedes it
        allowed = torch.arange(lk, device=query.device)[None, None, :] <= q_pos[:, :, None]
        logits = logits.masked_fill(~allowed[:, None], -torch.inf)
    return torch.softmax(logits, dim=-1)
