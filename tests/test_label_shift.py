import doctest
import zlib

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
    released_profile_sizes,
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
    expected = np.floor(100 * 0.1 ** (np.arange(10) / 9))
    assert np.abs(forward.counts - expected).max() <= 1


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
    # the draws are numpy's, as released: rows sum to 1, the zero-count class's share is tiny (not floored)
    assert np.isfinite(w).all() and np.allclose(w.sum(1), 1.0) and (w >= 0).all()
    assert (w[:, 1] < PRIOR_FLOOR).any()
    assert inverse_prior(np.array([0.5, 0.2, 0.2, 0.1])).tolist() == [0.1, 0.2, 0.2, 0.5]
    with pytest.raises(UserError):
        DirichletMetaDistribution([0, 0])


# ---- the released Dirichlet protocol (scongl/DirMixE test_training_*_dirmixe.py), written out -------------------
def released_img_num_per_cls(cls_num, imb_factor, reverse, img_max, uniforms, rng, alpha_sum=None, floor=True):
    """`DirichletImbalanceCIFAR10.get_img_num_per_cls` ('exp'; the ImageNet / iNat copies add the 1e-7 floor and
    alpha_sum), with the random numbers given: `uniforms` are the per-class perturbation factors (the code's
    1 + (random() − 0.5)·0.1), `rng` draws the Dirichlet."""
    img_num_per_cls = []
    for cls_idx in range(cls_num):
        if reverse:
            num = img_max * (imb_factor ** ((cls_num - 1 - cls_idx) / (cls_num - 1.0)))
        else:
            num = img_max * (imb_factor ** (cls_idx / (cls_num - 1.0)))
        img_num_per_cls.append(int(num))
    alpha = [float(x) for x in img_num_per_cls]
    for i in range(len(alpha)):
        alpha[i] = alpha[i] * uniforms[i]
        if floor:
            alpha[i] = max(alpha[i], 1e-7)
    alpha_norm = sum(alpha)
    alpha = [x * (img_max if alpha_sum is None else alpha_sum) / alpha_norm for x in alpha]
    p = rng.dirichlet(alpha)
    pro_max = max(p)
    return [max(int(x / pro_max * img_max), 1) for x in p]


@pytest.mark.parametrize("cls_num, img_max, ratio, alpha_sum", [
    (100, 100, 100, None),   # CIFAR-100, --ir 0.01, α0 = img_max
    (10, 1000, 100, None),   # CIFAR-10
    (50, 50, 50, 1e4),       # ImageNet-LT-like: ratio 50, α0 = 1e4 (1,000 classes there; 50 here, same formula)
    (40, 20, 3, 1e5),        # iNat-like: ratio 3, α0 = 1e5
])
def test_dirichlet_sets_equal_the_released_construction(cls_num, img_max, ratio, alpha_sum):
    """Same random numbers through the released formula: the profile floored to integers before the Dirichlet
    parameters, ±5% noise, α0, counts max(1, ⌊p/max p·img_max⌋), for every kind and several seeds."""
    labels = np.repeat(np.arange(cls_num), img_max)
    for seed in range(3):
        sets = dirichlet_test_sets(labels, ratio=ratio, draws=2, concentration=alpha_sum, seed=seed)
        for s in sets:
            kind = s.kind.removeprefix("dirichlet-")
            rng = np.random.default_rng([seed, zlib.crc32(s.name.encode())])  # the set's own stream
            uniforms = rng.uniform(0.95, 1.05, cls_num)
            imb_factor, reverse = (1, False) if kind == "uniform" else (1 / ratio, kind == "backward")
            expected = released_img_num_per_cls(cls_num, imb_factor, reverse, img_max, uniforms, rng, alpha_sum)
            assert s.counts.tolist() == expected, s.name
            check_indices(labels, s)


def test_released_profile_is_floored_before_the_dirichlet_parameters():
    """The integer profile differs from the real one wherever n_max·ρ^(−r/(C−1)) is not an integer: the
    ImageNet-LT (n_max 50, ρ 50) and iNat (ρ 3) settings, as int() in the released scripts."""
    for c, n_max, ratio in ((1000, 50, 50), (100, 100, 100), (8142, 3, 3)):
        ranks = np.arange(c)
        sizes = released_profile_sizes(c, ratio, "forward", ranks, n_max)
        reference = [int(n_max * (1 / ratio) ** (i / (c - 1.0))) for i in range(c)]
        assert sizes.tolist() == reference
        real = n_max * float(ratio) ** (-ranks / (c - 1))
        assert (sizes != real).sum() > c // 2  # most classes move
        back = released_profile_sizes(c, ratio, "backward", ranks, n_max)
        assert back.tolist() == reference[::-1]
    assert released_profile_sizes(5, 10, "uniform", np.arange(5), 7.9).tolist() == [7.0] * 5
    # iNat at ratio 3 with 3 images per class: only 3, 2 and 1 remain, far from the real profile
    steps = released_profile_sizes(8142, 3, "forward", np.arange(8142), 3)
    assert set(np.unique(steps)) == {1.0, 2.0, 3.0} and (steps == 1).sum() > 0


def test_dirichlet_sets_carry_an_independent_adaptation_draw():
    labels = np.repeat(np.arange(10), 100)
    sets = dirichlet_test_sets(labels, ratio=10, draws=2, seed=4)
    for s in sets:
        assert s.adaptation is not None and len(np.unique(s.adaptation)) == len(s.adaptation)
        assert not np.array_equal(np.sort(s.adaptation), s.indices)  # another draw, not the scored set
        counts = np.bincount(labels[s.adaptation], minlength=10)
        assert counts.max() == 100 and counts.min() >= 1  # the same construction: its largest class is n_max
    again = dirichlet_test_sets(labels, ratio=10, draws=2, seed=4)
    assert all(np.array_equal(a.adaptation, b.adaptation) for a, b in zip(sets, again))
    # the SADE protocol's sets adapt on themselves (SADE's scripts draw the same subset twice)
    assert all(s.adaptation is None for s in shifted_test_sets(labels, dirichlet_draws=0))
    # with a very sharp Dirichlet both draws follow the same backward profile
    sharp = [s for s in dirichlet_test_sets(labels, ratio=10, draws=1, concentration=1e9, noise=0.0)
             if s.kind == "dirichlet-backward"][0]
    adapt = np.bincount(labels[sharp.adaptation], minlength=10)
    assert np.abs(adapt - sharp.counts).max() <= 1


def test_docstring_examples():
    result = doctest.testmod(label_shift_module)
    assert result.attempted > 0 and result.failed == 0, result  # examples that vanish fail too
