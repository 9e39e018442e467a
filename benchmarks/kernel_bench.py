"""score_and_gather: Triton kernels vs the PyTorch reference, time and achieved bandwidth.

    python benchmarks/kernel_bench.py                 # on a GPU: 7B-scale geometries, batch 1 and 8
    python benchmarks/kernel_bench.py --smoke         # CPU, tiny shapes (Triton under TRITON_INTERPRET=1), < 1 min

Bytes counted are the minimum the operation must move: q, k (+ context keys), masks, the kept rows of x and
positions read; scores, the compact x and positions written. GB/s = bytes / median time; "% HBM" compares with the
device's peak bandwidth (H100 SXM 3.35 TB/s, H200 4.8 TB/s).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import torch

if "--smoke" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_utils import environment, hbm_peak, table, time_ms, write_json  # noqa: E402

from vtokprune.kernels import score_and_gather, triton_available  # noqa: E402

# name -> (H, Hkv, d, D, context keys, text keys around the image): the hot paths of the strategies we ship
GEOMETRIES = {
    # FasterVLM / CLS on CLIP ViT-L/14-336: CLS row over CLS + 576 patches, gather projected 4096-d features
    "cls@clip-L336": (16, 16, 64, 4096, 1, 0),
    # FastV at Llama-2-7B layer 2: last-token row over the whole sequence, only image tokens are candidates
    "fastv@llama2-7b": (32, 32, 128, 4096, 0, 48),
    # FastV on Qwen2.5-VL-7B geometry (GQA 28 / 4 heads)
    "fastv@qwen2.5-7b": (28, 4, 128, 3584, 0, 48),
}
SMOKE_GEOMETRIES = {
    "cls@tiny": (4, 4, 16, 64, 1, 0),
    "fastv@tiny-gqa": (4, 2, 16, 64, 0, 8),
}


def make_case(geom, batch: int, tokens: int, device: torch.device, dtype: torch.dtype):
    h, hkv, d, dim, ctx, text = geom
    length = tokens + text
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(batch, h, 1, d, generator=g).to(device, dtype)
    k = torch.randn(batch, hkv, length, d, generator=g).to(device, dtype)
    x = torch.randn(batch, length, dim, generator=g).to(device, dtype)
    positions = torch.arange(length, device=device).expand(batch, length).contiguous()
    kwargs = {}
    if ctx:
        kwargs["context_k"] = torch.randn(batch, hkv, ctx, d, generator=g).to(device, dtype)
    if text:
        cand = torch.zeros(batch, length, dtype=torch.bool, device=device)
        cand[:, text // 2 : text // 2 + tokens] = True
        kwargs["candidates"] = cand
    return q, k, x, positions, kwargs


def bytes_moved(q, k, x, positions, keep: int, kwargs) -> int:
    b, length = x.shape[:2]
    n = q.numel() * q.element_size() + k.numel() * k.element_size()
    if "context_k" in kwargs:
        n += kwargs["context_k"].numel() * kwargs["context_k"].element_size()
    if "candidates" in kwargs:
        n += kwargs["candidates"].numel()
    n += 2 * b * keep * x.shape[2] * x.element_size()  # read kept rows, write them
    n += 2 * b * keep * positions.element_size() + b * keep * 8  # positions in/out, indices
    n += b * length * 4  # scores
    return n


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (CI check that this script runs)")
    p.add_argument("--batch", type=int, nargs="+", default=None)
    p.add_argument("--keep", type=int, nargs="+", default=None)
    p.add_argument("--tokens", type=int, default=None, help="visual tokens per image (default 576)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--json", default=None, help="write results here")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    smoke = args.smoke or device.type != "cuda"
    geoms = SMOKE_GEOMETRIES if smoke else GEOMETRIES
    batches = args.batch or ([2] if smoke else [1, 8])
    keeps = args.keep or ([8] if smoke else [192, 128, 64])
    tokens = args.tokens or (40 if smoke else 576)
    warmup = args.warmup if args.warmup is not None else (1 if smoke else 10)
    iters = args.iters if args.iters is not None else (2 if smoke else 50)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    backends = ["torch"]
    if triton_available() and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
        backends.append("triton")
    peak = hbm_peak(device)

    rows = []
    for name, geom in geoms.items():
        for batch in batches:
            q, k, x, positions, kwargs = make_case(geom, batch, tokens, device, dtype)
            for keep in keeps:
                nbytes = bytes_moved(q, k, x, positions, keep, kwargs)
                ref_ms = None
                for backend in backends:
                    call = functools.partial(score_and_gather, q, k, x, positions, keep, backend=backend, **kwargs)
                    t = time_ms(call, device, warmup, iters)
                    ref_ms = t["median"] if backend == "torch" else ref_ms
                    gbps = nbytes / (t["median"] * 1e-3) / 1e9
                    rows.append(
                        {
                            "geometry": name,
                            "batch": batch,
                            "tokens": tokens,
                            "keep": keep,
                            "backend": backend,
                            "ms": t["median"],
                            "speedup": (ref_ms / t["median"]) if ref_ms else None,
                            "MB": nbytes / 1e6,
                            "GB/s": gbps,
                            "%HBM": 100 * gbps * 1e9 / peak if peak else None,
                        }
                    )
            if "triton" in backends:  # the two backends must agree on what they keep
                a = score_and_gather(q, k, x, positions, keeps[-1], backend="torch", **kwargs)
                b = score_and_gather(q, k, x, positions, keeps[-1], backend="triton", **kwargs)
                agree = torch.equal(a.indices, b.indices) and torch.equal(a.x, b.x)
                rows[-1]["agrees"] = agree
    cols = ["geometry", "batch", "tokens", "keep", "backend", "ms", "speedup", "MB", "GB/s", "%HBM", "agrees"]
    print(f"score_and_gather on {environment(device)['device']} ({'smoke' if smoke else 'full'}, {dtype})")
    print(table(rows, cols))
    if device.type != "cuda":
        print("note: CPU timings (Triton interpreted) only show the script runs; measure on a GPU")
    write_json(args.json, {"env": environment(device), "smoke": smoke, "results": rows})
    return rows


if __name__ == "__main__":
    main()
