"""GATE's parts against direct formulas: the candidates file, scores, bootstrap, Spearman, the probe's pieces."""

import math

import numpy as np
import pytest
import torch

from difffeat.errors import UserError
from gate.candidates import check_candidates, read_candidates
from gate.probe import mean_iou, ridge_fit, ridge_predict
from gate.score import _edge_f1_maps, contour_diff, edge_f1, feature_score, laplacian_norm, psnr, ssim
from gate.stats import bootstrap, difference, mean_of, rankdata, resample, spearman


# ------------------------------------------------------------------------------------------- candidates
def write(tmp_path, text):
    path = tmp_path / "cands.yaml"
    path.write_text(text)
    return path


def test_candidates_file_is_read_with_reference_first_and_canonical_specs(tmp_path):
    path = write(tmp_path, "canny: [controlnet:canny]\nboth:\n  - prompt:caption\n  - cfg:7.5\nplain: []\n")
    assert read_candidates(path) == {"reference": [], "canny": ["controlnet:canny"],
                                     "both": ["prompt:caption", "cfg:7.5"], "plain": []}
    wrapped = write(tmp_path, "candidates:\n  canny: controlnet:canny\n  reference:\n")
    assert read_candidates(wrapped) == {"reference": [], "canny": ["controlnet:canny"]}


@pytest.mark.parametrize("text, where, words", [
    ("canny: [controlnet:canny]\ncaption:\n  - prompt:caption\n  - contrlnet:canny\n", ":4:",
     ["candidate 'caption', spec 2", "unknown technique 'contrlnet'", "valid:", "controlnet:MODEL"]),
    ("a: [cfg:high]\n", ":1:", ["candidate 'a', spec 1", "scale must be float"]),
    ("a: [prompt:fine]\nb: []\na: [cfg:2]\n", ":3:", ["'a' appears twice (first at line 1)"]),
    ("reference: [prompt:fine]\n", ":1:", ["no-technique anchor"]),
    ("x:\n  y: prompt:fine\n", ":2:", ["expected a list of technique specs"]),
    ("'bad name': []\n", ":1:", ["must be letters"]),
    ("a: [prompt:fine\nb: []\n", ":2:", ["not valid YAML"]),
    ("- prompt:fine\n", ":1:", ["expected a mapping"]),
    ("a:\n  - [prompt:fine]\n", ":2:", ["spec 1: expected a technique spec string"]),
])
def test_candidates_file_errors_name_the_line_and_field(tmp_path, text, where, words):
    path = write(tmp_path, text)
    with pytest.raises(UserError) as e:
        read_candidates(path)
    message = str(e.value)
    assert message.startswith(f"{path}{where}"), message
    for w in words:
        assert w in message, message


def test_candidates_missing_file_and_python_dict():
    with pytest.raises(UserError, match="cannot read the candidates file"):
        read_candidates("/nonexistent/cands.yaml")
    assert check_candidates({"c": "prompt:caption"}) == {"reference": [], "c": ["prompt:caption"]}
    with pytest.raises(UserError, match="candidate 'c': unknown technique"):
        check_candidates({"c": ["nope:1"]})


# ---------------------------------------------------------------------------------------------- scores
def test_psnr_by_hand_and_ssim_of_identical_images():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 16, 16, generator=g)
    y = (x + 0.05 * torch.randn(3, 3, 16, 16, generator=g)).clamp(0, 1)
    mse = ((x - y) ** 2).reshape(3, -1).mean(1)
    assert torch.allclose(psnr(y, x), 10 * torch.log10(1 / mse), atol=1e-4)
    assert torch.allclose(ssim(x, x), torch.ones(3), atol=1e-6)
    assert (ssim(y, x) < 1).all()


def test_edge_f1_on_shifted_maps_and_tolerance():
    a = torch.zeros(1, 1, 8, 8)
    a[0, 0, 2:6, 3] = 1  # a vertical edge of 4 pixels
    b = torch.roll(a, 1, dims=3)  # the same edge one pixel to the right
    assert _edge_f1_maps(b, a, tolerance=1).item() == pytest.approx(1.0)
    assert _edge_f1_maps(b, a, tolerance=0).item() == pytest.approx(0.0)
    c = a.clone()
    c[0, 0, 0, 7] = 1  # one spurious edge pixel: P = 4/5, R = 1
    assert _edge_f1_maps(c, a, tolerance=0).item() == pytest.approx(2 * 0.8 / 1.8)
    assert _edge_f1_maps(torch.zeros_like(a), torch.zeros_like(a), 1).item() == 1.0
    assert _edge_f1_maps(torch.zeros_like(a), a, 1).item() == 0.0
    img = torch.zeros(1, 3, 32, 32)
    img[:, :, 8:24, 8:24] = 1.0  # a white square: canny finds its outline
    assert edge_f1(img, img).item() == pytest.approx(1.0)


