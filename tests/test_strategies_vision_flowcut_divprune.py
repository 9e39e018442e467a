"""FlowCut (against a re-creation of its official encoder loop) and DivPrune on hand-built tensors, known answers."""

from __future__ import annotations

import pytest
import torch

from vtokprune import get_strategy
from vtokprune.strategies.base import VisionSignals
from vtokprune.strategies.divprune import cosine_distance, max_min_diverse
from vtokprune.strategies.flowcut import adaptive_prune_count, flow_scores, flowcut_select_one


# ---------------------------------------------------------------------------------------------- flowcut
def test_flow_scores_weight_by_value_norm():
    h, c, d = 2, 5, 3
    attn = torch.full((h, c), 0.2)
    norms = torch.tensor([1.0, 5.0, 2.0, 4.0, 3.0])
    values = (norms[None, :, None] / d).expand(h, c, d).clone()
    score = flow_scores(attn, values, torch.zeros(h, d))
    assert torch.allclose(score, 0.4 * norms)
    assert adaptive_prune_count(torch.full((1, 8), 1 / 8), 2, 4) == 0  # flat attention: no step yet
    assert adaptive_prune_count(torch.tensor([[1.0] + [0.0] * 7]), 2, 4) == 3  # peaked: (8-2)/sqrt(4)
    assert adaptive_prune_count(torch.full((1, 8), 1 / 8), 2, 0) == 6  # last layer: down to the target


def test_flowcut_pruned_tokens_never_return():
    h, t, d = 2, 6, 4
    a0 = torch.tensor([0.97, 0.01, 0.01, 0.01, 0.0, 0.0]).expand(h, t)
    a2 = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.01, 0.99]).expand(h, t)
    vals = torch.ones(h, t, d)
    kept = flowcut_select_one(
        {0: a0, 2: a2}, {0: vals, 2: vals}, {0: torch.zeros(h, d), 2: torch.zeros(h, d)}, k=2, stride=2, smoothing=0.5
    )
    assert set(kept.tolist()) <= {0, 1, 2} and len(kept) == 2  # layer 0 kept 3; token 5 was gone by layer 2


def official_flowcut(cls_attn, values, cls_values, feature_layer, k):
    """TungChintao/FlowCut's encoder loop for one image, re-created on given per-layer signals (heads first):
    compute_score, 0.5/0.5 accumulation, rpl = feature_layer - idx - 1, cut when rpl is even, adaptive count."""
    t = cls_attn[0].shape[-1]
    keep = torch.arange(t)
    cum = None
    target = k + 1  # the official target counts the [CLS]
    for idx in range(feature_layer + 1):
        if keep.numel() + 1 <= target:
            break
        rpl = feature_layer - idx - 1
        a = cls_attn[idx][:, keep].mean(0)
        v = values[idx][:, keep]
        cv = cls_values[idx]
        logits = torch.cat([(cv * cv).sum(-1, keepdim=True), torch.einsum("hd,hcd->hc", cv, v)], dim=-1)
        sem = torch.softmax(logits, dim=-1).mean(0)[1:]
        score = (a / a.sum() + sem / sem.sum()) * torch.norm(v.mean(0), p=1, dim=-1)
        cum = score if cum is None else 0.5 * cum + 0.5 * score
        if not rpl % 2:
            if rpl:
                prob = a / a.sum()
                ratio = -(prob * torch.log(prob)).sum() / torch.log(torch.tensor(float(a.shape[-1])))
                prune = int(((a.shape[-1] - (target - 1)) / rpl**0.5 * (1 - ratio**2)).round())
            else:
                prune = keep.numel() + 1
            num = max(keep.numel() + 1 - prune, target)
            top = torch.topk(cum, num - 1).indices.sort().values
            keep, cum = keep[top], cum[top]
    return keep.tolist()


@pytest.mark.parametrize("seed", range(4))
def test_flowcut_matches_official_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    h, t, d, feature_layer, k = 2, 24, 4, 6, 5
    attn = {i: torch.softmax(torch.randn(h, t, generator=gen) * 2, -1) for i in range(feature_layer + 1)}
    vals = {i: torch.randn(h, t, d, generator=gen) for i in range(feature_layer + 1)}
    cls_v = {i: torch.randn(h, d, generator=gen) for i in range(feature_layer + 1)}
    layers = get_strategy("flowcut", keep=k).vision_layers(8, feature_layer)
    assert layers == tuple(range(feature_layer))  # the feature layer itself is not scored
    sig = VisionSignals(
        features=torch.randn(1, t, 3),
        cls_attn={i: attn[i][None] for i in layers},
        values={i: vals[i][None] for i in layers},
        cls_values={i: cls_v[i][None] for i in layers},
    )
    got = get_strategy("flowcut", keep=k).select(sig, k).indices[0].tolist()
    assert got == official_flowcut(attn, vals, cls_v, feature_layer, k)


def test_flowcut_exact_budget_random():
    gen = torch.Generator().manual_seed(1)
    n, h, t, d = 2, 3, 20, 4
    layers = range(5)
    sig = VisionSignals(
        features=torch.randn(n, t, 8, generator=gen),
        cls_attn={i: torch.softmax(torch.randn(n, h, t, generator=gen) * 3, -1) for i in layers},
        values={i: torch.randn(n, h, t, d, generator=gen) for i in layers},
        cls_values={i: torch.randn(n, h, d, generator=gen) for i in layers},
    )
    for k in (1, 5, 19):
        idx = get_strategy("flowcut", keep=k).select(sig, k).indices
        assert idx.shape == (n, k)
        assert all(len(set(r.tolist())) == k for r in idx) and bool((idx.diff(dim=1) > 0).all())


# ---------------------------------------------------------------------------------------------- divprune
def test_divprune_picks_farthest_points():
    pts = torch.tensor([[1.0, 0.0], [0.99, 0.01], [0.0, 1.0], [-1.0, 0.0], [0.1, 1.0]])
    d = cosine_distance(pts)
    assert max_min_diverse(d, 1).tolist() == [3]  # its nearest neighbour is the farthest
    assert max_min_diverse(d, 2).tolist() == [0, 3]
    assert max_min_diverse(d, 3).tolist() == [0, 2, 3]
    same = cosine_distance(torch.ones(6, 3))
    assert max_min_diverse(same, 4).tolist() == [0, 1, 2, 3]  # ties: lowest index, never the same token twice


def test_divprune_select_gathers_features():
    feats = torch.randn(2, 10, 4)
    sel = get_strategy("divprune", keep=3).select(VisionSignals(features=feats), 3)
    assert sel.indices.shape == (2, 3)
    assert torch.equal(sel.features, torch.stack([feats[i, sel.indices[i]] for i in range(2)]))
