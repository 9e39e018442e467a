"""Triton kernels for the score-and-gather hot path. Importing this module imports triton.

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
import triton.language as tl

from .common import ScoreGather, ScoreGatherArgs, select

BLOCK_T = 64  # candidate keys per tile on a GPU
# Under TRITON_INTERPRET each tile costs ~10 ms of Python whatever its size: fewer, bigger tiles.
INTERPRET_BLOCK_T = 256
MAX_BLOCK_R = 32


def _block_t(device: torch.device) -> int:
    return BLOCK_T if device.type == "cuda" else INTERPRET_BLOCK_T


@triton.jit
def _block_logits(
    q,
    k_base,
    sk_t,
    sk_d,
    offs_t,
    n_keys,
    offs_d,
    d_ok,
    m_rows,
    sm_t,
    r_ok,
    scale,
    HAS_MASK: tl.constexpr,
):
    """[BLOCK_R, BLOCK_T] float32 logits of q against keys offs_t; out-of-range rows/keys are -inf."""
    t_ok = offs_t < n_keys
    kt = tl.load(
        k_base + offs_t[:, None] * sk_t + offs_d[None, :] * sk_d, mask=t_ok[:, None] & d_ok[None, :], other=0.0
    )
    logits = tl.dot(q, tl.trans(kt.to(tl.float32)), input_precision="ieee") * scale
    ok = r_ok[:, None] & t_ok[None, :]
    if HAS_MASK:
        logits += tl.load(m_rows[:, None] + offs_t[None, :] * sm_t, mask=ok, other=0.0).to(tl.float32)
    return tl.where(ok, logits, float("-inf"))


@triton.jit
def _online_update(m_i, l_i, logits):
    m_new = tl.maximum(m_i, tl.max(logits, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(logits - m_safe[:, None]), axis=1)
    return m_new, l_i


@triton.jit
def _row_lse_kernel(
    q_ptr,
    k_ptr,
    m_ptr,
    ck_ptr,
    cm_ptr,
    out_ptr,
    H,
    GROUP,
    R,
    T,
    S,
    HEAD_DIM,
    scale,
    sq_b,
    sq_h,
    sq_r,
    sq_d,
    sk_b,
    sk_h,
    sk_t,
    sk_d,
    sm_b,
    sm_h,
    sm_r,
    sm_t,
    sc_b,
    sc_h,
    sc_t,
    sc_d,
    scm_b,
    scm_h,
    scm_r,
    scm_t,
    so_b,
    so_h,
    so_r,
    HAS_MASK: tl.constexpr,
    HAS_CTX: tl.constexpr,
    HAS_CTX_MASK: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // H).to(tl.int64)
    h = (pid % H).to(tl.int64)
    kvh = h // GROUP
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    r_ok = offs_r < R
    d_ok = offs_d < HEAD_DIM
    q = tl.load(
        q_ptr + b * sq_b + h * sq_h + offs_r[:, None] * sq_r + offs_d[None, :] * sq_d,
        mask=r_ok[:, None] & d_ok[None, :],
        other=0.0,
    ).to(tl.float32)
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    if HAS_CTX:
        c_base = ck_ptr + b * sc_b + kvh * sc_h
        cm_rows = cm_ptr + b * scm_b + h * scm_h + offs_r * scm_r
        for s0 in range(0, S, BLOCK_T):
            offs_s = s0 + tl.arange(0, BLOCK_T)
            logits = _block_logits(
                q, c_base, sc_t, sc_d, offs_s, S, offs_d, d_ok, cm_rows, scm_t, r_ok, scale, HAS_CTX_MASK
            )
            m_i, l_i = _online_update(m_i, l_i, logits)
    k_base = k_ptr + b * sk_b + kvh * sk_h
    m_rows = m_ptr + b * sm_b + h * sm_h + offs_r * sm_r
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        logits = _block_logits(q, k_base, sk_t, sk_d, offs_t, T, offs_d, d_ok, m_rows, sm_t, r_ok, scale, HAS_MASK)
        m_i, l_i = _online_update(m_i, l_i, logits)
    lse = tl.where(l_i > 0, m_i + tl.log(tl.maximum(l_i, 1e-30)), float("-inf"))
    tl.store(out_ptr + b * so_b + h * so_h + offs_r * so_r, lse, mask=r_ok)


@triton.jit
def _score_kernel(
    q_ptr,
    k_ptr,
    m_ptr,
    lse_ptr,
    w_ptr,
    out_ptr,
    H,
    GROUP,
    R,
    T,
    HEAD_DIM,
    scale,
    inv_h,
    sq_b,
    sq_h,
    sq_r,
    sq_d,
    sk_b,
    sk_h,
    sk_t,
    sk_d,
    sm_b,
    sm_h,
    sm_r,
    sm_t,
    sl_b,
    sl_h,
    sl_r,
    sw_b,
    sw_r,
    so_b,
    so_t,
    HAS_MASK: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    acc = tl.zeros([BLOCK_T], tl.float32)
    for h in range(0, H):
        kvh = h // GROUP
        k_base = k_ptr + b * sk_b + kvh * sk_h
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_ok = offs_r < R
            q = tl.load(
                q_ptr + b * sq_b + h * sq_h + offs_r[:, None] * sq_r + offs_d[None, :] * sq_d,
                mask=r_ok[:, None] & d_ok[None, :],
                other=0.0,
            ).to(tl.float32)
            m_rows = m_ptr + b * sm_b + h * sm_h + offs_r * sm_r
            logits = _block_logits(q, k_base, sk_t, sk_d, offs_t, T, offs_d, d_ok, m_rows, sm_t, r_ok, scale, HAS_MASK)
            lse = tl.load(lse_ptr + b * sl_b + h * sl_h + offs_r * sl_r, mask=r_ok, other=float("-inf"))
            w = tl.load(w_ptr + b * sw_b + offs_r * sw_r, mask=r_ok, other=0.0)
            live = lse > float("-inf")
            p = tl.exp(logits - tl.where(live, lse, 0.0)[:, None])
            p = tl.where(live[:, None], p, 0.0)
            acc += tl.sum(p * w[:, None], axis=0)
    tl.store(out_ptr + b * so_b + offs_t * so_t, acc * inv_h, mask=offs_t < T)


@triton.jit
def _probs_kernel(
    q_ptr,
    k_ptr,
    m_ptr,
    lse_ptr,
    out_ptr,
    H,
    GROUP,
    R,
    T,
    HEAD_DIM,
    scale,
    sq_b,
    sq_h,
    sq_r,
    sq_d,
    sk_b,
    sk_h,
    sk_t,
    sk_d,
    sm_b,
    sm_h,
    sm_r,
    sm_t,
    sl_b,
    sl_h,
    sl_r,
    so_b,
    so_h,
    so_r,
    so_t,
    HAS_MASK: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Like _score_kernel, but stores every row's probabilities [B, H, R, T] instead of reducing them."""
    pid = tl.program_id(0)
    b = (pid // H).to(tl.int64)
    h = (pid % H).to(tl.int64)
    kvh = h // GROUP
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    t_ok = offs_t < T
    k_base = k_ptr + b * sk_b + kvh * sk_h
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        q = tl.load(
            q_ptr + b * sq_b + h * sq_h + offs_r[:, None] * sq_r + offs_d[None, :] * sq_d,
            mask=r_ok[:, None] & d_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        m_rows = m_ptr + b * sm_b + h * sm_h + offs_r * sm_r
        logits = _block_logits(q, k_base, sk_t, sk_d, offs_t, T, offs_d, d_ok, m_rows, sm_t, r_ok, scale, HAS_MASK)
        lse = tl.load(lse_ptr + b * sl_b + h * sl_h + offs_r * sl_r, mask=r_ok, other=float("-inf"))
        live = lse > float("-inf")
        p = tl.exp(logits - tl.where(live, lse, 0.0)[:, None])
        p = tl.where(live[:, None], p, 0.0)
        out = out_ptr + b * so_b + h * so_h + offs_r[:, None] * so_r + offs_t[None, :] * so_t
        tl.store(out, p, mask=r_ok[:, None] & t_ok[None, :])


@triton.jit
def _gather_kernel(
    x_ptr,
    idx_ptr,
    pos_ptr,
    out_ptr,
    out_pos_ptr,
    KEEP,
    D,
    sx_b,
    sx_t,
    sx_d,
    si_b,
    si_k,
    sp_b,
    sp_t,
    so_b,
    so_k,
    so_d,
    sop_b,
    sop_k,
    HAS_POS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    pid_d = tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    k_ok = offs_k < KEEP
    d_ok = offs_d < D
    idx = tl.load(idx_ptr + b * si_b + offs_k * si_k, mask=k_ok, other=0)
    ok = k_ok[:, None] & d_ok[None, :]
    vals = tl.load(x_ptr + b * sx_b + idx[:, None] * sx_t + offs_d[None, :] * sx_d, mask=ok)
    tl.store(out_ptr + b * so_b + offs_k[:, None] * so_k + offs_d[None, :] * so_d, vals, mask=ok)
    if HAS_POS:
        pos_ok = offs_k < tl.where(pid_d == 0, KEEP, 0)  # only the first D-block's programs copy the positions
        pos = tl.load(pos_ptr + b * sp_b + idx * sp_t, mask=pos_ok)
        tl.store(out_pos_ptr + b * sop_b + offs_k * sop_k, pos, mask=pos_ok)


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
