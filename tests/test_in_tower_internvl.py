"""In-tower pruning on InternVL (adapters/in_tower_internvl.py), on the tiny InternVL: 2x2 pixel-shuffle groups kept
whole, per-image budgets split over the tiles, the tile counts reaching the tower call, errors."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

import vtokprune
from vtokprune import get_strategy
from vtokprune.adapters import in_tower_internvl
from vtokprune.adapters.internvl import InternVLAdapter
from vtokprune.errors import CapabilityError, PruningStateError
from vtokprune.testing import internvl_inputs, tiny_internvl

from .helpers import generate_new, single, stepwise_greedy

IN_TOWER = ["cls", "cls_multilayer", "visionzip", "holov", "flowcut"]
PROMPTS = [[7, 8, 9, 10], [11, 12]]
TILES = [[3], [1, 2]]  # sample 0: one 3-tile image; sample 1: a single-tile image and a 2-tile one
PER_PROMPT = [3, 3]  # tiles per sample (helpers.single slices pixel_values by these)
T = 16  # shuffled tokens per tile: 8x8 patches -> 4x4 tokens


@pytest.fixture(scope="module")
def model():
    m = tiny_internvl(seed=3, vision_layers=4)  # features from the last layer (3); in_tower_layer in [0, 2]
    gen = torch.Generator().manual_seed(11)
    emb = m.model.vision_tower.embeddings
    with torch.no_grad():  # the tiny model's init zeroes them: give positions (and [CLS]) a role in the tower
        emb.cls_token.copy_(torch.randn(emb.cls_token.shape, generator=gen))
        emb.position_embeddings.copy_(torch.randn(emb.position_embeddings.shape, generator=gen))
        for layer in m.model.vision_tower.encoder.layer:  # layer scale 1, not 0.1: later layers weigh in
            layer.lambda_1.fill_(1.0)
            layer.lambda_2.fill_(1.0)
    return m


@pytest.fixture(scope="module")
def inputs(model):
    return internvl_inputs(model, PROMPTS, TILES, seed=5)


def _run(model, inputs, strategy, spy=False):
    seen = {}
    original = InternVLAdapter.call_pruned

    def record(self, forward, args, features):
        seen["features"] = features
        return original(self, forward, args, features)

    vtokprune.apply(model, strategy)
    if spy:
        InternVLAdapter.call_pruned = record
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
        return logits, vtokprune.last_selection(model), seen.get("features")
    finally:
        InternVLAdapter.call_pruned = original
        vtokprune.remove(model)


def _groups(model):
    return vtokprune.get_adapter(model)._groups(8, torch.device("cpu"))  # [16, 4]


@pytest.mark.parametrize("name", IN_TOWER)
@pytest.mark.parametrize("fuse", [False, True])
def test_keep_all_in_tower_is_bit_identical(model, inputs, name, fuse):
    three = internvl_inputs(model, PROMPTS, [[3], [3]], seed=6)  # keep= every token: images of one size
    for batch, budget in ((inputs, {"ratio": 1.0}), (three, {"keep": 3 * T})):
        with torch.no_grad():
            ref = model(**batch).logits
        strategy = get_strategy(name, in_tower_layer=1, in_tower_fuse=fuse, **budget)
        logits, sel, _ = _run(model, batch, strategy)
        assert torch.equal(logits, ref)
        assert [k.tolist() for k in sel.kept] == [list(range(n)) for n in sel.available]
    assert sel.available == [3 * T, 3 * T]


@pytest.mark.parametrize("name", IN_TOWER)
@pytest.mark.parametrize("fuse", [False, True])
def test_exact_budgets_split_over_tiles_and_groups_stay_whole(model, inputs, name, fuse, monkeypatch):
    """keep=7: the 3-tile image keeps 3+2+2, the 2-tile one 4+3, the single tile 7; every token that goes on through
    layers 2.. carries exactly its 4 patches, padding rows (masked) fill the shorter tiles."""
    padded = {}
    original = in_tower_internvl._padded

    def spy(tiles, patches):
        out = original(tiles, patches)
        padded["carry"], padded["live"] = out[0].cpu(), out[2].cpu()
        return out

    monkeypatch.setattr(in_tower_internvl, "_padded", spy)
    widths = []
    layers = model.model.vision_tower.encoder.layer
    handle = layers[3].register_forward_pre_hook(lambda mod, args: widths.append(args[0].shape[1]))
    try:
        _, sel, _ = _run(model, inputs, get_strategy(name, keep=7, in_tower_layer=1, in_tower_fuse=fuse))
    finally:
        handle.remove()
    assert [int(k.numel()) for k in sel.kept] == [7, 7, 7]
    for kept, available in zip(sel.kept, sel.available):
        assert bool((kept[1:] > kept[:-1]).all()) and int(kept.min()) >= 0 and int(kept.max()) < available
    groups = _groups(model)
    tiles = [(0, 0), (0, 1), (0, 2), (1, 0), (2, 0), (2, 1)]  # (image, tile) of each tower input
    shares = {0: [3, 2, 2], 1: [7], 2: [4, 3]}
    for p, (image, tile) in enumerate(tiles):
        kept = sel.kept[image].cpu()
        tokens = kept[(kept >= tile * T) & (kept < (tile + 1) * T)] - tile * T
        assert tokens.numel() == shares[image][tile]
        went_on = padded["carry"][p][padded["live"][p]]
        assert torch.equal(went_on, torch.sort(groups[tokens].reshape(-1)).values)
    assert widths == [1 + 4 * 7 + fuse]  # [CLS] + the widest tile's patches (+ the fused row)


@torch.no_grad()
def test_cls_in_tower_matches_a_manual_tower_run(model):
    """cls at in_tower_layer=1 on one single-tile image: layer 1's [CLS] attention by hand, summed per 2x2 group,
    top-k; layers 2-3 by hand on [CLS] + those tokens' patches; pixel shuffle + projector on the scattered grid."""
    one = internvl_inputs(model, [[7, 8]], [[1]], seed=9)
    k = 5
    _, sel, features = _run(model, one, get_strategy("cls", keep=k, in_tower_layer=1), spy=True)
    inner = model.model
    tower = inner.vision_tower
    layers = tower.encoder.layer
    hs = tower(one["pixel_values"], output_hidden_states=True).hidden_states  # hs[i]: input of layer i
    block = layers[1]
    attn = block.attention
    x = block.layernorm_before(hs[1])
    heads, d = attn.num_heads, attn.head_dim
    q = attn.q_norm(attn.q_proj(x[:, :1])).view(1, 1, heads, d).transpose(1, 2)
    key = attn.k_norm(attn.k_proj(x)).view(1, -1, heads, d).transpose(1, 2)
    probs = torch.softmax(q @ key.transpose(-1, -2) / math.sqrt(d), dim=-1)[0, :, 0, 1:]  # [H, 64]
    groups = _groups(model)
    scores = probs[:, groups].sum(-1).mean(0)  # [16]
    tokens = torch.sort(torch.topk(scores, k).indices).values
    assert torch.equal(sel.kept[0].cpu(), tokens)
    patches = torch.sort(groups[tokens].reshape(-1)).values
    h = torch.cat([hs[2][:, :1], hs[2][:, 1 + patches]], dim=1)
    for blk in layers[2:]:
        h = blk(h)
    h = tower.layernorm(h)
    full = torch.zeros(1, 64, h.shape[-1])
    full[0, patches] = h[0, 1:]
    shuffled = inner.pixel_shuffle(full.reshape(1, 8, 8, -1), scale_factor=model.config.downsample_ratio)
    expect = inner.multi_modal_projector(shuffled.reshape(1, T, -1))[0, tokens]
    torch.testing.assert_close(features[0], expect, atol=1e-5, rtol=1e-5)
    # the dropped patches are missing from layers 2-3: the kept tokens' features differ from the unpruned ones
    unpruned = inner.get_image_features(pixel_values=one["pixel_values"]).pooler_output[0, tokens]
    assert not torch.allclose(features[0], unpruned, atol=1e-4)


