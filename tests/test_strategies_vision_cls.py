"""[CLS]-attention vision strategies on hand-built tensors with known answers: cls_multilayer, VisionZip and HoloV
(the last two against re-creations of their official code).

FlowCut and DivPrune: tests/test_strategies_vision_flowcut_divprune.py; text_clip and every vision strategy end to end
on the tiny LLaVA: tests/test_strategies_vision_end_to_end.py.
"""

from __future__ import annotations

import pytest
import torch

from vtokprune import get_strategy
from vtokprune.strategies.base import VisionSignals
from vtokprune.strategies.cls_multilayer import layer_range, multilayer_cls_scores
from vtokprune.strategies.holov import allocate, grid_crops
from vtokprune.strategies.visionzip import split_budget


def heads(scores: list[float], h: int = 2) -> torch.Tensor:
    """[T] -> [1, H, T] identical per head."""
    return torch.tensor(scores).expand(1, h, -1).clone()


# ---------------------------------------------------------------------------------------------- cls_multilayer
def test_layer_range_defaults_and_start():
    assert layer_range(24, 22, None, 4) == (19, 20, 21, 22)
    assert layer_range(24, 22, -6, 4) == (18, 19, 20, 21, 22)
    assert layer_range(24, 22, 0, 4) == tuple(range(23))
    assert layer_range(3, 1, None, 4) == (0, 1)
    assert get_strategy("cls_multilayer", keep=4, depth=2).vision_layers(24, 22) == (21, 22)


def test_cls_multilayer_sums_layers():
    a1 = heads([0.5, 0.0, 0.3, 0.0, 0.1, 0.1])
    a2 = heads([0.0, 0.5, 0.3, 0.0, 0.1, 0.1])
    scores = multilayer_cls_scores({1: a1, 2: a2}, (1, 2))
    assert torch.allclose(scores, torch.tensor([[0.5, 0.5, 0.6, 0.0, 0.2, 0.2]]))
    sig = VisionSignals(features=torch.randn(1, 6, 3), cls_attn={1: a1, 2: a2})
    sel = get_strategy("cls_multilayer", keep=3).select(sig, 3)
    assert sel.indices.tolist() == [[0, 1, 2]]
    assert torch.equal(sel.features, sig.features[:, [0, 1, 2]])


# ---------------------------------------------------------------------------------------------- visionzip
def test_visionzip_split_matches_paper():
    assert [split_budget(k, 10 / 64) for k in (64, 128, 192)] == [(54, 10), (108, 20), (162, 30)]


def test_visionzip_merges_the_right_tokens():
    t, d = 8, 5
    feats = torch.randn(1, t, d)
    attn = heads([0.4, 0.3, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05])  # tokens 0 and 1 dominate
    # rest = [2..7], 2 targets every 3rd: tokens 2 and 5; keys: {3, 4} look like 2, {6, 7} look like 5
    key = torch.zeros(t, 2)
    key[[2, 3, 4], 0] = 1.0
    key[[5, 6, 7], 1] = 1.0
    key[[0, 1], :] = 1.0
    keys = key.expand(1, 2, t, 2).clone()
    sig = VisionSignals(features=feats, cls_attn={1: attn}, keys={1: keys})
    sel = get_strategy("visionzip", keep=4, contextual_ratio=0.5, merge="mean").select(sig, 4)
    assert sel.indices.tolist() == [[0, 1, 2, 5]]
    f = feats[0]
    expected = torch.stack([f[0], f[1], f[[2, 3, 4]].mean(0), f[[5, 6, 7]].mean(0)])
    assert torch.allclose(sel.features[0], expected, atol=1e-6)


