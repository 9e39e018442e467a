"""Fused selection hot path: attention scores of a few query rows -> top-k -> gather of the kept tokens.

    res = score_and_gather(q, k, x, positions, keep=64)
    res.indices  # [B, 64] ascending;  res.x  # [B, 64, D];  res.positions  # [B, 64];  res.scores  # [B, T]

What it computes, for every sample b and candidate token t (0 <= t < T)::

    logit[b,h,r,t] = scale * <q[b,h,r], k[b,h // (H/Hkv),t]> + key_mask[b,h,r,t]
    p[b,h,r,t]     = exp(logit[b,h,r,t] - lse[b,h,r])
    score[b,t]     = (1/H) * sum_h sum_r w[b,r] * p[b,h,r,t],   w[b,r] = row_valid[b,r] / #valid rows of b

then keeps the `keep` highest-scoring candidates (ties to the lower index, NaN last, indices ascending) and gathers
``x[b, idx]`` and ``positions[b, idx]`` into compact [B, keep, D] / [B, keep] buffers (``out_x=`` / ``out_positions=``
to write into preallocated ones). No [L, L] attention map is formed: only R rows per head, and the Triton path does
not even store those.

The softmax normaliser ``lse[b,h,r]`` is, depending on what the caller has:

* default: the log-sum-exp over the T candidate keys (plus ``key_mask``);
* ``context_k=[B, Hkv, S, d]`` (+ ``context_mask``): keys that count in the normaliser but are never candidates,
  e.g. the [CLS] key when scoring patches (``context_k=k[:, :, :1], k=k[:, :, 1:]``, both views, nothing copied);
* ``lse=[B, H, R]``: the full row's log-sum-exp, already known (e.g. returned by a flash-attention kernel);
* or pass every key as a candidate and restrict the *selection* with ``candidates=[B, T] bool`` (e.g. FastV: all L
  keys normalise, only the image tokens may be kept; then x and positions cover all L tokens).

Masks (``key_mask``, ``context_mask``) are [B, N] or [B, 1|H, 1|R, N], boolean (True = attend) or additive float.
A row whose keys are all masked contributes 0. ``keep`` must not exceed the number of candidates of any sample (not
checked, to avoid a host sync: extra slots would be filled with non-candidates in index order).

This package is the library's one selection path: the strategies' top-k (:func:`topk_indices`) and gathers
(:func:`gather_tokens`, re-exported by ``vtokprune.selection``) and every attention row a strategy reads
(:func:`attention_rows`, behind ``vtokprune.probe``: [CLS] rows in the vision tower, last-token / text rows in the
decoder) run here, so the backend choice below covers all of them. :func:`attention_probs` is the per-row variant of
the score kernel (rows stored, not reduced) for strategies that weigh rows or heads themselves.

``backend``: "torch" (reference, any device), "triton" (CUDA tensors; CPU tensors only under TRITON_INTERPRET=1), or
"auto" (triton for CUDA tensors when triton is installed, else torch); None (the default of every function) means
the global choice: :func:`set_backend`, else the environment variable ``VTOKPRUNE_KERNEL_BACKEND``, else "auto".
The top-k is the same stable sort on both backends (see :func:`common.select`). triton is an optional dependency
(``pip install vtokprune[triton]``); this package imports without it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .common import ScoreGather, prepare, repeat_kv_heads, select, select_per_group
from .reference import reference_probs, score_and_gather_torch

BACKENDS = ("auto", "torch", "triton")
BACKEND_ENV = "VTOKPRUNE_KERNEL_BACKEND"
_global_backend: str | None = None


def set_backend(backend: str | None) -> None:
    """Choose the backend for every call that does not name one ("auto", "torch", "triton"; None: back to the
    environment variable VTOKPRUNE_KERNEL_BACKEND, else "auto")."""
    global _global_backend
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    _global_backend = backend


def get_backend() -> str:
    """The backend used when a call passes backend=None."""
    if _global_backend is not None:
        return _global_backend
    env = os.environ.get(BACKEND_ENV, "").strip().lower() or "auto"
    if env not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={env!r}: must be one of {BACKENDS}")
    return env


@contextmanager
def use_backend(backend: str | None) -> Iterator[None]:
    """`with use_backend("triton"): ...` sets the global backend for the block (not thread-local)."""
    global _global_backend
    previous = _global_backend
    set_backend(backend)
    try:
        yield
    finally:
        _global_backend = previous


@functools.cache
def triton_available() -> bool:
    """True when triton imports (checked once; imports triton, so only called when a Triton path is wanted)."""
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install that fails at import
        return False
    return True


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """ "torch" or "triton": what a call with this `backend` argument (None = the global choice) runs on `device`."""
    if backend is None:
        backend = get_backend()
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs triton: pip install 'vtokprune[triton]'")
        if device.type != "cuda" and not _interpret():
            raise RuntimeError(
                f"backend='triton' runs on CUDA tensors (got {device.type}); set TRITON_INTERPRET=1 before importing "
                "triton to run the kernels on the CPU (slow, for testing)"
            )
    return backend


def score_and_gather(
    q: torch.Tensor,
    k: torch.Tensor,
    x: torch.Tensor,
    positions: torch.Tensor | None,
    keep: int,
    *,
    key_mask: torch.Tensor | None = None,
    scaling: float | None = None,
    lse: torch.Tensor | None = None,
    context_k: torch.Tensor | None = None,
    context_mask: torch.Tensor | None = None,
    row_valid: torch.Tensor | None = None,
    candidates: torch.Tensor | None = None,
    out_scores: torch.Tensor | None = None,
    out_x: torch.Tensor | None = None,
    out_positions: torch.Tensor | None = None,
    backend: str | None = None,
) -> ScoreGather:
    """Score candidate tokens by the attention of query rows, keep the top `keep`, gather them (see module doc).

    q [B, H, R, d]; k [B, Hkv, T, d] (H a multiple of Hkv); x [B, T, D]; positions [B, T] or None.
    scaling defaults to d**-0.5. Returns a :class:`ScoreGather` (scores, indices, x, positions).
    """
    args = prepare(
        q,
        k,
        x,
        positions,
        keep,
        key_mask=key_mask,
        scaling=scaling,
        lse=lse,
        context_k=context_k,
        context_mask=context_mask,
        row_valid=row_valid,
        candidates=candidates,
        out_scores=out_scores,
        out_x=out_x,
        out_positions=out_positions,
    )
    if resolve_backend(backend, q.device) == "torch":
        return score_and_gather_torch(args)
    from .triton_score_gather import score_and_gather_triton

    return score_and_gather_triton(args)


def attention_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    key_mask: torch.Tensor | None = None,
    scaling: float | None = None,
    lse: torch.Tensor | None = None,
    context_k: torch.Tensor | None = None,
    context_mask: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """[B, H, R, T] float32 softmax probabilities p[b,h,r,t] of the module doc (before the head/row reduction).

    Same inputs and normaliser options as :func:`score_and_gather`; a fully masked row is all zeros. `out`: a
    float32 [B, H, R, T] buffer to write into.
    """
    b, _, r, _ = q.shape
    t = k.shape[2] if k.dim() == 4 else 0
    placeholder = q.new_empty((b, t, 0))  # no tokens to gather: a zero-width x satisfies the shape checks
    args = prepare(
        q,
        k,
        placeholder,
        None,
        1,
        key_mask=key_mask,
        scaling=scaling,
        lse=lse,
        context_k=context_k,
        context_mask=context_mask,
    )
    if out is not None and (out.shape != (b, q.shape[1], r, t) or out.dtype != torch.float32):
        raise ValueError(f"out must be a float32 tensor of shape {(b, q.shape[1], r, t)}")
    if resolve_backend(backend, q.device) == "torch":
        probs = reference_probs(args)
        return probs if out is None else out.copy_(probs)
    from .triton_score_gather import probs_triton

    return probs_triton(args, out)


def attention_rows(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    rows: torch.Tensor,
    scaling: float | None,
    causal: bool,
    backend: str | None = None,
) -> torch.Tensor:
    """Softmax attention probabilities of selected query rows of one attention layer, float32, no [L, L] map.

    query [B, H, Lq, d], key [B, Hkv, Lk, d], rows [B, R] indices into Lq. attention_mask: None, or a 4D mask
    [B, 1|H, Lq, Lk], boolean (True = attend) or additive float (other ranks are ignored; `causal` then applies).
    Returns [B, H, R, Lk]; a row with every key masked is all zeros.
    """
    b, h, _, d = query.shape
    lq, lk = query.shape[2], key.shape[2]
    q = torch.gather(query, 2, rows[:, None, :, None].expand(b, h, rows.shape[1], d))
    mask = None
    if attention_mask is not None and attention_mask.dim() == 4:
        m = attention_mask
        mask = torch.gather(m, 2, rows[:, None, :, None].expand(b, m.shape[1], rows.shape[1], m.shape[-1]))
    elif causal:
        q_pos = rows + (lk - lq)  # absolute position of each query row when a cache precedes it
        mask = (torch.arange(lk, device=query.device)[None, None, :] <= q_pos[:, :, None])[:, None]
    return attention_probs(q, key, key_mask=mask, scaling=scaling, backend=backend)


def topk_indices(scores: torch.Tensor, k: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the `k` highest scores along the last dim, in ascending (original) order.

    Ties go to the lower index (a stable sort), so the choice is deterministic and independent of the batch and of
    the backend; entries where `valid` is False are never chosen; NaN scores rank last.
    """
    return select(scores, k, valid)


def topk_per_group(scores: torch.Tensor, groups: torch.Tensor, budgets: torch.Tensor) -> torch.Tensor:
    """[B, T] bool mask of each group's top-`budgets[b, g]` tokens (groups[b, t] = g, or -1: not a candidate); the
    in-LLM stages rank each image's tokens with it. Same ranking and tie rule as :func:`topk_indices`."""
    return select_per_group(scores, groups, budgets)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """x [N, T, D], idx [N, k] -> [N, k, D] (the Triton gather kernel, or torch.gather)."""
    if idx.numel() and x.shape[-1] and x.dim() == 3 and resolve_backend(backend, x.device) == "triton":
        from .triton_score_gather import gather_triton

        return gather_triton(x, idx.to(torch.int64), None)[0]
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


__all__ = [
    "BACKENDS",
    "BACKEND_ENV",
    "ScoreGather",
    "attention_probs",
    "attention_rows",
    "gather_tokens",
    "get_backend",
    "repeat_kv_heads",
    "resolve_backend",
    "score_and_gather",
    "select",
    "set_backend",
    "topk_indices",
    "topk_per_group",
    "triton_available",
    "use_backend",
]
