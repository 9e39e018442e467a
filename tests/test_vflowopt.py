"""VFlowOpt: importance (attention + entropy), progressive pruning with recycling, parameters fitted by search."""

from __future__ import annotations

import json

import pytest
import torch

import vtokprune
from vtokprune.errors import BudgetError
from vtokprune.search import Calibration
from vtokprune.strategies.vflowopt import VFlowOpt, feature_entropy, share_of_visual
from vtokprune.testing import llava_inputs, tiny_llava


def test_importance_mixes_attention_and_entropy_shares():
    image = torch.tensor([[True, True, True, False]])
    attention = torch.tensor([[0.6, 0.3, 0.1, 5.0]])
    assert torch.allclose(share_of_visual(attention, image), torch.tensor([[0.6, 0.3, 0.1, 0.0]]))
    flat, peaked = torch.ones(1, 1, 4), torch.tensor([[[1.0, 0.0, 0.0, 0.0]]])
    assert feature_entropy(flat).item() == pytest.approx(torch.log(torch.tensor(4.0)).item())
    assert feature_entropy(peaked).item() == pytest.approx(0.0)
    hidden = torch.stack([flat[0, 0], peaked[0, 0], peaked[0, 0], flat[0, 0]])[None]  # [1, 4, 4]

    class Ctx:
        image_mask = image

    only_attention = VFlowOpt(keep=1, entropy_weight=0.0).stage_scores(attention, hidden, Ctx(), None, None)
    assert int(only_attention[0, :3].argmax()) == 0
    only_entropy = VFlowOpt(keep=1, entropy_weight=1.0).stage_scores(attention, hidden, Ctx(), None, None)
    assert only_entropy[0, 0] > 0 and only_entropy[0, 1] == 0 and only_entropy[0, 3] == 0


def test_bad_parameters_raise():
    with pytest.raises(BudgetError, match="entropy_weight"):
        VFlowOpt(keep=4, entropy_weight=1.5)
    with pytest.raises(BudgetError, match="recycle_top"):
        VFlowOpt(keep=4, recycle_top=0.0)
    with pytest.raises(BudgetError, match="needs a budget"):
        VFlowOpt().with_default_budget()


def test_runs_on_a_tiny_llava_with_exact_stage_budgets():
    model = tiny_llava(text_layers=4, image_size=112).eval()
    inputs = llava_inputs(model, [[5, 6, 7], [8, 9]])
    strategy = VFlowOpt(keep=8)
    assert strategy.schedule(4, 64) == {1: 32, 2: 16, 3: 8}
    with vtokprune.pruned(model, strategy), torch.inference_mode():
        model(**inputs)
        sel = vtokprune.last_selection(model)
    assert sel is not None and all(len(k) == 8 for k in sel.stages[3])


def test_tune_fits_parameters_without_labels(tmp_path):
    pytest.importorskip("optuna")
    from vtokprune.search.tune import tune

    model = tiny_llava(text_layers=4, image_size=112).eval()
    calibration = Calibration([llava_inputs(model, [[5, 6, 7], [8, 9, 10]], seed=1)], None, "synthetic")
    out = tmp_path / "v.json"
    a = tune(model, calibration, trials=3, seed=2, progress=False, keep=8, out=out, state=tmp_path / "st.json")
    b = tune(model, calibration, trials=3, seed=2, progress=False, keep=8, state=tmp_path / "st.json")
    assert a.params == b.params and b.computed == 0
    record = json.loads(out.read_text())
    assert record["strategy"] == "vflowopt" and record["fixed"] == {"keep": 8}
    assert set(record["params"]) == {"entropy_weight", "recycle_top"}
    with pytest.raises(BudgetError, match="what tune"):
        tune(model, calibration, trials=1, progress=False, keep=8, entropy_weight=0.5)
