"""text_clip on a tiny CLIP saved offline, then every vision strategy end to end on the tiny LLaVA: exact budgets, a
batch equal to each image alone, keep-all bit-identical to the unwrapped model, generate()."""

from __future__ import annotations

import math

import pytest
import torch

import vtokprune
from vtokprune import get_strategy
from vtokprune.errors import CapabilityError
from vtokprune.strategies.text_clip import text_patch_scores
from vtokprune.testing import tiny_llava

VISION = ["cls_multilayer", "visionzip", "holov", "flowcut", "divprune", "text_clip"]


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
