"""Protocols by name: every protocol runs end to end at toy scale (`--smoke`) on the built-in world in its layout,
a run killed and resumed writes the same results, and bad input is one line."""

import json
from pathlib import Path

import pytest

from difffeat.cli import main
from downstream.protocols.protocol import load_protocol, protocol_names
from downstream.protocols.runner import TASKS, run_protocol, summarise

RUNNABLE = [n for n in protocol_names() if load_protocol(n).task in TASKS]


def test_list_shows_every_protocol_with_its_anchors(capsys):
    assert main(["protocol", "list"]) == 0
    listed = capsys.readouterr().out
    for name in ["ade20k", "cityscapes", "spair", "longtail-probe"] + [f"ddpm-seg/{s}" for s in (
            "bedroom_28", "ffhq_34", "cat_15", "horse_21", "celeba_19", "ade_bedroom_30")]:
        assert name in listed
        p = load_protocol(name)
        assert p.source and p.differences and p.version == 1
        assert all({"method", "source"} <= set(a) for a in p.anchors)
    assert load_protocol("ddpm-seg/horse_21").anchors[0]["miou"] == 67.2
    assert main(["protocol", "show", "ade20k"]) == 0
    assert json.loads(capsys.readouterr().out)["anchors"][0]["miou"] == 40.51


def test_summary_is_mean_std_and_a_t_interval():
    s = summarise([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["std"] == 1.0 and s["n"] == 3
    assert s["ci95"] == pytest.approx([2.0 - 4.303 / 3 ** 0.5, 2.0 + 4.303 / 3 ** 0.5])


@pytest.mark.slow
@pytest.mark.parametrize("name", RUNNABLE)
def test_every_protocol_runs_at_toy_scale(tmp_path, mini_pipe, name):
    results = run_protocol(load_protocol(name), tmp_path / "run", smoke=True, progress=False, pipe=mini_pipe)
    assert not results["is_protocol"] and results["departures"][0].startswith("smoke")
    seeds = len(load_protocol(name).smoke.get("seeds", load_protocol(name).seeds))
    for numbers in results["results"].values():
        assert all(v["n"] == seeds for v in numbers.values() if v["mean"] is not None)
    first = next(iter(results["results"].values()))
    metric = next(iter(first))  # miou, accuracy or pck_image
    assert 0 <= first[metric]["mean"] <= 100
    page = (tmp_path / "run" / "report.html").read_text()
    assert results["anchors"] == [] or results["anchors"][0]["method"] in page.replace("&#x27;", "'")
    assert json.loads((tmp_path / "run" / "results.json").read_text())["results"] == results["results"]


@pytest.mark.slow
def test_a_killed_protocol_run_resumes_to_the_same_results(tmp_path, mini_pipe, monkeypatch):
    import downstream.seg.evaluate

    protocol = load_protocol("ade20k")
    whole = run_protocol(protocol, tmp_path / "whole", smoke=True, progress=False, pipe=mini_pipe)
    real, calls = downstream.seg.evaluate.eval_seg, []

    def dies_on_the_second_seed(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(downstream.seg.evaluate, "eval_seg", dies_on_the_second_seed)
    with pytest.raises(KeyboardInterrupt):
        run_protocol(protocol, tmp_path / "cut", smoke=True, progress=False, pipe=mini_pipe)
    assert not (tmp_path / "cut" / "results.json").exists()
    monkeypatch.setattr(downstream.seg.evaluate, "eval_seg", real)
    resumed = run_protocol(protocol, tmp_path / "cut", smoke=True, progress=False, pipe=mini_pipe)
    assert resumed["results"] == whole["results"] and resumed["settings"] == whole["settings"]


def test_bad_input_is_one_line(tmp_path, capsys):
    from difffeat.data.synth_layouts import synthesize_layout

    voc = synthesize_layout(tmp_path / "voc", "voc", n=6, seed=0)
    cases = [
        (["protocol", "run", "ade20k", "--data", str(voc), "--out", str(tmp_path / "a")], "holds a voc tree"),
        (["protocol", "run", "ade20k", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "b")],
         "expects the ade20k layout"),
        (["protocol", "run", "ade20k", "--model", "mini", "--data", str(voc), "--out", str(tmp_path / "c")],
         "--set model=mini"),
        (["protocol", "run", "nope", "--smoke", "--out", str(tmp_path / "d")], "unknown protocol 'nope'"),
        (["protocol", "run", "ade20k", "--smoke", "--set", "nosection.x=1", "--out", str(tmp_path / "e")],
         "no setting section 'nosection'"),
        # a typo in --set was passed over (or failed hours later, after extraction): now refused before any work
        (["protocol", "run", "ade20k", "--smoke", "--set", "head.iterationz=3", "--out", str(tmp_path / "f")],
         "no setting head.iterationz (--set head.iterationz=…)"),
        (["protocol", "run", "ade20k", "--smoke", "--set", "head.iterations=abc", "--out", str(tmp_path / "g")],
         "iterations: must be a whole number, got 'abc'"),
        (["protocol", "run", "ade20k", "--smoke", "--set", "extract.timestep=[5]", "--out", str(tmp_path / "h")],
         "no setting extract.timestep"),
        (["protocol", "run", "ade20k", "--smoke", "--set", "extract.timesteps=[-5]", "--out", str(tmp_path / "i")],
         "timesteps:"),
        (["protocol", "run", "longtail-probe", "--smoke", "--set", "head.epoch=3", "--out", str(tmp_path / "j")],
         "no setting head.epoch"),
        (["protocol", "run", "longtail-probe", "--smoke", "--set", "head.methods=[\"nope\"]", "--out",
          str(tmp_path / "k")], "method: must be one of"),
        (["protocol", "run", "spair", "--smoke", "--set", "match.soft_argmx=3", "--out", str(tmp_path / "l")],
         "no setting match.soft_argmx"),
        (["protocol", "run", "spair", "--smoke", "--set", "match.alphas=[0]", "--out", str(tmp_path / "m")],
         "alphas:"),
    ]
    for argv, words in cases:
        assert main(["--quiet", *argv]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert words in err and err.count("\n") == 0 and "Traceback" not in err, err
    # refused before anything was written: no output folder, and the user's data untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["voc"]


@pytest.mark.slow
def test_the_gpu_script_runs_in_its_tiny_form(tmp_path):
    import os
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "protocols_gpu.sh"
    env = {**os.environ, "SMOKE": "1", "OUT": str(tmp_path), "PROTOCOLS": "spair", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "spair" / "results.json").read_text())["protocol"] == "spair"


def test_the_report_shows_a_protocol_run_beside_its_anchors(tmp_path):
    """`difffeat report` on a protocol's folder: one section, our numbers and the anchors in one table."""
    from difffeat.report.build import ReportConfig, write_report

    results = {"protocol": "ade20k", "title": "t", "is_protocol": True, "departures": [],
               "results": {"head": {"miou": summarise([40.0, 42.0])}},
               "anchors": load_protocol("ade20k").anchors}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text(json.dumps(results))
    page, found = write_report(ReportConfig(runs=[str(tmp_path / "run")], out=str(tmp_path / "r.html")))
    assert [f.kind for f in found] == ["protocol"]
    text = Path(page).read_text()
    assert "41.00 ± 1.41" in text and "GATE (SD-1.5, 3 extractors)" in text and "40.51" in text
