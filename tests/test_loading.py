"""Real-model loading goes through the same code as `llava-hf/...` ids: AutoModelForImageTextToText, safetensors."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

import vtokprune
from vtokprune.loading import load_pretrained
from vtokprune.testing import (
    internvl_inputs,
    llava_inputs,
    llava_next_inputs,
    qwen_inputs,
    tiny_internvl,
    tiny_llava,
    tiny_llava_next,
    tiny_qwen2_vl,
)

FAMILIES = {
    "llava": (lambda: tiny_llava(seed=0), lambda m: llava_inputs(m, [[5, 6, 7]])),
    "llava_next": (lambda: tiny_llava_next(seed=0), lambda m: llava_next_inputs(m, [[5, 6, 7]], [[(28, 56)]])),
    "qwen2_vl": (lambda: tiny_qwen2_vl(seed=0, version="2"), lambda m: qwen_inputs(m, [[5, 6, 7]], [[(1, 8, 8)]])),
    "qwen2_5_vl": (
        lambda: tiny_qwen2_vl(seed=0, version="2.5"),
        lambda m: qwen_inputs(m, [[5, 6, 7]], [[(1, 8, 8)]]),
    ),
    "internvl": (lambda: tiny_internvl(seed=0), lambda m: internvl_inputs(m, [[5, 6, 7]], [[2]])),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_saved_checkpoint_loads_and_prunes(tmp_path, family):
    build, make_inputs = FAMILIES[family]
    original = build()
    original.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    model, processor, description = load_pretrained(str(tmp_path), dtype=torch.float32, processor=False)
    assert processor is None and family in description
    assert model.config.model_type == family
    inputs = make_inputs(model)
    with torch.no_grad():
        reference = original(**inputs).logits
        assert torch.equal(model(**inputs).logits, reference)
        with vtokprune.pruned(model, "random", ratio=0.5):
            out = model(**inputs).logits
            assert vtokprune.last_selection(model) is not None
    assert out.shape[1] < reference.shape[1]


def test_save_pretrained_of_a_pruned_model_keeps_its_pruning_config(tmp_path):
    model = tiny_llava(seed=0).eval()
    inputs = llava_inputs(model, [[5, 6, 7]])
    strategy = vtokprune.PyramidDrop(fractions={1: 0.5, 2: 0.25}, reference_layers=None)
    vtokprune.apply(model, strategy)
    with torch.no_grad():
        pruned_logits = model(**inputs).logits
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["vtokprune"]
    assert saved["strategy"] == "pdrop" and saved["vtokprune_version"] == vtokprune.__version__
    assert "lam" in saved["fields"] and saved["fields"]["fractions"] == [[1, 0.5], [2, 0.25]]

    restored = vtokprune.load(str(tmp_path), dtype=torch.float32)
    assert vtokprune.strategy_of(restored) == strategy
    with torch.no_grad():
        assert torch.equal(restored(**inputs).logits, pruned_logits)
    vtokprune.remove(model)
    assert not hasattr(model.config, "vtokprune")
    model.save_pretrained(tmp_path / "plain")
    assert "vtokprune" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    assert not vtokprune.is_pruned(vtokprune.load(str(tmp_path / "plain")))
    # a plain transformers load keeps the record: apply can restore it
    from transformers import AutoModelForImageTextToText

    plain = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert vtokprune.saved_strategy(plain) == strategy


def test_pruned_repr_is_one_header_line_then_the_model():
    model = tiny_llava(seed=0)
    header = repr(vtokprune.apply(model, "cls", keep=4)).splitlines()[0]
    assert header.startswith("[vtokprune: pruned with CLSAttention(keep=4") and "vtokprune.remove(model)" in header
    assert repr(model).splitlines()[1] == "LlavaForConditionalGeneration("
    assert repr(vtokprune.remove(model)).startswith("LlavaForConditionalGeneration(")


def test_pickle_and_torch_save_of_a_pruned_model_name_the_fix(tmp_path):
    model = vtokprune.apply(tiny_llava(seed=0), "cls", keep=4)
    with pytest.raises(vtokprune.PruningStateError, match=r"vtokprune.remove\(model\) first"):
        pickle.dumps(model)
    with pytest.raises(vtokprune.PruningStateError, match=r"vtokprune.remove\(model\) first"):
        torch.save(model, tmp_path / "model.pt")
    pickle.dumps(vtokprune.remove(model))


def test_truncated_safetensors_fails_naming_the_file(tmp_path):
    tiny_llava(seed=0).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(vtokprune.VTokPruneError, match=r"model\.safetensors: truncated safetensors file"):
        load_pretrained(str(tmp_path), processor=False)
    weights.write_bytes(b"\x10\x00")
    with pytest.raises(vtokprune.VTokPruneError, match=r"model\.safetensors: not a readable safetensors file"):
        load_pretrained(str(tmp_path), processor=False)


def test_pickle_only_checkpoint_is_refused_on_purpose(tmp_path):
    model = tiny_llava(seed=0)
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(vtokprune.VTokPruneError, match="pytorch_model.bin.*refused on purpose"):
        load_pretrained(str(tmp_path), processor=False)