@pytest.mark.parametrize("name", ["cls", "visionzip", "flowcut"])
@pytest.mark.parametrize("fuse", [False, True])
def test_batch_equals_single(model, inputs, name, fuse):
    strategy = get_strategy(name, keep=12, in_tower_layer=1, in_tower_fuse=fuse)  # visionzip: 2 contextual
    logits, sel, _ = _run(model, inputs, strategy)
    kept_alone = []
    for i in range(len(PROMPTS)):
        logits_one, sel_one, _ = _run(model, single(inputs, i, PER_PROMPT), strategy)
        kept_alone += [k.tolist() for k in sel_one.kept]
        torch.testing.assert_close(logits[i, -1], logits_one[0, -1], atol=1e-4, rtol=1e-4)
    assert [k.tolist() for k in sel.kept] == kept_alone


def test_generation_matches_stepwise_and_remove_restores(model, inputs):
    with torch.no_grad():
        ref = model(**inputs).logits
    vtokprune.apply(model, get_strategy("cls", keep=6, in_tower_layer=0))
    try:
        assert "generate" in vars(model)
        assert torch.equal(generate_new(model, inputs, 4), stepwise_greedy(model, inputs, 4))
    finally:
        vtokprune.remove(model)
    assert "generate" not in vars(model) and not vtokprune.is_pruned(model)
    inner = model.model
    assert not {"forward", "get_image_features"} & set(vars(inner))
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)


