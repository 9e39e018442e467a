"""Vision-side strategies: hand-built tensors with known answers, then each one end to end on the tiny LLaVA."""

from __future__ import annotations

import math

import pytest
import torch

import vtokprune
from vtokprune import get_strategy
from vtokprune.errors import CapabilityError
from vtokprune.strategies.base import VisionSignals
from vtokprune.strategies.cls_multilayer import layer_range, multilayer_cls_scores
from vtokprune.strategies.divprune import cosine_distance, max_min_diverse
from vtokprune.strategies.flowcut import adaptive_prune_count, flow_scores, flowcut_select_one
from vtokprune.strategies.holov import allocate, grid_crops
from vtokprune.strategies.text_clip import text_patch_scores
from vtokprune.strategies.visionzip import split_budget
from vtokprune.testing import tiny_llava

VISION = ["cls_multilayer", "visionzip", "holov", "flowcut", "divprune", "text_clip"]


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


# ---------------------------------------------------------------------------------------------- text_clip
def test_text_patch_scores_cosine():
    text = torch.tensor([[1.0, 0.0]])
    patches = torch.tensor([[[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]]])
    assert torch.allclose(text_patch_scores(text, patches), torch.tensor([[1.0, 0.0, math.sqrt(0.5)]]))


@pytest.fixture(scope="module")
def clip_dirs(tmp_path_factory):
    """A tiny CLIPModel (vision width 32, like the tiny LLaVA tower) and a WordLevel tokenizer, saved offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("clip")
    vocab = {"[PAD]": 0, "<s>": 1, "</s>": 2, "<image>": 3} | {f"w{i}": i for i in range(4, 96)} | {"[UNK]": 96}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="[UNK]",
        additional_special_tokens=["<image>"],
    )
    fast.save_pretrained(root / "vlm_tok")

    def build(width: int, path):
        torch.manual_seed(0)
        cfg = CLIPConfig(
            text_config=dict(
                vocab_size=100,
                hidden_size=24,
                intermediate_size=48,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=32,
                eos_token_id=2,
            ),
            vision_config=dict(
                hidden_size=width,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                image_size=56,
                patch_size=14,
            ),
            projection_dim=16,
        )
        CLIPModel(cfg).save_pretrained(path)
        fast.save_pretrained(path)

    build(32, root / "clip32")
    build(48, root / "clip48")
    return root


def text_clip_kwargs(root) -> dict:
    return {"clip": str(root / "clip32"), "tokenizer": str(root / "vlm_tok")}


def test_text_clip_scores_match_manual(clip_dirs, model):
    from transformers import AutoTokenizer, CLIPModel

    kw = text_clip_kwargs(clip_dirs)
    prompt = [5, 6, 7, 8]
    inp = inputs_for(model, [prompt])
    with torch.no_grad(), vtokprune.pruned(model, get_strategy("text_clip", keep=5, **kw)):
        model(**inp)
        kept = vtokprune.last_selection(model).kept[0]
    clip = CLIPModel.from_pretrained(kw["clip"]).eval()
    tok = AutoTokenizer.from_pretrained(kw["clip"])
    with torch.no_grad():
        hs = model.model.vision_tower(inp["pixel_values"], output_hidden_states=True).hidden_states
        hidden = hs[2][:, 1:]  # output of vision layer 1, the feature layer of the tiny LLaVA (vision_feature_layer=-2)
        patches = clip.visual_projection(clip.vision_model.post_layernorm(hidden))
        text = clip.get_text_features(**tok(["w5 w6 w7 w8"], return_tensors="pt")).pooler_output
        scores = text_patch_scores(text, patches)
    assert kept.tolist() == torch.sort(torch.topk(scores[0], 5).indices).values.tolist()


def test_text_clip_open_clip_backend(clip_dirs, model, tmp_path):
    """The open_clip path on a tiny open_clip ViT registered from a config (random weights, nothing downloaded)."""
    open_clip = pytest.importorskip("open_clip")
    import json

    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 112, "layers": 2, "width": 32, "patch_size": 14, "head_width": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 1},
    }
    (tmp_path / "vtokprune-tiny-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path)
    strategy = get_strategy(
        "text_clip", keep=5, clip="vtokprune-tiny-clip", tokenizer=str(clip_dirs / "vlm_tok"), backend="open_clip"
    )
    inp = inputs_for(model, [[5, 6, 7, 8]])
    with torch.no_grad(), vtokprune.pruned(model, strategy):
        model(**inp)
        kept = vtokprune.last_selection(model).kept[0]
    from vtokprune.strategies.text_clip import load_scorer

    clip = load_scorer("open_clip", "vtokprune-tiny-clip", None, str(clip_dirs / "vlm_tok")).model
    with torch.no_grad():
        hidden = model.model.vision_tower(inp["pixel_values"], output_hidden_states=True).hidden_states[2][:, 1:]
        patches = clip.visual.ln_post(hidden) @ clip.visual.proj
        text = clip.encode_text(open_clip.get_tokenizer("vtokprune-tiny-clip")(["w5 w6 w7 w8"]))
        scores = text_patch_scores(text, patches)
    assert kept.tolist() == torch.sort(torch.topk(scores[0], 5).indices).values.tolist()


def test_text_clip_errors(clip_dirs, model):
    with pytest.raises(CapabilityError, match="clip="):
        vtokprune.apply(model, "text_clip", keep=4)
    assert not vtokprune.is_pruned(model)
    inp = inputs_for(model, [[5, 6]])
    bad = get_strategy("text_clip", keep=4, clip=str(clip_dirs / "clip48"), tokenizer=str(clip_dirs / "vlm_tok"))
    with pytest.raises(CapabilityError, match="width"), torch.no_grad(), vtokprune.pruned(model, bad):
        model(**inp)
    try:
        import open_clip  # noqa: F401
    except ImportError:
        oc = get_strategy(
            "text_clip", keep=4, clip="ViT-B-32", tokenizer=str(clip_dirs / "vlm_tok"), backend="open_clip"
        )
        with pytest.raises(CapabilityError, match="open_clip_torch"), torch.no_grad(), vtokprune.pruned(model, oc):
            model(**inp)


# ---------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def model():
    return tiny_llava(image_size=112)  # 8 x 8 = 64 visual tokens, 3 vision layers (features from layer 1)


def inputs_for(model, prompts, pixels=None):
    from vtokprune.testing import llava_inputs

    inp = llava_inputs(model, prompts)
    if pixels is not None:
        inp["pixel_values"] = pixels
    return inp


def make(name, k, clip_dirs):
    kw = text_clip_kwargs(clip_dirs) if name == "text_clip" else {}
    return get_strategy(name, keep=k, **kw)


@pytest.mark.parametrize("name", VISION)
def test_end_to_end_budget_keep_all_and_batch(name, model, clip_dirs):
    k = 10
    prompts = [[5, 6, 7, 8, 9], [20, 21]]
    batch = inputs_for(model, prompts)
    with torch.no_grad():
        # exact budget
        with vtokprune.pruned(model, make(name, k, clip_dirs)):
            out = model(**batch).logits
            sel = vtokprune.last_selection(model)
        assert torch.isfinite(out).all()
        assert out.shape[1] == batch["input_ids"].shape[1] - (64 - k)
        assert [len(kk) for kk in sel.kept] == [k, k]
        assert all(len(set(kk.tolist())) == k for kk in sel.kept)
        # each image alone: same kept set
        for i, p in enumerate(prompts):
            alone = inputs_for(model, [p], batch["pixel_values"][i : i + 1])
            with vtokprune.pruned(model, make(name, k, clip_dirs)):
                model(**alone)
                assert vtokprune.last_selection(model).kept[0].tolist() == sel.kept[i].tolist()
        # keep-all: bit-identical to the unwrapped model
        ref = model(**batch).logits
        with vtokprune.pruned(model, make(name, 64, clip_dirs)):
            full = model(**batch).logits
            assert vtokprune.last_selection(model).kept[0].tolist() == list(range(64))
        assert torch.equal(full, ref)


@pytest.mark.parametrize("name", ["cls_multilayer", "visionzip", "holov", "flowcut"])
def test_cls_strategies_declare_cls(name):
    assert "cls_attn" in get_strategy(name, keep=4).needs


@pytest.mark.parametrize("name", ["visionzip", "flowcut"])
def test_generate_runs_pruned(name, model):
    inp = inputs_for(model, [[5, 6, 7]])
    with torch.no_grad(), vtokprune.pruned(model, get_strategy(name, ratio=0.25)):
        out = model.generate(**inp, max_new_tokens=3, do_sample=False)
        assert len(vtokprune.last_selection(model).kept[0]) == 16
    assert out.shape[1] == inp["input_ids"].shape[1] + 3