def official_visionzip(hidden, cls_attn, metric, dominant, contextual):
    """dvlab-research/VisionZip `clip_encoder.py` for one image, re-created: hidden [T+1, C] with [CLS] first,
    cls_attn [H, T+1] the [CLS] row, metric [T+1, d] keys -> the [dominant + contextual, C] kept tokens."""
    top = cls_attn[:, 1:].sum(dim=0).topk(dominant - 1).indices + 1
    keep = torch.zeros(hidden.shape[0], dtype=torch.bool)
    keep[0] = True
    keep[top] = True
    dominant_tokens = hidden[keep]
    rest_h, rest_m = hidden[~keep], metric[~keep]
    rest_m = rest_m / rest_m.norm(dim=-1, keepdim=True)
    step = max(1, rest_m.shape[0] // contextual)
    target = torch.arange(0, rest_m.shape[0], step)[:contextual]
    is_target = torch.zeros(rest_m.shape[0], dtype=torch.bool)
    is_target[target] = True
    sim = rest_m[~is_target] @ rest_m[target].T
    one_hot = torch.zeros(sim.shape).scatter_(1, sim.argmax(dim=1, keepdim=True), 1.0)
    counts = one_hot.sum(dim=0).clamp(min=1)[:, None]
    contextual_tokens = rest_h[target] + one_hot.T @ rest_h[~is_target] / counts
    return torch.cat([dominant_tokens, contextual_tokens])


def test_visionzip_matches_official_code_with_cls_and_target_plus_mean():
    gen = torch.Generator().manual_seed(0)
    t, c, h = 20, 6, 2
    hidden = torch.randn(t + 1, c, generator=gen)
    attn = torch.rand(h, t + 1, generator=gen)
    keys = torch.randn(h, t + 1, 3, generator=gen)
    k, dominant, contextual = 7, 5, 2
    want = official_visionzip(hidden, attn, keys.mean(0), dominant, contextual)
    sig = VisionSignals(
        features=hidden[None, 1:] * 2,  # what the projector gives: here x -> 2x
        cls_attn={1: attn[None, :, 1:]},
        keys={1: keys[None, :, 1:]},
        projector=lambda x: 2 * x,
        projector_input=hidden[None, 1:],
        cls_feature=2 * hidden[None, 0],
    )
    sel = get_strategy("visionzip", keep=k, contextual_ratio=contextual / k).select(sig, k)
    got = sel.features[0] / 2
    assert got.shape == want.shape
    dist = torch.cdist(want, got)  # every official token is one of ours, one to one
    assert bool((dist.min(dim=1).values < 1e-5).all()) and len(set(dist.argmin(dim=1).tolist())) == k
    assert len(set(sel.indices[0].tolist())) == k
    # without the [CLS] signal (other families) every dominant token is a patch, merged in feature space
    plain = VisionSignals(features=sig.features, cls_attn=sig.cls_attn, keys=sig.keys)
    sel2 = get_strategy("visionzip", keep=k, contextual_ratio=contextual / k).select(plain, k)
    top = attn[:, 1:].sum(0).topk(dominant).indices
    assert set(top.tolist()) <= set(sel2.indices[0].tolist())


def test_visionzip_batch_is_each_image_alone():
    torch.manual_seed(0)
    n, t = 3, 16
    sig = VisionSignals(
        features=torch.randn(n, t, 8), cls_attn={2: torch.rand(n, 4, t)}, keys={2: torch.randn(n, 4, t, 6)}
    )
    s = get_strategy("visionzip", keep=7, contextual_ratio=0.3)
    both = s.select(sig, 7)
    for i in range(n):
        one = s.select(
            VisionSignals(
                features=sig.features[i : i + 1],
                cls_attn={2: sig.cls_attn[2][i : i + 1]},
                keys={2: sig.keys[2][i : i + 1]},
            ),
            7,
        )
        assert torch.equal(one.indices, both.indices[i : i + 1])
        assert torch.allclose(one.features, both.features[i : i + 1])
        assert len(set(both.indices[i].tolist())) == 7


# ---------------------------------------------------------------------------------------------- holov
def test_grid_crops_are_rectangular_blocks():
    crops = grid_crops((4, 4), (2, 2))
    assert [c.tolist() for c in crops] == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    uneven = grid_crops((5, 3), (2, 2))
    assert sorted(torch.cat(uneven).tolist()) == list(range(15))


def test_allocate_follows_the_official_floor_and_leftover():
    sizes = torch.tensor([4, 4, 4, 4])
    # floor(6 * [1, 0, 0, 0]) = [5 (eps), 0, 0, 0] -> leftover 1 to the largest weight; capped at the crop size
    assert allocate(torch.tensor([1.0, 0.0, 0.0, 0.0]), sizes, 6).tolist() == [4, 0, 0, 0]
    assert allocate(torch.tensor([1.0, 1.0, 1.0, 1.0]), sizes, 5).tolist() == [2, 1, 1, 1]
    assert allocate(torch.tensor([3.0, 1.0]), torch.tensor([8, 8]), 4).tolist() == [3, 1]


def official_holov(tokens, attention, num_patches, k, alpha=0.09, esp=1e-6):
    """obananas/HoloV `HoloV()` for one image, re-created to return the kept indices instead of the tokens."""
    n = tokens.shape[0]
    size, rem = n // num_patches, n % num_patches
    crops, start = [], 0
    for p in range(num_patches):
        cur = size + (1 if p < rem else 0)
        if cur > 0:
            crops.append(torch.arange(start, start + cur))
        start += cur
    scores = []
    for c in crops:
        a = attention[c]
        if len(c) <= 1:
            scores.append(a.mean())
            continue
        f = tokens[c] / (tokens[c].norm(dim=1, keepdim=True) + esp)
        s = (f @ f.T) * (1 - torch.eye(len(c)))
        mean = s.sum(dim=1) / (len(c) - 1)
        var = ((s - mean[:, None]) ** 2).sum(dim=1) / (len(c) - 1)
        a3 = a * 1e3
        scores.append((a3 + alpha * var * (a3.abs().mean() / (var.abs().mean() + esp))).mean())
    w = torch.stack(scores) / (torch.stack(scores).sum() + esp)
    alloc = (w * k).floor().long()
    remaining = k - alloc.sum()
    if remaining > 0:
        for i in torch.topk(w, k=min(int(remaining), len(w))).indices[:remaining]:
            alloc[i] += 1
    kept = []
    for c, al in zip(crops, alloc):
        if al >= len(c):
            kept.append(c)
        elif al > 0:
            kept.append(c[torch.topk(attention[c], k=int(al)).indices])
    return sorted(torch.cat(kept).tolist())


@pytest.mark.parametrize("seed", range(6))
def test_holov_matches_official_code(seed):
    gen = torch.Generator().manual_seed(seed)
    t, k = 50, 12
    feats = torch.randn(1, t, 8, generator=gen)
    attn = torch.rand(1, 2, t, generator=gen)
    sig = VisionSignals(features=feats, cls_attn={1: attn})
    got = get_strategy("holov", keep=k).select(sig, k).indices[0].tolist()
    assert got == official_holov(feats[0], attn[0].mean(0), 16, k)


def test_holov_fills_an_overflowing_crops_shortfall_with_real_tokens():
    attn = torch.full((16,), 1e-4)
    attn[:4] = torch.tensor([0.4, 0.3, 0.2, 0.1])  # crop 0 (runs of 4) holds almost all the mass
    sig = VisionSignals(features=torch.randn(1, 16, 6), cls_attn={1: attn.expand(1, 3, 16).clone()})
    kept = get_strategy("holov", keep=8, crops=(2, 2)).select(sig, 8).indices[0].tolist()
    assert len(kept) == 8 and {0, 1, 2, 3} <= set(kept)


def test_holov_crop_with_all_the_mass():
    attn = torch.zeros(16)
    attn[[0, 1, 4, 5]] = torch.tensor([0.4, 0.3, 0.2, 0.1])
    sig = VisionSignals(features=torch.randn(1, 16, 6), grid=(4, 4), cls_attn={1: attn.expand(1, 3, 16).clone()})
    s = get_strategy("holov", keep=4, crops=(2, 2), crop_layout="grid")
    assert s.select(sig, 4).indices.tolist() == [[0, 1, 4, 5]]
    # 6 > 4 tokens in that crop: it keeps all, the shortfall is filled by the best remaining tokens
    kept = s.select(sig, 6).indices[0].tolist()
    assert len(kept) == 6 and {0, 1, 4, 5} <= set(kept)


def test_holov_similarity_variance_term_changes_ranking():
    # one crop; token 3 has the most attention but the same similarity to everyone (variance 0), tokens 0/1 are
    # duplicates whose similarities to the others vary most
    r = 0.5**0.5
    feats = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [r, r]]).unsqueeze(0)
    sig = VisionSignals(features=feats, grid=(2, 2), cls_attn={0: torch.tensor([[[0.24, 0.24, 0.24, 0.28]]])})
    assert get_strategy("holov", keep=1, crops=(1, 1), alpha=0.0).select(sig, 1).indices.tolist() == [[3]]
    score = get_strategy("holov", keep=1, crops=(1, 1), alpha=1.0, rank_by="score")
    assert score.select(sig, 1).indices.tolist() == [[0]]
    # the official code ranks inside a crop by attention alone: the variance term only moves budget between crops
    assert get_strategy("holov", keep=1, crops=(1, 1), alpha=1.0).select(sig, 1).indices.tolist() == [[3]]


def test_holov_uses_tiles_when_given():
    attn = torch.zeros(12)
    attn[6:] = torch.arange(6, dtype=torch.float) + 1  # all the mass in the second tile
    sig = VisionSignals(
        features=torch.randn(1, 12, 4),
        grid=(3, 4),
        cls_attn={0: attn.view(1, 1, 12)},
        tiles=[list(range(6)), list(range(6, 12))],
    )
    assert get_strategy("holov", keep=3, crop_layout="grid").select(sig, 3).indices.tolist() == [[9, 10, 11]]
