"""`vtokprune run`: argument errors before the model loads (same rules as the API), --set parameters, and a table a
user can trust (right/wrong marks, warmed-up medians, kept counts, no library noise)."""

from __future__ import annotations

import pytest

import vtokprune
from vtokprune import cli


@pytest.fixture
def no_model(monkeypatch):
    """Any test that reaches model loading fails: the argument errors must come first."""

    def refuse(name):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(cli, "load_model", refuse)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--strategies", ",,"], "names no strategy"),
        (["--strategies", "clss"], "did you mean 'cls'"),
        (["--strategies", "visonzip"], "did you mean 'visionzip'"),
        (["--keep", "4", "--ratio", "0.5"], "not both"),
        (["--ratio", "1.5"], "ratio must be in"),
        (["--ratio", "0"], "ratio must be in"),
        (["--keep", "0"], "keep must be >= 1"),
        (["--set", "lyer=3"], "has a parameter 'lyer'"),
        (["--set", "cls.layer=3"], "strategy 'cls' has no parameter 'layer'"),
        (["--set", "divprune.metric=cosine"], "'divprune' is not one of the strategies"),
        (["--set", "layer"], "expected key=value"),
        (["--set", "keep=3"], "--keep"),
        (["--strategies", "fastv", "--set", "layer=0"], "layer must be an int >= 1"),
        (["--repeat", "0"], "--repeat"),
    ],
)
def test_run_argument_errors_before_loading(no_model, capsys, argv, message):
    assert cli.main(["run", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vtokprune: error:") and message in err


def test_set_reaches_the_strategies():
    built = cli.build_strategies(
        ["fastv", "pdrop", "random", "none"],
        {"keep": 8},
        cli.parse_sets(["layer=1", "pdrop.layers=(1, 2)", "seed=7"]),
    )
    assert built["fastv"] == vtokprune.FastV(keep=8, layer=1)
    assert built["pdrop"].layers == (1, 2) and built["pdrop"].keep == 8
    assert built["random"].seed == 7
    assert built["none"] == vtokprune.NoPrune()
    assert cli.parse_sets(["name=abc", "x=1.5", "flag=True"]) == {"name": "abc", "x": 1.5, "flag": True}


def test_every_strategy_class_is_importable_from_the_package():
    for name, cls in vtokprune.available_strategies().items():
        assert getattr(vtokprune, cls.__name__) is cls, name
        assert cls.__name__ in vtokprune.__all__
    for name in ("VisionZip", "PyramidDrop", "DivPrune"):
        assert repr(getattr(vtokprune, name)(keep=4)).startswith(name)


def test_run_table_marks_answers_and_stays_quiet(capsys):
    code = cli.main(["run", "--strategies", "cls,fastv", "--keep", "64", "--set", "fastv.layer=1", "--repeat", "1"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    out = captured.out
    assert "scene's answer:" in out and "mark" in out
    rows = [line for line in out.splitlines() if line.startswith(("none (unpruned)", "cls ", "fastv "))]
    assert len(rows) == 3 and all((" right " in r) != (" wrong " in r) for r in rows)
    assert "256/256" in rows[0] and all(" 64/256 " in r for r in rows[1:])  # kept counts per row
    assert rows[1].split()[2] == "64"  # cls: 64 visual tokens at every decoder layer
    assert "median of 1 calls after one warm-up" in out and "per layer" in out
    assert "[transformers]" not in captured.out + captured.err and "Warning" not in captured.err


def test_strategies_without_a_budget_use_the_paper_default_or_fail_before_loading():
    assert cli.build_strategies(["fastv"], {}, {})["fastv"].ratio == vtokprune.FastV.default_budget["ratio"]
    with pytest.raises(vtokprune.BudgetError, match="needs a budget"):
        cli.build_strategies(["cls"], {}, {})
