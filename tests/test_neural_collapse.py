import doctest
import math

import numpy as np
import pytest
import torch

import downstream.cls.neural_collapse as nc_module
from difffeat.errors import UserError
from downstream.cls.neural_collapse import (
    FixedFrameClassifier,
    align_frame,
    coherence,
    coherence_bound,
    grassmannian_frame,
    label_assignment,
    multiclass_margins,
    nc1,
    nc2,
    nc3,
    nc4,
    neural_collapse_metrics,
    simplex_etf,
)


@pytest.mark.parametrize(("c", "d"), [(5, 4), (5, 10), (2, 1)])
def test_simplex_etf_gram(c, d):
    w = simplex_etf(c, d, seed=1)
    expected = np.full((c, c), -1.0 / (c - 1))
    np.fill_diagonal(expected, 1.0)
    assert w.shape == (c, d) and np.allclose((w @ w.T).numpy(), expected)
    assert np.allclose(w.sum(0).numpy(), 0.0)  # centred


def test_grassmannian_frames_reach_known_optima():
    # signed, C > d + 1: six points on the circle, 60° apart, cos = 0.5
    hexagon = grassmannian_frame(6, 2, signed=True, steps=500, restarts=1)
    assert torch.allclose(hexagon.norm(dim=1), torch.ones(6, dtype=torch.float64))
    assert coherence(hexagon) == pytest.approx(0.5, abs=3e-3)
    # absolute: three lines in the plane meet the Welch bound 1/2
    lines = grassmannian_frame(3, 2, signed=False, steps=500, restarts=1)
    assert coherence(lines, signed=False) == pytest.approx(coherence_bound(3, 2, signed=False), abs=3e-3)
    # eight points on the sphere: the Tammes optimum (square antiprism), angle 74.86°, cos ≈ 0.2613
    assert coherence(grassmannian_frame(8, 3, steps=500, restarts=1)) == pytest.approx(0.2613, abs=3e-3)
    assert coherence_bound(3, 2, signed=False) == pytest.approx(0.5)
    # known optima returned directly
    assert coherence(grassmannian_frame(4, 3)) == pytest.approx(-1 / 3)
    assert coherence(grassmannian_frame(3, 5, signed=False), signed=False) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(UserError):
        simplex_etf(6, 3)


def test_fixed_frame_classifier_assignment_and_logits():
    head = FixedFrameClassifier(7, 4, dim=5, assignment=[2, 0, 3, 1], scale=3.0)
    frame = simplex_etf(4, 5, seed=0).float()
    assert torch.allclose(head.weight, frame[[2, 0, 3, 1]])
    assert "weight" not in dict(head.named_parameters())  # fixed
    x = torch.randn(3, 7)
    z = head.projection(x)
    expected = 3.0 * (z / z.norm(dim=1, keepdim=True)) @ head.weight.T
    assert torch.allclose(head(x), expected, atol=1e-6)
    assert FixedFrameClassifier(3, 6, dim=2).weight.shape == (6, 2)  # C > d + 1: a Grassmannian frame
    perm = label_assignment(6, "random", seed=4)
    assert sorted(perm.tolist()) == list(range(6)) and torch.equal(perm, label_assignment(6, "random", seed=4))
    with pytest.raises(UserError):
        label_assignment(3, [0, 0, 1])


def test_align_frame_recovers_a_rotation():
    frame = simplex_etf(4, 3, seed=2)
    q = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)).Q
    means = 5.0 * frame @ q + torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)  # rotated, scaled, shifted
    assert torch.allclose(align_frame(frame, means), frame @ q, atol=1e-10)


def _numpy_nc(h, y, w):
    classes = np.unique(y)
    mu = np.stack([h[y == c].mean(0) for c in classes])
    mg = mu.mean(0)
    within = h - mu[np.searchsorted(classes, y)]
    sw = within.T @ within / len(h)
    sb = (mu - mg).T @ (mu - mg) / len(classes)
    out = {"nc1": np.trace(sw @ np.linalg.pinv(sb)) / len(classes)}
    m = mu - mg
    norms = np.linalg.norm(m, axis=1)
    cos = [m[i] @ m[j] / (norms[i] * norms[j]) for i in range(len(m)) for j in range(len(m)) if i != j]
    c = len(classes)
    out["equinorm"] = np.std(norms, ddof=1) / np.mean(norms)
    out["equiangularity"] = np.std(cos, ddof=1)
    out["max_angle"] = np.mean(np.abs(np.array(cos) + 1 / (c - 1)))
    gram = m @ m.T
    out["etf_distance"] = np.linalg.norm(gram / np.linalg.norm(gram) - (np.eye(c) - 1 / c) / np.sqrt(c - 1))
    wc = w[classes]
    out["nc3"] = np.linalg.norm(wc / np.linalg.norm(wc) - m / np.linalg.norm(m)) ** 2
    pred = np.argmax(h @ w.T, 1)
    nearest = classes[np.argmin(((h[:, None, :] - mu[None]) ** 2).sum(-1), 1)]
    out["nc4"] = np.mean(pred != nearest)
    return out


def test_nc_metrics_against_numpy():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(40, 6, generator=g, dtype=torch.float64) + 2 * torch.randn(5, 6, generator=g).repeat(8, 1)
    y = torch.arange(5).repeat(8)
    w = torch.randn(5, 6, generator=g, dtype=torch.float64)
    ref = _numpy_nc(h.numpy(), y.numpy(), w.numpy())
    assert nc1(h, y) == pytest.approx(ref["nc1"], rel=1e-9)
    for key, value in nc2(h, y).items():
        assert value == pytest.approx(ref[key], rel=1e-9), key
    assert nc3(h, y, w) == pytest.approx(ref["nc3"], rel=1e-9)
    assert nc4(h, y, w) == pytest.approx(ref["nc4"])
    z = (h @ w.T).numpy()
    for i in range(5):
        others = max(z[i, j] for j in range(5) if j != int(y[i]))
        direct = (z[i, int(y[i])] - others) / (np.linalg.norm(w.numpy()) * np.linalg.norm(h[i].numpy()))
        assert multiclass_margins(h, y, w)[i].item() == pytest.approx(direct, rel=1e-9)


def test_collapsed_features_score_zero():
    frame = simplex_etf(4, 6, seed=3)
    h = 2.0 * frame.repeat(3, 1) + 0.7  # every sample exactly at its class mean; means an ETF around 0.7
    y = torch.arange(4).repeat(3)
    metrics = neural_collapse_metrics(h, y, weight=frame, groups={"head": [0, 1], "tail": [2, 3], "none": [3]})
    assert metrics["nc1"] == pytest.approx(0.0, abs=1e-12)
    for key in ("nc2_equinorm", "nc2_equiangularity", "nc2_max_angle", "nc2_etf_distance", "nc3", "nc4"):
        assert metrics[key] == pytest.approx(0.0, abs=1e-9), key
    assert "tail/nc1" in metrics and "none/nc1" not in metrics
    assert metrics["margin_min"] > 0 and math.isfinite(metrics["margin_mean"])


def test_docstring_examples():
    result = doctest.testmod(nc_module)
    assert result.attempted > 0 and result.failed == 0, result  # examples that vanish fail too
