"""`difffeat demo` at its smallest setting: the whole chain on the built-in world, ending in a report page that
loads (in headless Chromium where installed, else parsed and every picture decoded)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from apps.demo import plan
from difffeat.report.check import check_report


def run(*args, timeout=1200):
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "difffeat", "--quiet", "demo", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_plan_grows_with_the_budget():
    small, large = plan(1), plan(5)
    assert small.images < large.images and small.iterations < large.iterations
    assert small.gate_images <= large.gate_images and len(small.candidates) <= len(large.candidates)
    assert small.images // 10 >= small.gate_images  # GATE draws from the test split (a tenth of the world)


@pytest.mark.slow
def test_demo_runs_the_chain_and_ends_with_a_report(tmp_path):
    out = tmp_path / "demo"
    done = run("--out", str(out), "--minutes", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[-1] == f"report: {out / 'report.html'}"
    for step in range(1, 9):
        assert f"[{step}/8]" in done.stdout
    for command in ("$ difffeat data synth", "$ difffeat gate", "--greedy --emit", "$ difffeat extract",
                    "--variants", "$ difffeat train-seg", "$ difffeat eval-seg", "$ difffeat report"):
        assert command in done.stdout, command
    assert "peak memory" in done.stdout and "left" in done.stdout  # summary line and ETA
    marker = json.loads((out / "config.json").read_text())
    assert marker["format"] == "difffeat-run/1" and marker["kind"] == "demo"
    summary = json.loads((out / "demo.json").read_text())
    assert 0 < summary["test_miou"]["plain"] <= 1

    found = check_report(out / "report.html")
    assert not found["problems"], found["problems"]
    assert found["images"] >= 10
    page = (out / "report.html").read_text()
    for text in ("GATE · ", "Feature store · ", "Segmentation head · ", "seg-plain", "Segmentation heads compared"):
        assert text in page, text

    # Resumed: every finished step is skipped, the report is written again.
    again = run("--out", str(out), "--minutes", "1", "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("skipped") >= 6
    # Neither resumed nor replaced: refused with one line.
    refused = run("--out", str(out), "--minutes", "1")
    assert refused.returncode == 2 and "holds a demo run" in refused.stderr and "Traceback" not in refused.stderr
    other = run("--out", str(out), "--minutes", "2", "--resume")
    assert other.returncode == 2 and "minutes" in other.stderr  # another config: the differing field is named
