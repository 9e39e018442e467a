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

``backend``: "torch" (reference, any device), "triton" (CUDA tensors; CPU tensors only under TRITON_INTERPRET=1), or
"auto" (triton for CUDA tensors when triton is installed, else torch). triton is an optional dependency
(``pip install vtokprune[triton]``); this package imports without it.
"""

from __future__ import annotations

import functools
import os

import torch

from .common import ScoreGather, prepare, select
from .reference import score_and_gather_torch

BACKENDS = ("auto", "torch", "triton")


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


def resolve_backend(backend: str, device: torch.device) -> str:
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
    backend: str = "auto",
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


__all__ = ["BACKENDS", "ScoreGather", "resolve_backend", "score_and_gather", "select", "triton_available"]
