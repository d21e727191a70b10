"""GATE's statistics and report of issue #12 item 5: noise replicates per image, Holm's correction of the
acceptance tests, bootstrap intervals on probe quality and on Spearman ρ, and the report's difference maps,
control images, prompts, probe scatter and time per candidate."""

import json

import numpy as np
import pytest
import torch

from gate.probe import confusions, mean_iou, miou_of
from gate.stats import bootstrap_p, holm, resample

FAST = {"steps": 4, "n_boot": 200}


def test_holm_equals_a_hand_computation():
    p = {"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.5}
    # sorted: a 0.01·4 = 0.04, c 0.03·3 = 0.09, b 0.04·2 = 0.08 → max(0.09, 0.08) = 0.09, d 0.5·1 = 0.5
    assert holm(p) == pytest.approx({"a": 0.04, "c": 0.09, "b": 0.09, "d": 0.5})
    assert holm({"x": 0.7, "y": 0.6}) == {"y": 1.0, "x": 1.0}  # capped at 1


def test_bootstrap_p_is_twice_the_smaller_tail():
    values = np.array([1.0, 2.0, -0.5, 3.0])
    idx = resample(4, 999, seed=1)
    means = values[idx].mean(1)
    below, above = (np.sum(means <= 0) + 1) / 1000, (np.sum(means >= 0) + 1) / 1000
    assert bootstrap_p(lambda i: values[i].mean(1), idx) == pytest.approx(min(1, 2 * min(below, above)))
    assert bootstrap_p(lambda i: np.zeros(len(i)), idx) == 1.0


def test_confusion_miou_equals_the_pixel_miou():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 4, (3, 6, 6))
    target[0, 0, :3] = 255
    pred = rng.integers(0, 4, (3 * 36,))
    conf = confusions(pred, target, 4)
    assert conf.shape == (3, 4, 4) and conf.sum() == (target != 255).sum()
    assert miou_of(conf.sum(0)) == pytest.approx(mean_iou(pred, target.reshape(-1)))


def test_replicates_average_noise_draws_and_holm_accepts_a_subset(mini_pipe):
    from gate.ranking import rank

    x = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    cands = {"fine": ["prompt:fine"], "low": ["prompt:low"], "canny": ["controlnet:canny"]}
    one = rank(mini_pipe, x, cands, correction="none", **FAST)
    two = rank(mini_pipe, x, cands, replicates=2, correction="none", **FAST)
    # draw 0 is the run's own seed, draw 1 another: an image's score under two draws is the mean of both
    other = rank(mini_pipe, x, cands, seed=1_000_003, correction="none", **FAST)
    for m in ("psnr", "ssim", "edge_f1"):
        got = two.evaluations["canny"].per_image[m]
        want = (one.evaluations["canny"].per_image[m] + other.evaluations["canny"].per_image[m]) / 2
        assert np.allclose(got, want, atol=1e-6), m
    assert torch.equal(two.evaluations["canny"].recon, one.evaluations["canny"].recon)
    holm_run = rank(mini_pipe, x, cands, correction="holm", **FAST)
    assert set(holm_run.accepted) <= set(one.accepted)
    adjusted = holm({c: t["p"] for c, t in holm_run.tests.items()})
    assert {c: t["p_adjusted"] for c, t in holm_run.tests.items()} == pytest.approx(adjusted)
    for c in holm_run.accepted:
        assert holm_run.tests[c]["p_adjusted"] <= 0.05 and holm_run.improvement[c].value > 0


def test_report_shows_differences_controls_prompts_times_and_the_probe(mini_pipe, shapes_dir, tmp_path):
    from gate.ranking import rank
    from gate.report import difference_map, write_report

    cands = {"caption": ["prompt:caption"], "canny": ["controlnet:canny"]}
    result = rank(mini_pipe, str(shapes_dir / "test"), cands, n=4, probe=str(shapes_dir / "train"), probe_n=8,
                  **FAST)
    p = result.probe
    for name, (low, high) in p["quality_interval"].items():
        assert low <= p["quality"][name] + 1e-9 and p["quality"][name] <= high + 1e-9, name
    assert set(p["spearman_interval"]) == set(result.metrics)
    for m, (low, high) in p["spearman_interval"].items():
        assert low is None or -1 <= low <= high <= 1, m
    ev = result.evaluations["canny"]
    assert ev.control is not None and ev.control.shape == (4, 3, 64, 64)
    assert result.evaluations["caption"].control is None
    assert result.prompt_candidates() == ["caption"]
    assert all(result.evaluations["caption"].prompts) and result.evaluations["reference"].prompts == [""] * 4
    assert all(e.seconds > 0 for e in result.evaluations.values())
    diff = difference_map(ev.recon[0], result.inputs[0])
    want = ((ev.recon[0] - result.inputs[0]).abs().mean(0) * 4).clamp(0, 1).mul(255).round()
    assert diff.shape == (64, 64, 3) and np.array_equal(diff[..., 0], want.to(torch.uint8).numpy())
    page = write_report(result, tmp_path / "gate").read_text()
    for words in ("|recon − input|", "Control images", "<h2>Prompts</h2>", "seconds", "p (adjusted)",
                  "alt='GATE scores against probe quality'"):
        assert words in page, words
    saved = json.loads((tmp_path / "gate" / "ranking.json").read_text())
    assert set(saved["candidate_seconds"]) == {"reference", "caption", "canny"} and set(saved["tests"]) == set(cands)
    assert list(saved["prompts"]) == ["caption"] and len(saved["prompts"]["caption"]) == 4
    assert (tmp_path / "gate" / "probe.png").stat().st_size > 0
