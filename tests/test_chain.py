"""The README's "from a folder to a head" chain, command for command, on a tiny Shapes-LT world (issue #12
item 7): `gate … --emit` → `extract --variants` → `train-seg --variants amalgamate` → `eval-seg`."""

import json

import pytest

from difffeat.cli import main
from pipelines.variants import read_variants_file

pytestmark = pytest.mark.filterwarnings("ignore")


def run(argv):
    rc = main(["--quiet", *argv])
    assert rc in (0, None), argv


def test_from_a_folder_to_a_head(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run(["data", "synth", "shapes", "--n", "20", "--seed", "0"])
    (tmp_path / "candidates.yaml").write_text("canny: [controlnet:canny]\ncaption: [prompt:caption]\n")
    run(["gate", "shapes/test", "--candidates", "candidates.yaml", "--out", "runs/gate", "--n", "2", "--steps", "4",
         "--boot", "100", "--emit", "runs/gate/variants.yaml"])
    emitted = read_variants_file("runs/gate/variants.yaml")
    assert emitted and set(emitted) <= {"canny", "caption", "reference"}
    run(["extract", "shapes", "--out", "runs/feat", "--variants", "runs/gate/variants.yaml", "--variant", "plain=",
         "--layer", "dift", "--t", "50", "--prompt-from", "sidecar"])
    run(["train-seg", "--features", "runs/feat", "--masks", "shapes", "--split", "train", "--variants", "amalgamate",
         "--assigners", "2", "--iterations", "3", "--batch-size", "2", "--hidden", "8", "--out", "runs/head"])
    run(["eval-seg", "--run", "runs/head", "--features", "runs/feat", "--masks", "shapes", "--split", "test"])
    saved = json.loads((tmp_path / "runs/head/config.json").read_text())
    assert saved["variants"] == [*emitted, "plain"] and saved["config"]["head"]["variants"] == "amalgamate"
    assert (tmp_path / "runs/head/amalgamation.png").is_file()
    scores = json.loads((tmp_path / "runs/head/eval-test/metrics.json").read_text())
    assert scores["images"] == 2 and 0 <= scores["miou"] <= 1
    assert "mIoU" in capsys.readouterr().out
