"""The Triton score-and-gather hot path: launch wrappers (the kernel bodies are in triton_kernels.py). Importing
this module imports triton.

``probs_triton`` (the attention rows themselves, for strategies that weigh rows or heads in their own way) stores
them with ``_probs_kernel`` instead of reducing them in step 2.

Three launches per batch, whatever B, H, R and T are:

1. ``_row_lse_kernel``, grid (B*H, cdiv(R, BLOCK_R)): the log-sum-exp of every query row over the context keys and the
   candidate keys (online softmax, one pass over K). Skipped when the caller passes ``lse``.
2. ``_score_kernel``, grid (B, cdiv(T, BLOCK_T)): each program owns a block of candidate tokens, loops over heads and
   query rows, and accumulates ``w[b, r] * exp(logit - lse) / H`` in registers, so the [B, H, R, T] probabilities are
   never stored and the head/row reduction needs no atomics (the result is deterministic).
3. ``_gather_kernel``, grid (B, cdiv(keep, BLOCK_K), cdiv(D, BLOCK_D)): copies the kept rows of x (and positions) into
   the compact buffer.

Between 2 and 3 the top-k runs in PyTorch (a stable sort of the [B, T] scores, :func:`common.select`): a fused top-k
with lower-index tie-breaking for arbitrary k would need a block-wide bitonic sort or a radix select inside the
kernel, which is not worth it for T <= a few thousand (the sort is a few microseconds; the launches dominate).

Logits are computed in float32 (inputs upcast in registers, ``tl.dot`` with IEEE precision), like the reference.
Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors (slowly), which is how CI tests them.
"""

from __future__ import annotations

import torch
import triton

from .common import ScoreGather, ScoreGatherArgs, select
from .triton_kernels import _gather_kernel, _probs_kernel, _row_lse_kernel, _score_kernel

BLOCK_T = 64  # candidate keys per tile on a GPU
# Under TRITON_INTERPRET each tile costs ~10 ms of Python whatever its size: fewer, bigger tiles.
INTERPRET_BLOCK_T = 256
MAX_BLOCK_R = 32


def _block_t(device: torch.device) -> int:
    return BLOCK_T if device.type == "cuda" else INTERPRET_BLOCK_T


def _pow2(n: int, lo: int) -> int:
    return max(lo, triton.next_power_of_2(n))


def _strides4(t: torch.Tensor | None) -> tuple[int, int, int, int]:
    return (0, 0, 0, 0) if t is None else tuple(t.stride())  # type: ignore[return-value]


def row_lse(a: ScoreGatherArgs) -> torch.Tensor:
    """[B, H, R] float32 log-sum-exp of each query row over context + candidate keys (-inf for a fully masked row)."""
    b, h, r, d = a.q.shape
    t = a.k.shape[2]
    s = 0 if a.context_k is None else a.context_k.shape[2]
    out = torch.empty((b, h, r), dtype=torch.float32, device=a.q.device)
    block_r = _pow2(min(r, MAX_BLOCK_R), 16)
    block_t = _block_t(a.q.device)
    dummy = a.q  # never read: HAS_* flags are off
    _row_lse_kernel[(b * h, triton.cdiv(r, block_r))](
        a.q,
        a.k,
        dummy if a.key_mask is None else a.key_mask,
        dummy if a.context_k is None else a.context_k,
        dummy if a.context_mask is None else a.context_mask,
        out,
        h,
        a.group,
        r,
        t,
        s,
        d,
        a.scale,
        *a.q.stride(),
        *a.k.stride(),
        *_strides4(a.key_mask),
        *_strides4(a.context_k),
        *_strides4(a.context_mask),
        *out.stride(),
        HAS_MASK=a.key_mask is not None,
        HAS_CTX=a.context_k is not None,
        HAS_CTX_MASK=a.context_mask is not None,
        BLOCK_R=block_r,
        BLOCK_T=block_t,
        BLOCK_D=_pow2(d, 16),
    )
    return out


def scores_triton(a: ScoreGatherArgs, lse: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    b, h, r, d = a.q.shape
    t = a.k.shape[2]
    if out is None:
        out = torch.empty((b, t), dtype=torch.float32, device=a.q.device)
    block_r = _pow2(min(r, MAX_BLOCK_R), 16)
    block_t = _block_t(a.q.device)
    _score_kernel[(b, triton.cdiv(t, block_t))](
        a.q,
        a.k,
        a.q if a.key_mask is None else a.key_mask,
        lse,
        a.row_weights,
        out,
        h,
        a.group,
        r,
        t,
        d,
        a.scale,
        1.0 / h,
        *a.q.stride(),
        *a.k.stride(),
        *_strides4(a.key_mask),
        *lse.stride(),
        *a.row_weights.stride(),
        *out.stride(),
        HAS_MASK=a.key_mask is not None,
        BLOCK_R=block_r,
        BLOCK_T=block_t,
        BLOCK_D=_pow2(d, 16),
    )
    return out


def probs_triton(a: ScoreGatherArgs, out: torch.Tensor | None = None) -> torch.Tensor:
    """[B, H, R, T] float32 probabilities of every query row over the candidate keys (see reference_probs)."""
    b, h, r, d = a.q.shape
    t = a.k.shape[2]
    lse = a.lse.contiguous() if a.lse is not None else row_lse(a)
    if out is None:
        out = torch.empty((b, h, r, t), dtype=torch.float32, device=a.q.device)
    block_t = _block_t(a.q.device)
    _probs_kernel[(b * h, triton.cdiv(t, block_t))](
        a.q,
        a.k,
        a.q if a.key_mask is None else a.key_mask,
        lse,
        out,
        h,
        a.group,
        r,
        t,
        d,
        a.scale,
        *a.q.stride(),
        *a.k.stride(),
        *_strides4(a.key_mask),
        *lse.stride(),
        *out.stride(),
        HAS_MASK=a.key_mask is not None,
        BLOCK_R=_pow2(min(r, MAX_BLOCK_R), 16),
        BLOCK_T=block_t,
        BLOCK_D=_pow2(d, 16),
    )
    return out


def gather_triton(
    x: torch.Tensor,
    idx: torch.Tensor,
    positions: torch.Tensor | None,
    out_x: torch.Tensor | None = None,
    out_positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    b, keep = idx.shape
    dim = x.shape[2]
    if out_x is None:
        out_x = torch.empty((b, keep, dim), dtype=x.dtype, device=x.device)
    if positions is not None and out_positions is None:
        out_positions = torch.empty((b, keep), dtype=positions.dtype, device=positions.device)
    block_k = 16
    block_d = min(_pow2(dim, 16), 1024)
    pos = positions if positions is not None else idx
    opos = out_positions if out_positions is not None else idx
    _gather_kernel[(b, triton.cdiv(keep, block_k), triton.cdiv(dim, block_d))](
        x,
        idx,
        pos,
        out_x,
        opos,
        keep,
        dim,
        *x.stride(),
        *idx.stride(),
        *pos.stride(),
        *out_x.stride(),
        *opos.stride(),
        HAS_POS=positions is not None,
        BLOCK_K=block_k,
        BLOCK_D=block_d,
    )
    return out_x, out_positions


def score_and_gather_triton(a: ScoreGatherArgs) -> ScoreGather:
    lse = a.lse.contiguous() if a.lse is not None else row_lse(a)
    scores = scores_triton(a, lse, a.out_scores)
    idx = select(scores, a.keep, a.candidates)
    x, positions = gather_triton(a.x, idx, a.positions, a.out_x, a.out_positions)
    return ScoreGather(scores=scores, indices=idx, x=x, positions=positions)
