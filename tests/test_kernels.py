"""score_and_gather: the Triton kernels against the PyTorch reference, and the reference against first principles.

Without CUDA the Triton path runs under TRITON_INTERPRET=1 on CPU tensors (set here, before anything imports our
kernels, since triton reads it when a kernel is decorated). With CUDA the same cases run natively (marked `gpu`) and
the interpreted ones are skipped. Every output buffer is pre-filled with NaN / a sentinel, so an element a kernel
forgets to write fails the comparison.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from vtokprune.kernels import attention_probs, resolve_backend, score_and_gather  # noqa: E402
from vtokprune.probe import attention_rows  # noqa: E402
from vtokprune.selection import gather_tokens, topk_indices  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
SENTINEL = -(10**9)

# (B, H, Hkv, R, T, d, D, keep): odd sizes, GQA and MHA, one and several rows, keep = 1 / 7 / T
SHAPES = [
    (3, 5, 1, 1, 37, 40, 33, 1),
    (3, 5, 5, 3, 37, 64, 33, 7),
    (3, 5, 1, 3, 37, 40, 33, 37),
    (3, 5, 5, 1, 577, 64, 33, 7),
    (3, 5, 1, 3, 577, 40, 33, 577),
    (3, 5, 5, 3, 577, 40, 33, 1),
]


def _inputs(b, h, hkv, r, t, d, dim, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, h, r, d, generator=g) * 2).to(device, dtype)
    k = torch.randn(b, hkv, t, d, generator=g).to(device, dtype)
    x = torch.randn(b, t, dim, generator=g).to(device, dtype)
    positions = (torch.arange(t) * 3 + 5).expand(b, t).contiguous().to(device)
    return q, k, x, positions


def _run(backend, q, k, x, positions, keep, **kw):
    """Call with NaN / sentinel pre-filled output buffers, so unwritten elements show."""
    b, t = x.shape[:2]
    out_scores = torch.full((b, t), float("nan"), dtype=torch.float32, device=x.device)
    out_x = torch.full((b, keep, x.shape[2]), float("nan"), dtype=x.dtype, device=x.device)
    out_pos = None
    if positions is not None:
        out_pos = torch.full((b, keep), SENTINEL, dtype=positions.dtype, device=x.device)
    res = score_and_gather(
        q, k, x, positions, keep, out_scores=out_scores, out_x=out_x, out_positions=out_pos, backend=backend, **kw
    )
    assert res.x.data_ptr() == out_x.data_ptr() and res.scores.data_ptr() == out_scores.data_ptr()
    return res


def _compare(ref, got, atol=1e-6):
    assert not torch.isnan(got.scores).any() and not torch.isnan(got.x).any()
    torch.testing.assert_close(got.scores, ref.scores, atol=atol, rtol=1e-4)
    assert torch.equal(got.indices.cpu(), ref.indices.cpu())
    assert torch.equal(got.x, ref.x)
    if ref.positions is not None:
        assert not (got.positions == SENTINEL).any()
        assert torch.equal(got.positions, ref.positions)
    idx = got.indices
    assert bool((idx[:, 1:] > idx[:, :-1]).all()), "indices must be strictly ascending"


def _feature_cases(device):
    """(name, shape, kwargs builder) exercising every optional input."""
    b, h, hkv, r, t, d = 3, 5, 1, 3, 37, 40

    def key_mask_bool():
        m = torch.rand(b, t, generator=torch.Generator().manual_seed(1)) > 0.3
        return {"key_mask": m.to(device)}

    def key_mask_float4d():
        m = torch.zeros(b, 1, r, t)
        m[:, :, :, ::4] = -torch.inf
        m[:, :, 1, 1::5] = torch.finfo(torch.float32).min
        m[2, :, 2, :] = -torch.inf  # a fully masked row contributes nothing
        m[0, :, 0, 3] = 1.5  # additive bias, not only masking
        return {"key_mask": m.to(device)}

    def context():
        g = torch.Generator().manual_seed(2)
        ck = torch.randn(b, hkv, 5, d, generator=g).to(device)
        cm = torch.rand(b, h, r, 5, generator=g) > 0.5
        return {"context_k": ck, "context_mask": cm.to(device)}

    def given_lse():
        return {"lse": (torch.randn(b, h, r, generator=torch.Generator().manual_seed(3)) + 4).to(device)}

    def rows_and_candidates():
        rv = torch.tensor([[True, False, True], [False, False, False], [True, True, True]], device=device)
        cand = torch.rand(b, t, generator=torch.Generator().manual_seed(4)) > 0.4
        cand[:, :8] = True  # at least `keep` candidates per sample
        return {"row_valid": rv, "candidates": cand.to(device), "scaling": 0.3}

    return [
        ("key_mask_bool", key_mask_bool),
        ("key_mask_float4d", key_mask_float4d),
        ("context", context),
        ("lse", given_lse),
        ("rows_candidates", rows_and_candidates),
    ]


def _device_for(kind):
    if not HAS_TRITON:
        pytest.skip("triton is not installed (pip install 'vtokprune[triton]')")
    if kind == "interpret":
        if not INTERPRETED:
            pytest.skip("CUDA is present, so triton was set up to compile natively; see the gpu-marked tests")
        return "cpu"
    return "cuda"


KINDS = ["interpret", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}kv{}R{}T{}d{}D{}k{}".format(*s))
def test_triton_matches_reference_shapes(kind, shape):
    device = _device_for(kind)
    b, h, hkv, r, t, d, dim, keep = shape
    q, k, x, pos = _inputs(b, h, hkv, r, t, d, dim, device)
    ref = _run("torch", q, k, x, pos, keep)
    got = _run("triton", q, k, x, pos, keep)
    _compare(ref, got)
    torch.testing.assert_close(ref.scores.sum(1), torch.ones(b, device=device))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", range(5), ids=[c[0] for c in _feature_cases("cpu")])
def test_triton_matches_reference_options(kind, case):
    device = _device_for(kind)
    name, build = _feature_cases(device)[case]
    q, k, x, pos = _inputs(3, 5, 1, 3, 37, 40, 33, device, seed=case)
    kw = build()
    ref = _run("torch", q, k, x, pos, 7, **kw)
    got = _run("triton", q, k, x, pos, 7, **kw)
    _compare(ref, got)


@pytest.mark.parametrize("kind", KINDS)
def test_triton_strided_views_no_positions_and_ties(kind):
    device = _device_for(kind)
    # [CLS] layout: context = key 0, candidates = keys 1..T as views of one tensor; q in a transposed layout.
    q_full = torch.randn(3, 2, 5, 64, device=device).transpose(1, 2)  # [3, 5, 2, 64], non-contiguous
    kv = torch.randn(3, 38, 5, 64, device=device).transpose(1, 2)  # [3, 5, 38, 64]
    x = torch.randn(3, 40, 33, device=device)[:, 1:38]  # [3, 37, 33] view
    kw = {"context_k": kv[:, :, :1]}
    ref = _run("torch", q_full, kv[:, :, 1:], x, None, 9, **kw)
    got = _run("triton", q_full, kv[:, :, 1:], x, None, 9, **kw)
    assert got.positions is None
    _compare(ref, got)
    # identical keys: every score ties, so the lowest indices are kept, in both backends
    k_same = torch.randn(2, 1, 1, 40, device=device).expand(2, 1, 37, 40)
    q, _, x2, pos = _inputs(2, 5, 1, 3, 37, 40, 33, device)
    for backend in ("torch", "triton"):
        res = _run(backend, q, k_same, x2, pos, 7)
        assert torch.equal(res.indices.cpu(), torch.arange(7).expand(2, 7))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_cuda_half_precision_7b_geometry(dtype):
    device = _device_for("cuda")
    # LLaVA-1.5-7B: FastV-like last-token row over 576 image tokens, 32 heads of 128, hidden 4096, batch 8
    q, k, x, pos = _inputs(8, 32, 32, 1, 576, 128, 4096, device, dtype=dtype)
    ref = _run("torch", q, k, x, pos, 64)
    got = _run("triton", q, k, x, pos, 64)
    _compare(ref, got, atol=1e-5)


# ------------------------------------------------------------------ the reference itself (fast, always run)


def test_reference_matches_attention_rows_and_topk():
    """Independent route: the library's attention_rows (full rows over CLS + patches), drop CLS, mean, top-k."""
    b, h, t, d, dim = 2, 4, 26, 16, 12
    q_all = torch.randn(b, h, t + 1, d)
    k_all = torch.randn(b, 2, t + 1, d)
    x = torch.randn(b, t, dim)
    rows = torch.zeros(b, 1, dtype=torch.long)
    probs = attention_rows(q_all, k_all, None, rows, None, causal=False)[:, :, 0, 1:]  # [b, h, t]
    expect_scores = probs.mean(1)
    expect_idx = topk_indices(expect_scores, 5)
    res = score_and_gather(q_all[:, :, :1], k_all[:, :, 1:], x, None, 5, context_k=k_all[:, :, :1], backend="torch")
    torch.testing.assert_close(res.scores, expect_scores)
    assert torch.equal(res.indices, expect_idx)
    assert torch.equal(res.x, gather_tokens(x, expect_idx))


