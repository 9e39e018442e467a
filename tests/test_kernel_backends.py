"""The one selection path under both kernel backends: every registered strategy (and the in-tower variant) on every
adapter family keeps the same tokens and gives the same logits with the Triton kernels (interpreted on CPU under
TRITON_INTERPRET=1, native on CUDA) as with the PyTorch reference.

The plain suite runs every strategy on LLaVA and a few on the other families; with VTOKPRUNE_KERNEL_BACKEND=triton
set (the extra CI line in the README, which also reruns the in-tower suite with Triton as the default backend) every
strategy runs on every family.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import pytest
import torch

import vtokprune
from vtokprune import kernels
from vtokprune.errors import CapabilityError

from .test_adapters_conformance import BUILDERS, GRID_ONLY, SPECS, make_inputs

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

# Strategies whose scores also weigh the kept features (merging): their logits may differ by float rounding.
WEIGHTED = {"sparsevlm", "vflowopt"}  # vflowopt recycles pruned tokens into kept ones, weighted by score
FULL = os.environ.get("VTOKPRUNE_KERNEL_BACKEND", "").strip().lower() == "triton"
SAMPLED = {"cls", "fastv", "sparsevlm"}  # on the families other than LLaVA, unless FULL
# Families whose tiny model serves the in-tower cases (they must not be skipped); the tiny LLaVA-NeXT reads its
# features from vision layer 0, so nothing lies before it, and Qwen's towers have no [CLS].
IN_TOWER_SERVED = {"llava", "internvl"}


@pytest.fixture(scope="module", params=list(BUILDERS))
def family(request):
    return request.param, BUILDERS[request.param]()


def _strategies() -> list[tuple[str, dict[str, Any]]]:
    cases: list[tuple[str, dict[str, Any]]] = [(name, {}) for name in vtokprune.available_strategies()]
    return cases + [("cls", {"in_tower_layer": 0}), ("visionzip", {"in_tower_layer": 0})]


@torch.no_grad()
def _run(model: Any, inputs: dict[str, torch.Tensor], strategy: Any, backend: str) -> tuple[torch.Tensor, Any]:
    with kernels.use_backend(backend):
        vtokprune.apply(model, strategy)
        try:
            out = model(**inputs).logits
            return out, vtokprune.last_selection(model)
        finally:
            vtokprune.remove(model)


@pytest.mark.parametrize("name,extra", _strategies(), ids=lambda v: v if isinstance(v, str) else "-".join(v) or "post")
def test_triton_backend_keeps_the_same_tokens_and_logits(family, name, extra):
    fam, model = family
    if not FULL and fam != "llava" and name not in SAMPLED:
        pytest.skip("sampled matrix: set VTOKPRUNE_KERNEL_BACKEND=triton for every strategy on every family")
    spec = SPECS[fam][1] if name in GRID_ONLY else SPECS[fam][0]
    if spec is None:
        pytest.skip(f"{fam} has no single-grid input for {name!r}")
    strategy = vtokprune.get_strategy(name, keep=4, **extra) if name != "none" else vtokprune.get_strategy(name)
    inputs = make_inputs(fam, model, spec)
    try:
        ref, sel_ref = _run(model, inputs, strategy, "torch")
    except CapabilityError as e:
        if "in_tower_layer" in extra and fam in IN_TOWER_SERVED:
            raise
        pytest.skip(f"not supported: {e}")
    got, sel_got = _run(model, inputs, strategy, "triton")
    if sel_ref is None:
        assert sel_got is None
    else:
        assert len(sel_ref.kept) == len(sel_got.kept)
        for a, b in zip(sel_ref.kept, sel_got.kept):
            assert torch.equal(a.cpu(), b.cpu())
    if name in WEIGHTED:
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    else:
        assert torch.equal(got, ref)
