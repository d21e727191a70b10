"""The built-in models' commands (`zoo train-<model>`, `zoo eval-<model>`) come from one recipe table, so mini and
mini-dit take the same flags and follow the same rules: an existing `--json` report is refused before any
evaluation runs (and kept as it was), replaced only with `--overwrite`, and written atomically; fewer than two
held-out scenes are refused."""

from __future__ import annotations

import json

import pytest

from difffeat.cli import build_parser, main
from difffeat.zoo.commands import RECIPES

EVALUATORS = {"mini": ("difffeat.zoo.quality", "evaluate_quality"),
              "mini-dit": ("difffeat.zoo.dit_quality", "evaluate_dit_quality")}


def zoo_parsers() -> dict:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    zoo = next(a for a in sub.choices["zoo"]._actions if a.dest == "zoo_command")
    return zoo.choices


def flags(parser, skip=()) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings if s not in skip}


def test_every_recipe_has_both_commands_and_the_eval_commands_take_the_same_flags():
    parsers = zoo_parsers()
    assert {r.name for r in RECIPES} == set(EVALUATORS)
    for r in RECIPES:
        assert f"train-{r.name}" in parsers and f"eval-{r.name}" in parsers
        assert {"run", "out"} <= {a.dest for a in parsers[f"train-{r.name}"]._actions}
    shapes = {r.name: flags(parsers[f"eval-{r.name}"]) for r in RECIPES}
    assert shapes["mini"] == shapes["mini-dit"] >= {"--model", "--n", "--seed", "--json", "--overwrite"}
    assert parsers["eval-mini"].get_default("model") == "mini"
    assert parsers["eval-mini-dit"].get_default("model") == "mini-dit"


@pytest.fixture
def fake_evaluators(monkeypatch):
    import importlib

    calls = []
    for name, (module, function) in EVALUATORS.items():
        def fake(model, n, seed, progress, _name=name):
            calls.append(_name)
            return {"model": model, "n_heldout": n, "seed": seed}

        monkeypatch.setattr(importlib.import_module(module), function, fake)
    return calls


@pytest.mark.parametrize("name", sorted(EVALUATORS))
def test_an_existing_report_is_refused_before_the_evaluation_and_kept(name, fake_evaluators, tmp_path, capsys):
    report = tmp_path / "quality.json"
    report.write_text('{"quoted": "by the docs"}\n')
    assert main(["--quiet", "zoo", f"eval-{name}", "--n", "2", "--json", str(report)]) == 2
    err = capsys.readouterr().err
    assert str(report) in err and "exists" in err and "--overwrite" in err
    assert report.read_text() == '{"quoted": "by the docs"}\n'  # nothing already written is lost
    assert fake_evaluators == []  # refused before minutes of evaluation
    assert main(["--quiet", "zoo", f"eval-{name}", "--n", "2", "--json", str(report), "--overwrite"]) == 0
    assert json.loads(report.read_text()) == {"model": name, "n_heldout": 2, "seed": 0}
    assert fake_evaluators == [name]
    assert [p.name for p in tmp_path.iterdir()] == ["quality.json"]  # no temporary file left beside it


@pytest.mark.parametrize("name", sorted(EVALUATORS))
def test_a_folder_in_place_of_the_report_and_one_scene_are_refused(name, fake_evaluators, tmp_path, capsys):
    (tmp_path / "folder.json").mkdir()
    assert main(["--quiet", "zoo", f"eval-{name}", "--n", "2", "--json", str(tmp_path / "folder.json"),
                 "--overwrite"]) == 2
    assert "not a plain file" in capsys.readouterr().err
    assert main(["--quiet", "zoo", f"eval-{name}", "--n", "1"]) == 2
    assert "at least 2 held-out scenes" in capsys.readouterr().err
    assert fake_evaluators == []