def test_reference_fastv_style_candidates_and_lse():
    """Last-token row over all L keys; only image tokens may be kept; lse= gives the same as normalising in place."""
    b, h, L, d = 2, 4, 30, 8
    q = torch.randn(b, h, 1, d)
    k = torch.randn(b, h, L, d)
    x = torch.randn(b, L, 6)
    image = torch.zeros(b, L, dtype=torch.bool)
    image[:, 5:21] = True
    res = score_and_gather(q, k, x, None, 4, candidates=image, backend="torch")
    assert bool(image.gather(1, res.indices).all())
    lse = torch.logsumexp((q @ k.transpose(-1, -2)) * d**-0.5, dim=-1)
    res_lse = score_and_gather(q, k[:, :, 5:21], x[:, 5:21], None, 4, lse=lse, backend="torch")
    torch.testing.assert_close(res_lse.scores, res.scores[:, 5:21])
    assert torch.equal(res_lse.indices + 5, res.indices)


def test_reference_nan_scores_rank_last_and_errors():
    q, k, x, pos = _inputs(1, 2, 1, 1, 6, 4, 3)
    with pytest.raises(ValueError, match="keep"):
        score_and_gather(q, k, x, pos, 7, backend="torch")
    with pytest.raises(ValueError, match="multiple"):
        score_and_gather(torch.randn(1, 3, 1, 4), torch.randn(1, 2, 6, 4), x, pos, 2, backend="torch")
    with pytest.raises(ValueError, match="either lse"):
        score_and_gather(q, k, x, pos, 2, lse=torch.zeros(1, 2, 1), context_k=k, backend="torch")
    with pytest.raises(ValueError, match="key_mask"):
        score_and_gather(q, k, x, pos, 2, key_mask=torch.ones(1, 5, dtype=torch.bool), backend="torch")
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("cuda", torch.device("cpu"))
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    nan_k = k.clone()
    nan_k[0, 0, 2] = float("nan")
    res = score_and_gather(q, nan_k, x, pos, 6, backend="torch")
    assert res.indices.shape == (1, 6)