def test_generate_that_encodes_images_first_gets_the_tiles(model, inputs, monkeypatch):
    """generate() encodes images before the first forward when it can read get_image_features' parameters; the
    tile counts then come from the generate wrapper."""
    callers = []
    original = in_tower_internvl.encode_internvl

    def spy(*args, **kwargs):
        callers.append({f.function for f in inspect.stack()})
        return original(*args, **kwargs)

    monkeypatch.setattr(in_tower_internvl, "encode_internvl", spy)
    strategy = get_strategy("cls", keep=6, in_tower_layer=1)
    vtokprune.apply(model, strategy)
    try:
        expect = stepwise_greedy(model, inputs, 3)
        hook = vars(model.model)["get_image_features"]
        hook.__signature__ = inspect.signature(type(model.model).get_image_features.__get__(model.model))
        callers.clear()
        got = generate_new(model, inputs, 3)
    finally:
        vtokprune.remove(model)
    assert len(callers) == 1 and "_prepare_multimodal_encoder_kwargs_for_generation" in callers[0]
    assert torch.equal(got, expect)


def test_remove_restores_an_instance_generate(model, inputs):
    mine = model.generate
    model.generate = mine  # an instance attribute of the user's, before apply
    try:
        vtokprune.apply(model, get_strategy("cls", keep=6, in_tower_layer=0))
        assert vars(model)["generate"] is not mine
        vtokprune.remove(model)
        assert vars(model)["generate"] is mine
    finally:
        vars(model).pop("generate", None)


def test_feature_layer_before_the_last_runs_the_rest_on_cls_alone(model, inputs):
    """vision_feature_layer=-2: features from layer 2; in_tower_layer=1 keeps layer 2 on the kept tokens and layer 3
    on [CLS] alone; keep-all stays bit-identical; layer 2 (the feature layer now) is refused."""
    before = model.config.vision_feature_layer
    model.config.vision_feature_layer = -2
    widths = []
    handle = model.model.vision_tower.encoder.layer[3].register_forward_hook(  # after vtokprune's pre-hooks
        lambda mod, args, out: widths.append(out.shape[1])
    )
    try:
        with torch.no_grad():
            ref = model(**inputs).logits
        logits, _, _ = _run(model, inputs, get_strategy("cls", ratio=1.0, in_tower_layer=1))
        assert torch.equal(logits, ref)
        widths.clear()
        _, sel, _ = _run(model, inputs, get_strategy("cls", keep=5, in_tower_layer=1))
        assert widths == [1] and [int(k.numel()) for k in sel.kept] == [5, 5, 5]
        with pytest.raises(CapabilityError, match="before the feature layer"):
            vtokprune.apply(model, get_strategy("cls", keep=5, in_tower_layer=2))
    finally:
        handle.remove()
        model.config.vision_feature_layer = before
    assert not vtokprune.is_pruned(model)


def test_errors(model, inputs):
    with pytest.raises(CapabilityError, match="progressive in-tower stages work on LLaVA-1.5"):
        vtokprune.apply(model, get_strategy("cls", keep=4, in_tower_layer=(0, 1)))
    for layer in (3, -1):  # the feature layer (3) or after: nothing would be pruned inside the tower
        with pytest.raises(CapabilityError, match="before the feature layer"):
            vtokprune.apply(model, get_strategy("cls", keep=4, in_tower_layer=layer))
    before = model.config.vision_feature_layer
    model.config.vision_feature_layer = [-2, -1]
    try:
        with pytest.raises(CapabilityError, match="one vision feature layer"):
            vtokprune.apply(model, get_strategy("cls", keep=4, in_tower_layer=0))
    finally:
        model.config.vision_feature_layer = before
    assert not vtokprune.is_pruned(model)
    assert "generate" not in vars(model) and "get_image_features" not in vars(model.model)
    vtokprune.apply(model, get_strategy("cls", keep=4, in_tower_layer=1))
    try:
        with pytest.raises(PruningStateError, match="call the model"):
            model.get_image_features(pixel_values=inputs["pixel_values"])
        with (
            pytest.raises(PruningStateError, match="describe 6 tiles"),
            in_tower_internvl.tiles_from(vtokprune.get_adapter(model), inputs["input_ids"], inputs["pixel_values"]),
        ):
            model.get_image_features(pixel_values=inputs["pixel_values"][:4])
    finally:
        vtokprune.remove(model)
    assert not vtokprune.is_pruned(model)
