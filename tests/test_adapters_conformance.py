"""Every registered strategy on every adapter family, through the one `apply` interface, on tiny random models.

Invariants: keep-all is bit-identical to the unwrapped model; kept tokens keep their original positions (1-D or
M-RoPE); generate() with a cache equals a hand-written one-token-at-a-time loop; a batch of two different prompts
equals the prompts run alone; budgets are exact; remove() restores the model bit for bit.
Strategies an adapter cannot serve must say so with CapabilityError at `apply` (those cases are skipped).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import vtokprune
from vtokprune.compat import cache_from_output, cache_kwargs
from vtokprune.errors import CapabilityError
from vtokprune.testing import (
    IMAGE_TOKEN_ID,
    VIDEO_TOKEN_ID,
    internvl_inputs,
    llava_inputs,
    llava_next_inputs,
    qwen_inputs,
    tiny_internvl,
    tiny_llava,
    tiny_llava_next,
    tiny_qwen2_vl,
)

K = 4
STEPS = 4
SUPPRESS = [IMAGE_TOKEN_ID, VIDEO_TOKEN_ID]
PROMPTS = [[8, 9, 10, 11], [12, 13]]

# Per family: the images of each of the two samples (a family-specific spec), and a variant where every image has a
# single patch grid (for strategies such as 'pool' that need one; None when the family has no such input).
SPECS: dict[str, tuple[list[Any], list[Any] | None]] = {
    "llava": ([1, 2], [1, 2]),
    "llava_next": ([[(28, 56)], [(40, 30), (28, 28)]], None),
    "qwen2_vl": ([[(1, 8, 8)], [(1, 8, 4), (2, 4, 8)]], [[(1, 8, 8)], [(1, 8, 4), (1, 4, 8)]]),
    "qwen2_5_vl": ([[(2, 8, 8)], [(1, 8, 4), (1, 4, 8)]], [[(1, 8, 8)], [(1, 8, 4), (1, 4, 8)]]),
    "internvl": ([[3], [1, 2]], [[1], [1, 1]]),
}
GRID_ONLY = {"pool"}
BUILDERS = {
    "llava": lambda: tiny_llava(seed=0),
    "llava_next": lambda: tiny_llava_next(seed=0),
    "qwen2_vl": lambda: tiny_qwen2_vl(seed=0, version="2"),
    "qwen2_5_vl": lambda: tiny_qwen2_vl(seed=0, version="2.5"),
    "internvl": lambda: tiny_internvl(seed=0),
}
FAMILIES = list(BUILDERS)
STRATEGIES = list(vtokprune.available_strategies())


def make_inputs(family: str, model: Any, spec: list[Any]) -> dict[str, torch.Tensor]:
    prompts = PROMPTS[: len(spec)]
    if family == "llava":
        return llava_inputs(model, prompts, images=spec)
    if family == "llava_next":
        return llava_next_inputs(model, prompts, spec)
    if family in ("qwen2_vl", "qwen2_5_vl"):
        return qwen_inputs(model, prompts, spec)
    return internvl_inputs(model, prompts, spec)


def single(family: str, inputs: dict[str, torch.Tensor], spec: list[Any], i: int) -> dict[str, torch.Tensor]:
    """Sample i of a batch, padding stripped, with only its own pixels."""
    keep = inputs["attention_mask"][i].bool()
    out = {k: inputs[k][i][keep][None] for k in ("input_ids", "attention_mask", "mm_token_type_ids") if k in inputs}
    if family == "llava":
        start = sum(spec[:i])
        out["pixel_values"] = inputs["pixel_values"][start : start + spec[i]]
    elif family == "llava_next":
        start = sum(len(s) for s in spec[:i])
        for k in ("pixel_values", "image_sizes"):
            out[k] = inputs[k][start : start + len(spec[i])]
    elif family == "internvl":
        start = sum(sum(s) for s in spec[:i])
        out["pixel_values"] = inputs["pixel_values"][start : start + sum(spec[i])]
    else:
        for video, pixels, grids in (
            (False, "pixel_values", "image_grid_thw"),
            (True, "pixel_values_videos", "video_grid_thw"),
        ):
            before = [g for s in spec[:i] for g in s if (g[0] > 1) == video]
            mine = [g for g in spec[i] if (g[0] > 1) == video]
            if not mine:
                continue
            start = sum(t * h * w for t, h, w in before)
            out[pixels] = inputs[pixels][start : start + sum(t * h * w for t, h, w in mine)]
            out[grids] = torch.tensor(mine, dtype=torch.long)
    return out


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param, BUILDERS[request.param]()


def strategy_for(name: str, **budget: Any) -> vtokprune.Strategy:
    return vtokprune.get_strategy(name, **budget)


def case(family: str, model: Any, name: str) -> tuple[list[Any], dict[str, torch.Tensor]]:
    spec = SPECS[family][1] if name in GRID_ONLY else SPECS[family][0]
    if spec is None:
        pytest.skip(f"{family} has no single-grid input for {name!r}")
    return spec, make_inputs(family, model, spec)


def apply_or_skip(model: Any, strategy: vtokprune.Strategy) -> None:
    try:
        vtokprune.apply(model, strategy)
    except CapabilityError as e:
        pytest.skip(f"not supported: {e}")


@torch.no_grad()
def logits(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**inputs).logits


def _pick(out_logits: torch.Tensor) -> torch.Tensor:
    x = out_logits[:, -1].clone()
    x[:, SUPPRESS] = -torch.inf
    return x.argmax(-1, keepdim=True)


@torch.no_grad()
def stepwise(model: Any, inputs: dict[str, torch.Tensor], steps: int) -> torch.Tensor:
    """Greedy decoding by hand: one prefill, then one token at a time through the KV cache (no position_ids)."""
    out = model(**inputs, use_cache=True)
    cache, mask = cache_from_output(out), inputs["attention_mask"]
    tokens, nxt = [], _pick(out.logits)
    for _ in range(steps):
        tokens.append(nxt)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        out = model(input_ids=nxt, attention_mask=mask, **cache_kwargs(cache), use_cache=True)
        cache, nxt = cache_from_output(out), _pick(out.logits)
    return torch.cat(tokens, dim=1)


@torch.no_grad()
def generate(model: Any, inputs: dict[str, torch.Tensor], steps: int) -> torch.Tensor:
    out = model.generate(
        **inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, suppress_tokens=SUPPRESS
    )
    return out[:, inputs["input_ids"].shape[1] :]


def expected_kept(strategy: vtokprune.Strategy, model: Any, available: list[int], sample_of: list[int]) -> list[int]:
    """Exact per-image (vision) or per-sample (in-LLM) number of kept visual tokens."""
    if strategy.acts == "vision":
        return [strategy.budget(n) for n in available]
    adapter = vtokprune.get_adapter(model)
    layers = len(adapter.decoder_layers())
    per_sample = [0] * (max(sample_of) + 1)
    for n, s in zip(available, sample_of):
        schedule = strategy.schedule(layers, n)  # type: ignore[attr-defined]
        per_sample[s] += schedule[max(schedule)]
    return per_sample


# ---------------------------------------------------------------------------------------------------------- tests


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


def _capture_lm(model: Any) -> tuple[dict[str, Any], Any]:
    seen: dict[str, Any] = {}

    def grab(module, args, kwargs):  # type: ignore[no-untyped-def]
        seen["position_ids"] = kwargs.get("position_ids")
        seen["length"] = kwargs["inputs_embeds"].shape[1]

    lm = vtokprune.get_adapter(model).wrapped_module().language_model
    return seen, lm.register_forward_pre_hook(grab, with_kwargs=True)


def _capture_rope(model: Any) -> tuple[dict[str, Any], Any]:
    seen: dict[str, Any] = {}

    def grab(module, args, kwargs):  # type: ignore[no-untyped-def]
        seen["cos"] = kwargs["position_embeddings"][0]

    layer = vtokprune.get_adapter(model).decoder_layers()[-1]
    return seen, layer.register_forward_pre_hook(grab, with_kwargs=True)


@pytest.mark.parametrize("name", STRATEGIES)
def test_kept_tokens_keep_original_positions(family, name):
    """Position ids (or M-RoPE columns) given to the language model, and the rotary embeddings the last decoder layer
    gets, are those of the kept tokens in the unpruned sequence; every text token is kept."""
    fam, model = family
    spec, inputs = case(fam, model, name)
    adapter = vtokprune.get_adapter(model)
    ids = inputs["input_ids"]
    visual = adapter.visual_token_mask(ids)
    seen, handle = _capture_lm(model)
    rope, rope_handle = _capture_rope(model)
    try:
        with torch.no_grad():
            model(**inputs, use_cache=True)
    finally:
        handle.remove()
        rope_handle.remove()
    ref_pos, ref_cos = seen["position_ids"], rope["cos"]
    if ref_pos is None:  # the model's default: 0..L-1
        ref_pos = torch.arange(ids.shape[1]).expand_as(ids)
    apply_or_skip(model, strategy_for(name, keep=K, positions="original"))
    seen, handle = _capture_lm(model)  # registered after apply: runs after vtokprune's own layer hooks
    rope, rope_handle = _capture_rope(model)
    try:
        with torch.no_grad():
            out = model(**inputs, use_cache=True)
        record = model._vtokprune_state.record_for(cache_from_output(out))
        pos, cos = seen["position_ids"], rope["cos"]
    finally:
        vtokprune.remove(model)
        handle.remove()
        rope_handle.remove()
    valid = inputs["attention_mask"].bool()
    comp = record.outer if record.outer is not None else (record.stages[-1].comp if record.stages else None)
    if comp is None:
        assert name == "none"
        return
    cols = comp.cols
    ref_cos, cos = ref_cos.expand(ids.shape[0], -1, -1), cos.expand(ids.shape[0], -1, -1)
    slot_ok = comp.valid & valid.gather(1, cols.clamp(min=0))
    for b in range(ids.shape[0]):
        kept_cols = set(cols[b][slot_ok[b]].tolist())
        assert set(torch.nonzero(valid[b] & ~visual[b]).flatten().tolist()) <= kept_cols  # all text kept
        # the rotary embedding each kept token gets in the last layer is the one it had unpruned
        assert torch.equal(cos[b][slot_ok[b]], ref_cos[b][cols[b][slot_ok[b]]])
    if record.outer is not None:
        assert pos is not None
        gathered = (
            ref_pos.gather(-1, cols.clamp(min=0).expand_as(pos))
            if pos.dim() == 2
            else torch.stack([ref_pos[r].gather(-1, cols.clamp(min=0)) for r in range(ref_pos.shape[0])])
        )
        mask = slot_ok if pos.dim() == 2 else slot_ok[None].expand_as(pos)
        assert torch.equal(pos[mask], gathered[mask])


@pytest.mark.parametrize("name", STRATEGIES)
def test_contiguous_positions(family, name):
    """positions="contiguous": the kept tokens are numbered as if the pruned sequence were the input (1-D RoPE);
    M-RoPE models keep their 3-D positions (a documented no-op)."""
    fam, model = family
    _, inputs = case(fam, model, name)
    ids = inputs["input_ids"]
    rope, rope_handle = _capture_rope(model)
    try:
        with torch.no_grad():
            model(**inputs, use_cache=True)
    finally:
        rope_handle.remove()
    ref_cos = rope["cos"].expand(ids.shape[0], -1, -1)
    apply_or_skip(model, strategy_for(name, keep=K, positions="contiguous"))
    rope, rope_handle = _capture_rope(model)
    try:
        with torch.no_grad():
            out = model(**inputs, use_cache=True)
        record = model._vtokprune_state.record_for(cache_from_output(out))
        cos = rope["cos"].expand(ids.shape[0], -1, -1)
    finally:
        vtokprune.remove(model)
        rope_handle.remove()
    comp = record.outer if record.outer is not None else (record.stages[-1].comp if record.stages else None)
    if comp is None:
        assert name == "none"
        return
    if vtokprune.get_adapter(model).mrope():
        assert not record.contiguous
        return
    valid = inputs["attention_mask"].bool()
    real = comp.valid & valid.gather(1, comp.cols.clamp(min=0))
    for b in range(ids.shape[0]):
        n = int(real[b].sum())
        first = int(torch.nonzero(valid[b])[0])
        slots = cos[b][real[b]]
        if record.outer is not None:  # pre-LLM: position = compact slot, as an unpruned input of that length
            want = ref_cos[b][torch.nonzero(real[b]).flatten()]
        else:  # in-LLM: consecutive from the row's first real position
            want = ref_cos[b][first : first + n]
        torch.testing.assert_close(slots, want)


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


# ---------------------------------------------------------------------------------------------------------- family-specific


@pytest.mark.parametrize("version", ["2", "2.5"])
def test_qwen_cls_raises_capability_error_naming_alternatives(version):
    model = tiny_qwen2_vl(version=version)
    with pytest.raises(CapabilityError, match="no \\[CLS\\].*pool"):
        vtokprune.apply(model, vtokprune.CLSAttention(keep=4))
    assert not vtokprune.is_pruned(model)


def test_llava_next_tiles_newlines_and_cls_mapping():
    """Tiles cover the content tokens once; newline tokens are kept for rows with a kept token; [CLS] attention maps
    to the crop patch each content token came from."""
    from vtokprune.adapters.llava_next import LlavaNextAdapter

    model = tiny_llava_next()
    adapter = LlavaNextAdapter(model)
    for size in [(28, 56), (40, 30), (56, 20)]:
        lay = adapter.layout(size)
        flat = sorted(i for tile in lay.tiles for i in tile)
        assert flat == list(range(len(lay.content_run)))
        run = torch.cat([lay.content_run, lay.newline_run]).sort().values
        assert run.tolist() == list(range(lay.run_len))  # content + newlines tile the placeholder run exactly
        assert len(set(lay.content_src.tolist())) == len(lay.content_src)
    # end to end: the strategy's scores must be the per-crop [CLS] attention at the mapped patches
    inputs = llava_next_inputs(model, [[8, 9]], [[(40, 30)]])
    captured = {}

    class Spy(vtokprune.RandomPrune):
        name = "spy_llava_next"
        needs = frozenset({"cls_attn"})

        def select(self, signals, k):  # type: ignore[no-untyped-def]
            captured["signals"] = signals
            return super().select(signals, k)

    with vtokprune.pruned(model, Spy(keep=5)):
        logits(model, inputs)
        sel = vtokprune.last_selection(model)
    sig = captured["signals"]
    assert sig.tiles is not None and sig.grid is None and sig.features.shape[1] == sel.available[0]
    attn = next(iter(sig.cls_attn.values()))[0]  # [H, T]
    # base tokens: crop 0's attention sums to (1 - attention on [CLS]) < 1; each crop's block likewise
    lay = adapter.layout((40, 30))
    for crop in range(lay.crops):
        members = [j for j, s in enumerate(lay.content_src.tolist()) if s // 16 == crop]
        assert float(attn[:, members].sum(-1).max()) <= 1.0 + 1e-5


def test_internvl_cls_attention_sums_2x2_groups():
    model = tiny_internvl()
    inputs = internvl_inputs(model, [[8, 9]], [[1]])
    captured = {}

    class Spy(vtokprune.RandomPrune):
        name = "spy_internvl"
        needs = frozenset({"cls_attn"})

        def select(self, signals, k):  # type: ignore[no-untyped-def]
            captured["signals"] = signals
            return super().select(signals, k)

    with vtokprune.pruned(model, Spy(keep=5)):
        logits(model, inputs)
    sig = captured["signals"]
    attn = next(iter(sig.cls_attn.values()))  # [1, H, 16]: 8x8 patches -> 4x4 tokens
    assert attn.shape[-1] == 16 and sig.grid == (4, 4)
    total = attn.sum(-1)  # the patches' share of [CLS] attention: all of it but [CLS]'s own
    assert bool((total < 1).all()) and bool((total > 0.5).all())