def test_package_imports_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, vtokprune, vtokprune.kernels as kn\n"
        "assert not kn.triton_available() or True\n"
        "r = kn.score_and_gather(torch.randn(1,2,1,4), torch.randn(1,2,5,4), torch.randn(1,5,3), None, 2)\n"
        "assert r.indices.shape == (1, 2)\n"
        "try:\n"
        "    kn.score_and_gather(torch.randn(1,2,1,4), torch.randn(1,2,5,4), torch.randn(1,5,3), None, 2,"
        " backend='triton')\n"
        "except (RuntimeError, ImportError) as e:\n"
        "    print('refused:', e)\n"
    )
    env = {
        k: v for k, v in os.environ.items() if k != "VTOKPRUNE_KERNEL_BACKEND"
    }  # the default backend, whatever the caller forced
    env["TRITON_INTERPRET"] = "0"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "refused" in out.stdout


# ------------------------------------------------------------------ attention rows, gather, backend choice


def _probs_cases(device):
    """(name, q, k, kwargs) for attention_probs: odd shapes, GQA, masks, a fully masked row, context, lse."""
    g = torch.Generator().manual_seed(7)
    b, h, hkv, r, t, d = 3, 6, 2, 5, 41, 24
    q = torch.randn(b, h, r, d, generator=g).to(device) * 2
    k = torch.randn(b, hkv, t, d, generator=g).to(device)
    mask = torch.rand(b, 1, r, t, generator=g) > 0.3
    mask[1, 0, 2] = False  # a fully masked row
    lse = (torch.randn(b, h, r, generator=g) + 5).to(device)
    ctx = torch.randn(b, hkv, 3, d, generator=g).to(device)
    return [
        ("plain", q, k, {}),
        ("mask", q, k, {"key_mask": mask.to(device)}),
        ("context", q, k, {"context_k": ctx, "scaling": 0.2}),
        ("lse", q, k, {"lse": lse}),
        ("T577", q[:, :, :1], torch.randn(b, hkv, 577, d, generator=g).to(device), {}),
    ]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", range(5), ids=[c[0] for c in _probs_cases("cpu")])
