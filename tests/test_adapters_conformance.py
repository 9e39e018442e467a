"""Every registered strategy on every adapter family, through the one `apply` interface, on tiny random models.

Invariants: keep-all is bit-identical to the unwrapped model; generate() with a cache equals a hand-written
one-token-at-a-time loop; a batch of two different prompts equals the prompts run alone; budgets are exact; remove()
restores the model bit for bit. Positions: tests/test_adapters_conformance_positions.py; family-specific checks:
tests/test_adapters_family_specific.py; the shared machinery (and the `family` fixture, in conftest.py):
tests/conformance.py. Strategies an adapter cannot serve must say so with CapabilityError at `apply` (those cases are
skipped).
"""

from __future__ import annotations

import pytest
import torch

import vtokprune

# BUILDERS, GRID_ONLY, SPECS, SUPPRESS and make_inputs are unused here: tests/test_fail_loud.py and
# tests/test_kernel_backends.py import them from this module.
from .conformance import (
    BUILDERS,  # noqa: F401
    GRID_ONLY,  # noqa: F401
    SPECS,  # noqa: F401
    STEPS,
    STRATEGIES,
    SUPPRESS,  # noqa: F401
    K,
    apply_or_skip,
    case,
    expected_kept,
    generate,
    logits,
    make_inputs,  # noqa: F401
    single,
    stepwise,
    strategy_for,
)


@pytest.mark.parametrize("name", STRATEGIES)
def test_keep_all_is_bit_identical(family, name):
    fam, model = family
    _, inputs = case(fam, model, name)
    reference = logits(model, inputs)
    apply_or_skip(model, strategy_for(name, ratio=1.0))
    try:
        out = logits(model, inputs)
        sel = vtokprune.last_selection(model)
    finally:
        vtokprune.remove(model)
    assert [k.tolist() for k in sel.kept] == [list(range(n)) for n in sel.available]
    assert torch.equal(out, reference)


@pytest.mark.parametrize("name", STRATEGIES)
def test_exact_budgets_and_remove_restores(family, name):
    fam, model = family
    _, inputs = case(fam, model, name)
    reference = logits(model, inputs)
    strategy = strategy_for(name, keep=K)
    apply_or_skip(model, strategy)
    try:
        pruned = logits(model, inputs)
        sel = vtokprune.last_selection(model)
    finally:
        vtokprune.remove(model)
    assert sel is not None
    want = expected_kept(strategy, model, sel.available, sel.sample_of)
    if strategy.acts == "vision":
        got = [len(k) for k in sel.kept]
        assert pruned.shape[1] < reference.shape[1] or name == "none"
    else:
        got = [0] * len(want)
        for k, s in zip(sel.kept, sel.sample_of):
            got[s] += len(k)
    if name != "none":
        assert got == want
    assert all(bool((k[1:] > k[:-1]).all()) for k in sel.kept)  # ascending, no duplicates
    assert not vtokprune.is_pruned(model)
    assert torch.equal(logits(model, inputs), reference)
    assert all(not hasattr(m, "_vtokprune_config") for m in model.modules())
    inner = vtokprune.get_adapter(model).wrapped_module()
    assert not {"forward", "get_image_features", "get_video_features"} & set(vars(inner))


@pytest.mark.parametrize("name", STRATEGIES)
def test_generate_with_cache_matches_stepwise_reference(family, name):
    fam, model = family
    _, inputs = case(fam, model, name)
    apply_or_skip(model, strategy_for(name, keep=K))
    try:
        assert torch.equal(generate(model, inputs, STEPS), stepwise(model, inputs, STEPS))
    finally:
        vtokprune.remove(model)


@pytest.mark.parametrize("name", STRATEGIES)
def test_batch_matches_singles(family, name):
    fam, model = family
    spec, inputs = case(fam, model, name)
    apply_or_skip(model, strategy_for(name, keep=K))
    try:
        batch = logits(model, inputs)
        kept = [k.tolist() for k in vtokprune.last_selection(model).kept]
        alone, alone_kept = [], []
        for i in range(len(spec)):
            alone.append(logits(model, single(fam, inputs, spec, i))[0, -1])
            alone_kept += [k.tolist() for k in vtokprune.last_selection(model).kept]
    finally:
        vtokprune.remove(model)
    assert kept == alone_kept
    torch.testing.assert_close(batch[:, -1], torch.stack(alone), atol=1e-4, rtol=1e-4)
