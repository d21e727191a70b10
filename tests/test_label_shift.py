import doctest

import numpy as np
import pytest

import downstream.cls.label_shift as label_shift_module
from difffeat.errors import UserError
from downstream.cls.label_shift import (
    BACKWARD_RATIOS,
    FORWARD_RATIOS,
    DirichletMetaDistribution,
    dirichlet_test_sets,
    inverse_prior,
    resample_test_set,
    shifted_test_sets,
)
from downstream.losses.prior import PRIOR_FLOOR

BALANCED = np.repeat(np.arange(10), 100)  # 10 classes × 100 test images


def check_indices(labels, s):
    assert len(np.unique(s.indices)) == len(s.indices)  # without replacement
    assert np.array_equal(np.bincount(labels[s.indices], minlength=len(s.counts)), s.counts)


def test_forward_uniform_backward_have_the_requested_ratios():
    sets = shifted_test_sets(BALANCED, dirichlet_draws=0, seed=3)
    assert [s.name for s in sets] == ([f"forward-{r}" for r in FORWARD_RATIOS] + ["uniform"]
                                      + [f"backward-{r}" for r in BACKWARD_RATIOS])
    for s in sets:
        check_indices(BALANCED, s)
        if s.kind == "uniform":
            assert (s.counts == 100).all()
            continue
        ratio = s.ratio
        head, tail = (0, 9) if s.kind == "forward" else (9, 0)
        assert s.counts[head] == 100 and s.counts[tail] == 100 / ratio  # exact: 100 is divisible by every ratio
        assert s.counts[head] / s.counts[tail] == ratio
        ranks = np.arange(10) if s.kind == "forward" else 9 - np.arange(10)
        assert np.array_equal(s.counts, np.floor(100 * ratio ** (-ranks / 9) + 1e-9).astype(int))


def test_ranks_follow_the_training_counts_and_draws_are_seeded():
    train = np.array([5, 50, 500, 20, 1, 100, 2, 10, 200, 1000])  # most frequent: class 9, then 2, 8, 5 …
    s = resample_test_set(BALANCED, "forward", 10, train_counts=train, seed=0)
    order = np.argsort(-train, kind="stable")
    assert np.all(np.diff(s.counts[order]) <= 0) and s.counts[9] == 100 and s.counts[4] == 10
    b = resample_test_set(BALANCED, "backward", 10, train_counts=train, seed=0)
    assert b.counts[4] == 100 and b.counts[9] == 10
    again = resample_test_set(BALANCED, "forward", 10, train_counts=train, seed=0)
    other = resample_test_set(BALANCED, "forward", 10, train_counts=train, seed=1)
    assert np.array_equal(s.indices, again.indices) and not np.array_equal(s.indices, other.indices)
    # a set does not depend on which other sets are drawn
    alone = shifted_test_sets(BALANCED, forward=(10,), backward=(), dirichlet_draws=0, seed=0)[0]
    assert np.array_equal(alone.indices, resample_test_set(BALANCED, "forward", 10, seed=0).indices)


def test_unbalanced_test_sets_and_bad_labels():
    labels = np.concatenate([np.repeat(np.arange(4), [30, 12, 40, 9]), [5] * 7])  # class 4 absent
    s = resample_test_set(labels, "forward", 5, num_classes=6)
    available = np.bincount(labels, minlength=6)
    assert (s.counts <= available).all() and s.counts[4] == 0
    check_indices(labels, s)
    with pytest.raises(UserError, match="not among"):
        resample_test_set(labels, "forward", 5, train_counts=[10, 10, 10, 10, 10])  # class 5 unknown to training
    with pytest.raises(UserError):
        resample_test_set(np.array([0.5, 1.0]), "uniform")


def test_dirichlet_test_sets():
    sets = dirichlet_test_sets(BALANCED, draws=3, seed=0)
    assert len(sets) == 9 and {s.kind for s in sets} == {"dirichlet-uniform", "dirichlet-forward",
                                                         "dirichlet-backward"}
    for s in sets:
        check_indices(BALANCED, s)
        assert (s.counts >= 1).all() and (s.counts <= 100).all() and s.counts.max() == 100
    again = dirichlet_test_sets(BALANCED, draws=3, seed=0)
    assert all(np.array_equal(a.indices, b.indices) for a, b in zip(sets, again))
    # with a very high concentration the draws follow the profile: forward counts fall with rank
    sharp = dirichlet_test_sets(BALANCED, ratio=10, draws=1, concentration=1e7, noise=0.0)
    forward = next(s for s in sharp if s.kind == "dirichlet-forward")
    expected = np.floor(100 * 10.0 ** (-np.arange(10) / 9))
    assert np.abs(forward.counts - expected).max() <= 2


def test_meta_distribution_draws_have_the_configured_means():
    counts = np.array([60, 25, 10, 4, 1])
    prior = counts / counts.sum()
    meta = DirichletMetaDistribution(counts, concentration=40.0)
    assert np.allclose(meta.means[0], prior) and np.allclose(meta.means[1], 0.2)
    assert np.allclose(meta.means[2], prior[::-1])
    for k in range(3):
        ks, w = meta.sample(4000, seed=k, component=k)
        assert (ks == k).all() and np.allclose(w.sum(1), 1.0)
        # Dir(α0·π): var = π(1 − π)/(α0 + 1); the mean of n draws is within 5 standard errors
        se = np.sqrt(meta.means[k] * (1 - meta.means[k]) / 41.0 / 4000)
        assert np.all(np.abs(w.mean(0) - meta.means[k]) < 5 * se + 1e-12)
    ks, _ = meta.sample(6000, seed=7)
    assert np.all(np.abs(np.bincount(ks, minlength=3) / 6000 - 1 / 3) < 0.03)


def test_meta_distribution_with_zero_count_classes_and_tiny_concentration():
    meta = DirichletMetaDistribution([100, 0, 3], concentration=1e4)
    assert meta.means[0][1] == pytest.approx(PRIOR_FLOOR, rel=1e-6)
    _, w = meta.sample(200, seed=0)
    assert np.isfinite(w).all() and (w >= PRIOR_FLOOR * 0.99).all() and np.isfinite(np.log(w)).all()
    assert inverse_prior(np.array([0.5, 0.2, 0.2, 0.1])).tolist() == [0.1, 0.2, 0.2, 0.5]
    with pytest.raises(UserError):
        DirichletMetaDistribution([0, 0])


def test_docstring_examples():
    assert doctest.testmod(label_shift_module).failed == 0
