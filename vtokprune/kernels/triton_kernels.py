"""The Triton kernel bodies of the score-and-gather hot path (``@triton.jit``). Importing this module imports triton.

What each kernel does and how it is launched: triton_score_gather.py, whose wrappers are the only callers.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

# Under TRITON_INTERPRET, tl.dot is a numpy matmul whose rounding depends on a key's column in the tile (BLAS edge
# kernels), so identical keys could score a ulp apart and a tie would not go to the lower index as on the torch
# backend. There the logits are an elementwise product summed over the head dim: the same sum for every key.
_SUM_LOGITS = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


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
    if _SUM_LOGITS:
        logits = tl.sum(q[:, None, :] * kt.to(tl.float32)[None, :, :], axis=2) * scale
    else:
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
