"""Every user-facing error names the problem and the fix; a failed call changes nothing."""

from __future__ import annotations

import json

import pytest
import torch

import vtokprune
from vtokprune.cli import main as cli_main
from vtokprune.loading import check_model_ref, load_pretrained
from vtokprune.testing import llava_inputs, tiny_llava


@pytest.fixture(scope="module")
def model():
    return tiny_llava(seed=0)


def untouched(model) -> bool:
    return (
        not vtokprune.is_pruned(model)
        and all(not hasattr(m, "_vtokprune_config") for m in model.modules())
        and all(not m._forward_pre_hooks for m in model.modules())
        and "forward" not in model.model.__dict__
        and "get_image_features" not in model.model.__dict__
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"keep": 0}, "keep must be >= 1"),
        ({"keep": -3}, "keep must be >= 1"),
        ({"keep": 2.5}, "use ratio= for fractions"),
        ({"ratio": 0.0}, r"ratio must be in \(0, 1\]"),
        ({"ratio": 1.5}, r"ratio must be in \(0, 1\]"),
        ({"keep": 4, "ratio": 0.5}, "either keep= or ratio="),
    ],
)
def test_bad_budgets_fail_at_construction(kwargs, match):
    with pytest.raises(vtokprune.BudgetError, match=match):
        vtokprune.CLSAttention(**kwargs)
    with pytest.raises(vtokprune.BudgetError, match=match):
        vtokprune.get_strategy("fastv", **kwargs)


def test_keep_more_than_available_names_the_fix(model):
    inputs = llava_inputs(model, [[5, 6]])
    too_many = r"keep=17 is more than the 16 visual tokens.*keep<=16"
    with vtokprune.pruned(model, vtokprune.CLSAttention(keep=17)), pytest.raises(vtokprune.BudgetError, match=too_many):
        model(**inputs)
    with vtokprune.pruned(model, vtokprune.FastV(keep=99)), pytest.raises(vtokprune.BudgetError, match="keep=99"):
        model(**inputs)
    assert untouched(model)


def test_unknown_strategy_lists_the_known_ones():
    with pytest.raises(vtokprune.UnknownStrategyError, match="unknown strategy 'clss'; available: .*cls.*fastv"):
        vtokprune.get_strategy("clss", keep=4)
    with pytest.raises(TypeError, match="accepts: keep, ratio"):
        vtokprune.get_strategy("cls", keeep=4)


def test_unsupported_model_names_supported_types():
    from transformers import LlamaConfig, LlamaForCausalLM

    llm = LlamaForCausalLM(
        LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    )
    with pytest.raises(vtokprune.UnsupportedModelError, match=r"model_type='llama'.*supported model types: .*llava"):
        vtokprune.apply(llm, vtokprune.CLSAttention(keep=4))
    assert not vtokprune.is_pruned(llm)


def test_failed_apply_leaves_model_untouched(model):
    with pytest.raises(vtokprune.CapabilityError, match=r"decoder layer 9.*\[1, 3\]"):
        vtokprune.apply(model, vtokprune.FastV(keep=4, layer=9))
    assert untouched(model)
    vtokprune.apply(model, "cls", keep=4)
    with pytest.raises(vtokprune.PruningStateError, match="already pruned.*vtokprune.remove"):
        vtokprune.apply(model, "fastv", keep=4)
    vtokprune.remove(model)
    assert untouched(model)


def test_attention_implementation_that_cannot_serve_in_llm_strategies():
    m = tiny_llava(seed=0)
    m.config.text_config._attn_implementation_internal = "flash_attention_2"
    with pytest.raises(vtokprune.CapabilityError, match="attn_implementation='sdpa'"):
        vtokprune.apply(m, vtokprune.FastV(keep=4))
    assert untouched(m)


def test_fastv_layer_must_be_positive():
    with pytest.raises(vtokprune.BudgetError, match="layer must be an int >= 1"):
        vtokprune.FastV(keep=4, layer=0)


def test_last_selection_on_unpruned_model(model):
    with pytest.raises(vtokprune.PruningStateError, match="vtokprune.apply"):
        vtokprune.last_selection(model)


def test_mismatched_placeholders_raise(model):
    inputs = llava_inputs(model, [[5, 6]])
    inputs["input_ids"][0, 1] = 7  # one placeholder fewer than the image's features
    with vtokprune.pruned(model, vtokprune.CLSAttention(keep=4)), pytest.raises(ValueError, match="placeholder"):
        model(**inputs)


def test_model_refs_are_validated(tmp_path):
    assert check_model_ref("llava-hf/llava-1.5-7b-hf") == "llava-hf/llava-1.5-7b-hf"
    assert check_model_ref(str(tmp_path)) == str(tmp_path)
    for bad in ["../../no-such-dir", "a/b/c", "no-owner", "http://x/y", "owner/..name"]:
        with pytest.raises(vtokprune.VTokPruneError, match="neither an existing directory nor a hub id"):
            check_model_ref(bad)
    (tmp_path / "f.bin").write_bytes(b"x")
    with pytest.raises(vtokprune.VTokPruneError, match="is a file"):
        check_model_ref(str(tmp_path / "f.bin"))


def test_pickle_weights_are_refused(tmp_path):
    m = tiny_llava(seed=0)
    m.config.save_pretrained(tmp_path)
    torch.save(m.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(vtokprune.VTokPruneError, match="pickle"):
        load_pretrained(str(tmp_path))


def test_safetensors_checkpoint_round_trip(tmp_path):
    m = tiny_llava(seed=0)
    m.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "llava"


def test_cli_errors_are_one_line_and_nonzero(capsys):
    assert cli_main(["run", "--model", "/does/not/exist"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vtokprune: error:") and "\n" not in err
    assert cli_main(["run", "--strategies", "nope"]) == 2
    assert "unknown strategy 'nope'" in capsys.readouterr().err


def test_cli_info(capsys):
    assert cli_main(["info"]) == 0
    out = capsys.readouterr().out
    assert "strategies:" in out and "fastv" in out and "llava" in out


def test_fallback_only_when_asked_and_named():
    from vtokprune.testing import qwen_inputs, tiny_qwen2_vl

    qwen = tiny_qwen2_vl(seed=0, version="2")
    with pytest.raises(vtokprune.CapabilityError, match=r"no \[CLS\]"):
        vtokprune.apply(qwen, vtokprune.CLSAttention(keep=4))
    assert not vtokprune.is_pruned(qwen)
    with pytest.warns(UserWarning, match=r"falling back to DivPrune\(keep=4"):
        vtokprune.apply(qwen, vtokprune.CLSAttention(keep=4), fallback="divprune")
    assert vtokprune.strategy_of(qwen).name == "divprune"
    with torch.no_grad():
        qwen(**qwen_inputs(qwen, [[5, 6]], [[(1, 8, 8)]]))
    assert [len(k) for k in vtokprune.last_selection(qwen).kept] == [4]
    vtokprune.remove(qwen)
    with pytest.raises(vtokprune.CapabilityError):  # a fallback that cannot serve either is refused too
        vtokprune.apply(qwen, "cls", keep=4, fallback="visionzip")
    assert not vtokprune.is_pruned(qwen)
