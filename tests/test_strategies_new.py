"""CDPruner, VisPruner, DART and ZOO-Prune on hand-built tensors whose right answer is known, and against
re-creations of the official code's math (written here from the papers / official repositories, independently)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vtokprune
from vtokprune.errors import BudgetError, CapabilityError
from vtokprune.strategies.base import LLMContext, VisionSignals
from vtokprune.strategies.cdpruner import CDPruner, CDPrunerCLIP, conditional_kernel, dpp_greedy_map, minmax
from vtokprune.strategies.dart import DART, dart_select_one, pivot_quotas
from vtokprune.strategies.vispruner import VisPruner, remove_duplicates
from vtokprune.strategies.zoo import ZOOPrune, sensitivity_diversity_select, zeroth_order_sensitivity

# ------------------------------------------------------------------------------------------------ CDPruner


def naive_greedy_logdet(kernel: torch.Tensor, k: int) -> list[int]:
    """Greedy MAP by brute force: add the item maximising det(L_S) at each step (ties -> lower index)."""
    chosen: list[int] = []
    for _ in range(k):
        best, best_det = -1, -float("inf")
        for j in range(kernel.shape[0]):
            if j in chosen:
                continue
            s = chosen + [j]
            det = float(torch.linalg.det(kernel[s][:, s].double()))
            if det > best_det + 1e-12:
                best, best_det = j, det
        chosen.append(best)
    return sorted(chosen)


def test_dpp_greedy_matches_brute_force_determinants():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 9, 5, generator=gen)
    r = torch.rand(3, 9, generator=gen) + 0.1
    kernel = conditional_kernel(x, r, None)
    got = dpp_greedy_map(kernel, 4)
    for i in range(3):
        assert got[i].tolist() == naive_greedy_logdet(kernel[i], 4)


def test_dpp_orthogonal_tokens_follow_relevance_and_duplicates_are_skipped():
    eye = torch.eye(4)
    feats = torch.stack([eye[0], eye[0], eye[1], eye[2], eye[3]])[None]  # token 1 duplicates token 0
    relevance = torch.tensor([[1.0, 0.99, 0.5, 0.8, 0.1]])
    idx = dpp_greedy_map(conditional_kernel(feats, relevance, None), 3)
    assert idx.tolist() == [[0, 2, 3]]  # most relevant, then never its duplicate


def test_dpp_never_repeats_when_the_kernel_rank_runs_out():
    gen = torch.Generator().manual_seed(2)
    feats = torch.randn(2, 40, 3, generator=gen)  # rank 3 < k
    relevance = torch.rand(2, 40, generator=gen)
    idx = dpp_greedy_map(conditional_kernel(feats, relevance, None), 10)
    assert all(len(set(r.tolist())) == 10 for r in idx)
    # past the rank, the remaining picks follow quality (relevance^2)
    first3 = dpp_greedy_map(conditional_kernel(feats, relevance, None), 3)
    for i in range(2):
        rest = sorted(set(idx[i].tolist()) - set(first3[i].tolist()))
        order = [j for j in torch.argsort(relevance[i], descending=True).tolist() if j not in first3[i].tolist()]
        assert rest == sorted(order[:7])


def official_cdpruner(features: torch.Tensor, relevance_raw: torch.Tensor, k: int) -> torch.Tensor:
    """The official encode_images math for one image: cosine kernel, min-max relevance, greedy with -inf marking."""
    xn = features / features.norm(dim=-1, keepdim=True)
    sim = xn @ xn.T
    rel = (relevance_raw - relevance_raw.min() + 1e-6) / (relevance_raw.max() - relevance_raw.min())
    kern = rel[:, None] * sim * rel[None, :]
    n = kern.shape[0]
    cis = torch.zeros(k, n)
    di2s = torch.diagonal(kern).clone()
    picks = []
    for i in range(k):
        j = int(torch.argmax(di2s))
        picks.append(j)
        eis = (kern[j] - cis[:i, j] @ cis[:i]) / torch.sqrt(di2s[j])
        cis[i] = eis
        di2s -= eis.square()
        di2s[j] = -float("inf")
    return torch.tensor(sorted(picks))


def test_cdpruner_matches_official_math_with_embedding_relevance():
    gen = torch.Generator().manual_seed(1)
    n, t, d, k = 2, 12, 6, 5
    feats = torch.randn(n, t, d, generator=gen)
    table = torch.nn.Embedding(20, d)
    with torch.no_grad():
        table.weight.copy_(torch.randn(20, d, generator=gen))
    prompts = [torch.tensor([3, 4, 5]), torch.tensor([7, 8])]
    signals = VisionSignals(features=feats, prompt_ids=prompts, embed_tokens=table)
    got = CDPruner(keep=k).select(signals, k)
    for i in range(n):
        e = F.normalize(table.weight[prompts[i]].detach(), dim=-1)
        raw = (F.normalize(feats[i], dim=-1) @ e.T).mean(dim=-1)
        assert got.indices[i].tolist() == official_cdpruner(feats[i], raw, k).tolist()
    assert torch.equal(got.features, torch.stack([feats[i, got.indices[i]] for i in range(n)]))


def test_cdpruner_clip_negates_clip_similarity(monkeypatch):
    sims = torch.tensor([[0.9, 0.1, 0.5, 0.2]])
    monkeypatch.setattr(CDPrunerCLIP, "scores", lambda self, signals: sims)
    strategy = CDPrunerCLIP(keep=1, clip="x", tokenizer="y")
    assert torch.equal(strategy.relevance(VisionSignals(features=torch.zeros(1, 4, 2))), -sims)
    # with orthogonal features the single kept token is the least CLIP-similar one, as in the official code
    signals = VisionSignals(features=torch.eye(4)[None])
    assert strategy.select(signals, 1).indices.tolist() == [[1]]


def test_cdpruner_needs_the_prompt_and_validates_theta():
    with pytest.raises(CapabilityError, match="prompt"):
        CDPruner(keep=1).select(VisionSignals(features=torch.randn(1, 4, 3)), 1)
    with pytest.raises(BudgetError, match="theta"):
        CDPruner(keep=1, theta=1.0)
    assert minmax(torch.tensor([[2.0, 4.0]])).tolist()[0] == pytest.approx([1e-6 / 2, 1.0 + 1e-6 / 2])


# ------------------------------------------------------------------------------------------------ VisPruner


def official_vispruner(attn: torch.Tensor, feats: torch.Tensor, k: int, ratio: float) -> list[int]:
    """The official loop for one image: argsort by attention, bipartite duplicate removal 8 at a time."""
    important = int(k * ratio)
    order = attn.argsort(descending=True)
    imp, residual = order[:important], order[important:]
    xn = feats / feats.norm(dim=-1, keepdim=True)
    if important == k:
        residual = residual[:0]
    while important < k:
        r = min(8, residual.shape[0] - (k - important))
        if r <= 0:
            break
        tok = xn[residual]
        a, b = tok[::2], tok[1::2]
        scores = (a @ b.T).max(dim=-1).values
        distinct = scores.argsort(descending=True)[r:]
        residual = torch.cat([residual[::2][distinct], residual[1::2]])
    return sorted(torch.cat([imp, residual]).tolist())


@pytest.mark.parametrize("k,ratio", [(6, 0.5), (10, 0.5), (4, 0.0), (7, 1.0)])
def test_vispruner_matches_official_loop(k, ratio):
    gen = torch.Generator().manual_seed(k)
    n, t = 2, 30
    attn = torch.rand(n, 2, t, generator=gen)
    hidden = torch.randn(n, t, 5, generator=gen)
    signals = VisionSignals(features=torch.randn(n, t, 3), cls_attn={1: attn}, hidden={2: hidden})
    got = VisPruner(keep=k, important_ratio=ratio).select(signals, k).indices
    for i in range(n):
        assert got[i].tolist() == official_vispruner(attn[i].mean(0), hidden[i], k, ratio)


def test_vispruner_duplicates_go_first():
    # residual tokens 0..5: 0 and 2 are copies of 1; the others are orthogonal
    eye = torch.eye(6)
    metric = torch.stack([eye[1], eye[1], eye[1], eye[3], eye[4], eye[5]])
    kept = remove_duplicates(metric, torch.arange(6), 4, 8)
    assert sorted(kept.tolist()) == [1, 3, 4, 5]


def test_vispruner_needs_cls_on_qwen():
    from vtokprune.testing import tiny_qwen2_vl

    with pytest.raises(CapabilityError, match="CLS"):
        vtokprune.apply(tiny_qwen2_vl(version="2"), VisPruner(keep=4))


# ------------------------------------------------------------------------------------------------ DART


def test_pivot_quotas_split_exactly():
    assert pivot_quotas(10, 4) == [3, 3, 2, 2]
    assert pivot_quotas(3, 8) == [1, 1, 1, 0, 0, 0, 0, 0]
    assert sum(pivot_quotas(120, 8)) == 120


def test_dart_keeps_image_pivots_and_tokens_least_similar_to_each_pivot():
    # positions 0..5 visual, 6..7 text. Hidden: unit vectors chosen so the answer is known.
    e = torch.eye(4)
    hidden = torch.stack([e[0], e[0], e[1], e[1] + 0.1 * e[0], e[2], e[3], e[0], e[2]])
    key_norm = torch.tensor([9.0, 1, 2, 3, 4, 5, 0.5, 7])  # image pivot: 0; text pivot: 7
    visual = torch.tensor([True] * 6 + [False] * 2)
    text = ~visual
    kept = dart_select_one(hidden, key_norm, visual, text, 3, image_pivots=1, text_pivots=1)
    # image pivot 0 (kept); quota [1, 1]: pivot 0 (e0) takes the first token orthogonal to it -> 2 (e1);
    # pivot 7 (e2) takes the least similar of the rest -> 1 (e0, cos 0; ties broken by position)
    assert kept.tolist() == [0, 2, 1]


def test_dart_is_allowed_without_attention_rows_and_fastv_is_not():
    from vtokprune.testing import tiny_llava

    model = tiny_llava(seed=0)
    cfg = vtokprune.get_adapter(model).text_config()
    cfg._attn_implementation_internal = "flash_attention_2"  # only the check reads it; nothing is run
    try:
        with pytest.raises(CapabilityError, match="sdpa"):
            vtokprune.apply(model, "fastv", keep=4)
        vtokprune.apply(model, DART(keep=4))
        assert vtokprune.is_pruned(model)
    finally:
        vtokprune.remove(model)
        cfg._attn_implementation_internal = "sdpa"


def test_dart_stage_scores_keep_each_images_budget():
    b, length, d = 1, 10, 4
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(b, length, d, generator=gen)
    image_ids = torch.tensor([[-1, 0, 0, 0, 0, 1, 1, 1, -1, -1]])
    valid = torch.ones(b, length, dtype=torch.bool)
    ctx = LLMContext(
        image_mask=image_ids >= 0,
        valid=valid,
        text_mask=image_ids < 0,
        last_index=torch.tensor([length - 1]),
        layer=2,
        num_layers=4,
        hidden=hidden,
    )
    norms = torch.rand(b, length, generator=gen)
    scores = DART(keep=2, image_pivots=1, text_pivots=1).stage_scores(
        norms, hidden, ctx, image_ids, torch.tensor([[2, 1]])
    )
    finite = torch.isfinite(scores[0])
    assert int(finite[1:5].sum()) == 2 and int(finite[5:8].sum()) == 1 and not bool(finite[[0, 8, 9]].any())


def test_dart_validates():
    with pytest.raises(BudgetError):
        DART(keep=4, layer=0)
    with pytest.raises(BudgetError, match="pivot"):
        DART(keep=4, image_pivots=0, text_pivots=0)


# ------------------------------------------------------------------------------------------------ ZOO-Prune


def test_zoo_sensitivity_of_a_linear_projector_is_the_same_for_every_token_and_seeded():
    w = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 7, 5)
    s = zeroth_order_sensitivity(lambda v: v @ w.T, x, 4, 1e-2, seed=5)
    assert torch.allclose(s, s[0, 0].expand_as(s), rtol=1e-4)
    assert torch.equal(s, zeroth_order_sensitivity(lambda v: v @ w.T, x, 4, 1e-2, seed=5))
    assert not torch.equal(s, zeroth_order_sensitivity(lambda v: v @ w.T, x, 4, 1e-2, seed=6))


def test_zoo_saturated_tokens_are_insensitive():
    x = torch.zeros(1, 3, 4)
    x[0, 1] = 10.0  # tanh saturates: ~0 sensitivity
    x[0, 2] = 1.0
    s = zeroth_order_sensitivity(torch.tanh, x, 8, 1e-3, seed=0)[0]
    assert s[0] > s[2] > s[1] and float(s[1]) < 1e-6
    assert s[0] == pytest.approx(1.0, rel=1e-3)  # tanh'(0) = 1 in every direction


def test_zoo_hybrid_selection_skips_sensitive_duplicates():
    e = torch.eye(3)
    feats = torch.stack([e[0], e[0], e[1], e[2]])
    sens = torch.tensor([1.0, 0.9, 0.2, 0.5])
    assert sensitivity_diversity_select(sens, feats, 2).tolist() == [0, 3]
    assert sensitivity_diversity_select(sens, feats, 3).tolist() == [0, 2, 3]


def test_zoo_strategy_end_to_end_on_llava_and_capability_error_elsewhere():
    from vtokprune.testing import llava_inputs, tiny_llava, tiny_qwen2_vl

    model = tiny_llava(seed=0)
    inputs = llava_inputs(model, [[8, 9, 10]], images=[1])
    runs = []
    for _ in range(2):
        with torch.no_grad(), vtokprune.pruned(model, ZOOPrune(keep=4, seed=1)):
            model(**inputs)
            runs.append(vtokprune.last_selection(model).kept[0].tolist())
    assert runs[0] == runs[1] and len(runs[0]) == 4
    with pytest.raises(CapabilityError, match="projector"):
        vtokprune.apply(tiny_qwen2_vl(version="2"), ZOOPrune(keep=4))
    with pytest.raises(BudgetError):
        ZOOPrune(keep=4, perturbations=0)


def test_new_strategies_are_registered_and_exported():
    names = vtokprune.available_strategies()
    assert {"cdpruner", "cdpruner_clip", "vispruner", "dart", "zoo"} <= set(names)
    for cls_name in ("CDPruner", "CDPrunerCLIP", "VisPruner", "DART", "ZOOPrune"):
        assert hasattr(vtokprune, cls_name)


# ------------------------------------------------------------------------------------------------ DART, flash-style masks

FAKE_FLASH = "vtokprune_test_flash"


def _register_fake_flash() -> None:
    """An attention implementation that receives flash attention's [B, L] padding masks (or None) and runs SDPA with
    the equivalent causal + padding mask: stands in for flash_attention_2 where flash-attn is not installed."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    def fake_flash(module, query, key, value, attention_mask, **kwargs):  # type: ignore[no-untyped-def]
        assert attention_mask is None or attention_mask.dim() == 2, "flash attention only ever gets 2-D masks"
        lq, lk = query.shape[2], key.shape[2]
        causal = torch.ones(lq, lk, dtype=torch.bool, device=query.device).tril(lk - lq)
        mask = (
            causal[None, None] if attention_mask is None else causal[None, None] & attention_mask.bool()[:, None, None]
        )
        return sdpa_attention_forward(module, query, key, value, mask.expand(query.shape[0], 1, lq, lk), **kwargs)

    AttentionInterface.register(FAKE_FLASH, fake_flash)
    AttentionMaskInterface.register(FAKE_FLASH, flash_attention_mask)


