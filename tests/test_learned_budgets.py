"""DyVTE and ATP: learned per-input budgets (heads trained on a tiny model in seconds), save/load, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import vtokprune
from vtokprune.errors import BudgetError, CapabilityError
from vtokprune.search import Calibration, predict
from vtokprune.search.learned import load_head
from vtokprune.search.train_heads import train_head
from vtokprune.testing import llava_inputs, tiny_llava


@pytest.fixture(scope="module")
def model():
    return tiny_llava(text_layers=4, image_size=112).eval()


@pytest.fixture(scope="module")
def calibration(model):
    return Calibration([llava_inputs(model, [[5, 6, 7 + i], [8, 9, 10 + i]], seed=i) for i in range(2)], None, "x")


@pytest.fixture(scope="module")
def heads(model, calibration, tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    out = {}
    for kind in ("dyvte", "atp"):
        train_head(model, calibration, kind, root / kind, epochs=40, levels=4, log=lambda _: None)
        out[kind] = str(root / kind)
    return out


def test_heads_save_and_load_with_safetensors(heads, model):
    for kind, path in heads.items():
        head, config = load_head(path, kind)
        assert config["kind"] == kind and config["num_layers"] == 4
        assert config["hidden_size"] == model.config.text_config.hidden_size
        assert json.loads(Path(path, "head.json").read_text())["layers"] == config["layers"]
    with pytest.raises(BudgetError, match="not a 'atp' one"):
        load_head(heads["dyvte"], "atp")


def test_training_is_deterministic(model, calibration, heads, tmp_path):
    from safetensors.torch import load_file

    train_head(model, calibration, "dyvte", tmp_path / "again", epochs=40, log=lambda _: None)
    a, b = load_file(f"{heads['dyvte']}/head.safetensors"), load_file(str(tmp_path / "again/head.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dyvte_exits_per_input_and_generates(model, calibration, heads):
    inputs = calibration.batches[0]
    strategy = vtokprune.get_strategy("dyvte", head=heads["dyvte"])
    with vtokprune.pruned(model, strategy), torch.inference_mode():
        model(**inputs)
        stages = vtokprune.last_selection(model).stages
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    for kept in stages.values():  # each input keeps all of its tokens or none of them
        assert all(len(k) in (0, 64) for k in kept)
    never = vtokprune.get_strategy("dyvte", head=heads["dyvte"], threshold=0.999999, min_layer=3)
    fixed_exit = vtokprune.get_strategy("dyvte", exit_layer=2, keep=4)
    assert fixed_exit.schedule(4, 64) == {2: 4}
    with vtokprune.pruned(model, fixed_exit), torch.inference_mode():
        model(**inputs)
        assert [len(k) for k in vtokprune.last_selection(model).stages[2]] == [4, 4]
    assert isinstance(predict(model, calibration, never), list)


def test_atp_sets_instance_ratios_within_bounds(model, calibration, heads):
    inputs = calibration.batches[0]
    strategy = vtokprune.get_strategy("atp", head=heads["atp"], min_ratio=0.1)
    with vtokprune.pruned(model, strategy), torch.inference_mode():
        model(**inputs)
        stages = vtokprune.last_selection(model).stages
    previous = [64, 64]
    for layer in sorted(stages):
        counts = [len(k) for k in stages[layer]]
        assert all(1 <= c <= p for c, p in zip(counts, previous))
        previous = counts
    floor = vtokprune.get_strategy("atp", head=heads["atp"], keep=40)
    with vtokprune.pruned(model, floor), torch.inference_mode():
        model(**inputs)
        assert all(len(k) >= 40 for kept in vtokprune.last_selection(model).stages.values() for k in kept)


def test_missing_or_wrong_heads_fail_loud(model, tmp_path):
    with pytest.raises(CapabilityError, match="train-budget --kind dyvte"):
        vtokprune.apply(model, "dyvte")
    with pytest.raises(CapabilityError, match="train-budget --kind atp"):
        vtokprune.apply(model, "atp", keep=4)
    with pytest.raises(BudgetError, match="holds no budget head"):
        vtokprune.apply(model, "atp", head=str(tmp_path))
    with pytest.raises(BudgetError, match="not both"):
        vtokprune.get_strategy("dyvte", head="x", exit_layer=2)
    with pytest.raises(BudgetError, match="unknown head kind"):
        train_head(model, None, "nope", tmp_path)  # type: ignore[arg-type]


def test_head_trained_for_another_model_is_refused(heads, calibration):
    other = tiny_llava(text_layers=3, image_size=112).eval()
    inputs = llava_inputs(other, [[5, 6, 7]])
    strategy = vtokprune.get_strategy("dyvte", head=heads["dyvte"])
    with pytest.raises(BudgetError, match="train a head for this model"), vtokprune.pruned(other, strategy):
        other(**inputs)


def test_heads_shipped_beside_the_embedded_model_load_and_run():
    from vtokprune.embedded import example_inputs, load_default

    embedded, processor, _ = load_default()
    inputs, _, _ = example_inputs(embedded, processor, None, None)
    for kind in ("dyvte", "atp"):
        head, config = load_head("embedded", kind)
        assert config["kind"] == kind and config["num_layers"] == 3
        assert config["hidden_size"] == embedded.config.text_config.hidden_size
        with vtokprune.pruned(embedded, vtokprune.get_strategy(kind, head="embedded")):
            assert torch.isfinite(embedded(**inputs).logits).all()
            assert vtokprune.last_selection(embedded).stages  # per-input budgets were recorded
    tiny = tiny_llava(text_layers=4, image_size=112).eval()
    strategy = vtokprune.get_strategy("dyvte", head="embedded")
    with pytest.raises(BudgetError, match="train a head for this model"), vtokprune.pruned(tiny, strategy):
        tiny(**llava_inputs(tiny, [[5, 6, 7]]))