def test_triton_attention_probs_matches_reference(kind, case):
    device = _device_for(kind)
    _, q, k, kw = _probs_cases(device)[case]
    shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    ref = attention_probs(q, k, backend="torch", **kw)
    out = torch.full(shape, float("nan"), device=device)
    got = attention_probs(q, k, out=out, backend="triton", **kw)
    assert got.data_ptr() == out.data_ptr() and not torch.isnan(got).any()
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-4)
    if "key_mask" in kw:
        assert bool((ref[1, :, 2] == 0).all())  # the fully masked row contributes nothing, in both backends
    elif "context_k" not in kw and "lse" not in kw:
        torch.testing.assert_close(ref.sum(-1), torch.ones(shape[:3], device=device))


@pytest.mark.parametrize("kind", KINDS)
def test_triton_attention_rows_and_gather_match_torch(kind):
    device = _device_for(kind)
    g = torch.Generator().manual_seed(8)
    b, h, hkv, length, d = 2, 4, 2, 29, 16
    query = torch.randn(b, h, length, d, generator=g).to(device)
    key = torch.randn(b, hkv, length, d, generator=g).to(device)
    rows = torch.tensor([[28, 3, 0], [17, 17, 5]], device=device)
    pad = torch.ones(b, 1, length, length, dtype=torch.bool).tril()
    pad[1, :, :, :4] = False  # left padding of sample 1
    for mask, causal in ((None, True), (None, False), (pad.to(device), True)):
        ref = attention_rows(query, key, mask, rows, None, causal, backend="torch")
        got = attention_rows(query, key, mask, rows, None, causal, backend="triton")
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-4)
    x = torch.randn(3, 37, 33, generator=g).to(device)
    idx = torch.tensor([[0, 5, 36], [1, 2, 3], [36, 35, 0]], device=device)
    from vtokprune.kernels.triton_score_gather import gather_triton

    out = torch.full((3, 3, 33), float("nan"), device=device)
    got_x, _ = gather_triton(x, idx, None, out_x=out)
    assert got_x.data_ptr() == out.data_ptr()
    assert torch.equal(got_x, gather_tokens(x, idx, backend="torch"))
    assert torch.equal(gather_tokens(x, idx, backend="triton"), gather_tokens(x, idx, backend="torch"))


def test_backend_choice_global_env_and_per_call(monkeypatch):
    import vtokprune.kernels as kn

    monkeypatch.delenv(kn.BACKEND_ENV, raising=False)
    assert kn.get_backend() == "auto"
    monkeypatch.setenv(kn.BACKEND_ENV, "torch")
    assert kn.get_backend() == "torch"
    monkeypatch.setenv(kn.BACKEND_ENV, "cuda")
    with pytest.raises(ValueError, match=kn.BACKEND_ENV):
        kn.get_backend()
    monkeypatch.setenv(kn.BACKEND_ENV, "torch")
    with kn.use_backend("triton"):
        assert kn.get_backend() == "triton"
        with kn.use_backend("torch"):
            assert kn.resolve_backend(None, torch.device("cpu")) == "torch"
    assert kn.get_backend() == "torch"
    with pytest.raises(ValueError, match="backend"):
        kn.set_backend("cuda")
    # a per-call backend wins over the global one
    assert kn.resolve_backend("torch", torch.device("cpu")) == "torch"