def test_dart_runs_with_flash_style_masks_like_sdpa():
    from vtokprune.testing import llava_inputs, tiny_llava

    _register_fake_flash()
    sdpa = tiny_llava(seed=0, text_layers=4)
    flash = tiny_llava(seed=0, text_layers=4)
    flash.config.text_config._attn_implementation_internal = FAKE_FLASH
    inputs = llava_inputs(sdpa, [[8, 9, 10, 11, 12], [13, 14]], images=[1, 2])  # padded batch, 2 images in one
    outs = []
    for model in (sdpa, flash):
        with torch.no_grad(), vtokprune.pruned(model, DART(keep=5)):
            logits = model(**inputs).logits
            kept = [k.tolist() for k in vtokprune.last_selection(model).kept]
            gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        outs.append((logits, kept, gen))
    assert outs[0][1] == outs[1][1]
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(outs[0][0][:, -1][valid[:, -1]], outs[1][0][:, -1][valid[:, -1]], atol=1e-4, rtol=1e-4)
    assert torch.equal(outs[0][2], outs[1][2])


def test_zoo_llava_projector_shortcut_equals_the_black_box_estimate():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=24),
        text_config=LlamaConfig(hidden_size=40, num_attention_heads=4, num_key_value_heads=4),
        image_token_id=3,
    )
    torch.manual_seed(0)
    projector = LlavaMultiModalProjector(config).eval()
    x = torch.randn(2, 11, 24)
    fast = zeroth_order_sensitivity(projector, x, 8, 1e-2, seed=3)
    black_box = zeroth_order_sensitivity(lambda v: projector(v), x, 8, 1e-2, seed=3)
    torch.testing.assert_close(fast, black_box, rtol=2e-3, atol=1e-5)
    assert torch.equal(fast.argsort(dim=-1), black_box.argsort(dim=-1))


def test_zoo_shortcut_is_not_taken_when_the_projector_forward_changed(monkeypatch):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=24),
        text_config=LlamaConfig(hidden_size=40, num_attention_heads=4, num_key_value_heads=4),
        image_token_id=3,
    )
    torch.manual_seed(0)
    projector = LlavaMultiModalProjector(config).eval()
    x = torch.randn(2, 11, 24)

    def changed_forward(self, image_features):  # a release that adds a step the shortcut does not know
        return torch.tanh(self.linear_2(self.act(self.linear_1(image_features))))

    monkeypatch.setattr(LlavaMultiModalProjector, "forward", changed_forward)
    got = zeroth_order_sensitivity(projector, x, 8, 1e-2, seed=3)
    black_box = zeroth_order_sensitivity(lambda v: projector(v), x, 8, 1e-2, seed=3)
    assert torch.equal(got, black_box)