def lap_norm_by_hand(f):
    c, h, w = f.shape
    out = np.zeros((h, w))
    p = np.pad(f, ((0, 0), (1, 1), (1, 1)), mode="edge")
    for i in range(h):
        for j in range(w):
            lap = p[:, i, j + 1] + p[:, i + 2, j + 1] + p[:, i + 1, j] + p[:, i + 1, j + 2] - 4 * p[:, i + 1, j + 1]
            out[i, j] = np.sqrt((lap**2).sum())
    return out


def test_contour_diff_and_score_match_eq_1_and_2():
    g = torch.Generator().manual_seed(1)
    ref, feat, anchor = (torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64) for _ in range(3))
    for b in range(2):
        assert np.allclose(laplacian_norm(feat)[b].numpy(), lap_norm_by_hand(feat[b].numpy()))
    by_hand = [np.abs(lap_norm_by_hand(ref[b].numpy()) - lap_norm_by_hand(feat[b].numpy())).sum() for b in range(2)]
    d = contour_diff(feat, ref)
    assert np.allclose(d.numpy(), by_hand)
    d_anchor = contour_diff(anchor, ref)
    assert feature_score(d, d_anchor) == pytest.approx((d_anchor.sum() - d.sum()).item() / d_anchor.sum().item())
    assert feature_score(contour_diff(ref, ref), d_anchor) == pytest.approx(1.0)  # exact match
    assert feature_score(d_anchor, d_anchor) == pytest.approx(0.0)  # as much shift as the anchor


# ----------------------------------------------------------------------------------------------- stats
def test_bootstrap_interval_contains_the_mean_and_pairs():
    rng = np.random.default_rng(0)
    values = rng.normal(3.0, 1.0, size=40)
    idx = resample(40, 1000, seed=0)
    iv = bootstrap(mean_of(values), idx)
    assert iv.value == pytest.approx(values.mean())
    assert iv.low < values.mean() < iv.high
    # Paired: a constant improvement has a zero-width interval, whatever the spread between images.
    diff = bootstrap(difference(mean_of(values + 0.5), mean_of(values)), idx)
    assert diff.value == pytest.approx(0.5) and diff.low == pytest.approx(0.5) and diff.high == pytest.approx(0.5)
    assert diff.excludes_zero()
    assert not bootstrap(difference(mean_of(values), mean_of(values)), idx).excludes_zero()


def test_spearman_by_hand_and_against_scipy():
    assert rankdata([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # d = rank differences 0, 0, 1, -1 → ρ = 1 − 6·Σd² / (n(n² − 1)) = 1 − 12/60 (no ties)
    assert spearman([1, 2, 3, 4], [1, 2, 4, 3]) == pytest.approx(0.8)
    assert math.isnan(spearman([1, 2, 3], [5, 5, 5])) and math.isnan(spearman([1, 2], [1, 2]))
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(3)
    x, y = rng.integers(0, 5, 12), rng.normal(size=12)
    assert spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y).statistic)


def test_probe_pieces():
    pred = np.array([[0, 0, 1], [1, 2, 255]])
    target = np.array([[0, 1, 1], [1, 2, 255]])
    # class 0: 1/(2+1-1)=0.5; class 1: 2/(2+3-2)=2/3; class 2: 1
    assert mean_iou(pred, target) == pytest.approx((0.5 + 2 / 3 + 1) / 3)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3))
    y = (x[:, 0] > 0).astype(int)  # linearly separable
    model = ridge_fit(x, np.eye(2)[y])
    assert (ridge_predict(model, x) == y).mean() > 0.95


def test_lpips_is_skipped_with_a_reason_without_local_weights(tmp_path, monkeypatch):
    from gate.score import lpips_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty torch cache: no AlexNet weights
    where, why = lpips_weights()
    assert where is None and why and ("torchvision" in why or str(tmp_path) in why)
