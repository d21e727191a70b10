"""The label-shift evaluation protocol (test-agnostic long-tail evaluation): test sets resampled to shifted
label distributions, and DirMixE's Dirichlet meta-distribution of test priors (research/aucseg_dirmixe.md
B.2, B.7).

From one labelled test set, `shifted_test_sets` draws index subsets whose class counts follow
- forward-LT (ratios 50, 25, 10, 5, 2): n_c = n_max·ρ^(−r_c/(C−1)), r_c the rank of class c by training
  frequency (0 = most frequent), the SADE protocol;
- uniform: n_c = n_max;
- backward-LT (2 … 50): the same profile with the ranks reversed;
- Dirichlet draws around uniform, forward-ρ and backward-ρ (the DirMixE protocol), each with an
  independent draw of the same kind and ratio (`ResampledSet.adaptation`) on which test-time aggregation
  adapts, as the released DirMixE scripts do (`test_training_*_dirmixe.py`: the adaptation and evaluation
  data sets are two separately drawn `DirichletImbalance*` sets).
Accuracy is then reported per set and averaged. Every draw is seeded by (seed, set name), so a set does not
change when others are added or removed, nor when its adaptation draw is used or not.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from difffeat.errors import UserError
from downstream.cls.config import BACKWARD_RATIOS, FORWARD_RATIOS, DirMixEConfig
from downstream.losses.prior import PRIOR_FLOOR, as_counts

__all__ = ["BACKWARD_RATIOS", "DIRICHLET_ALPHA_FLOOR", "FORWARD_RATIOS", "DirichletMetaDistribution", "ResampledSet",
           "class_ranks", "dirichlet_test_sets", "inverse_prior", "profile_counts", "released_profile_sizes",
           "resample_test_set", "shifted_test_sets"]


@dataclass(frozen=True)
class ResampledSet:
    """One resampled test set: `indices` into the labels, and its per-class `counts`."""

    name: str  # "forward-50", "uniform", "backward-2", "dirichlet-forward-100-0", …
    kind: str  # forward | uniform | backward | dirichlet-forward | dirichlet-uniform | dirichlet-backward
    ratio: float  # imbalance ratio of the profile (1 for uniform)
    counts: np.ndarray
    indices: np.ndarray
    # Dirichlet sets: an independent draw of the same kind and ratio, for test-time aggregation to adapt on
    # (None: adapt on `indices`, as SADE's protocol does for its fixed forward / uniform / backward sets).
    adaptation: np.ndarray | None = None


def class_ranks(num_classes: int, train_counts=None, ties: str = "index") -> np.ndarray:
    """Rank of each class by training count, 0 = most frequent; identity without counts. Tied classes: by class
    index (`ties` "index"), or as the DirMixE ImageNet / iNat scripts order them ("released": the same call, numpy's
    default argsort of the counts reversed; numpy's default sort is not stable, so tied classes come in whatever
    order it leaves them, reversed: never index order, and it may change with numpy's sorting code)."""
    if train_counts is None:
        return np.arange(num_classes)
    if ties == "released":
        order = np.argsort(np.asarray(train_counts))[::-1]
    elif ties == "index":
        order = np.argsort(-np.asarray(train_counts, dtype=np.float64), kind="stable")
    else:
        raise UserError(f"ties must be index or released, got {ties!r}")
    ranks = np.empty(num_classes, dtype=np.int64)
    ranks[order] = np.arange(num_classes)
    return ranks


def _check_labels(labels, train_counts, num_classes) -> tuple[np.ndarray, int]:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"test labels: expected a 1-D vector of class ids, got {labels.dtype} {labels.shape}")
    if train_counts is not None:
        num_classes = len(train_counts) if num_classes is None else num_classes
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if labels.size else 0
    bad = np.unique(labels[(labels < 0) | (labels >= num_classes)])
    if bad.size:
        raise UserError(f"test labels: classes {bad.tolist()} are not among the {num_classes} training classes")
    return labels, num_classes


def _profile(num_classes: int, ratio: float, kind: str, ranks: np.ndarray) -> np.ndarray:
    """Relative class sizes in (0, 1]: ρ^(−r/(C−1)), ranks reversed for backward, ones for uniform."""
    if kind == "uniform" or num_classes == 1:
        return np.ones(num_classes)
    if ratio < 1:
        raise UserError(f"imbalance ratio must be ≥ 1, got {ratio}")
    r = ranks if kind == "forward" else num_classes - 1 - ranks
    return float(ratio) ** (-r / (num_classes - 1))


def _available(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(labels, minlength=num_classes)


def _draw(labels: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    picked = [rng.choice(np.flatnonzero(labels == c), size=int(n), replace=False)
              for c, n in enumerate(counts) if n > 0]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def profile_counts(available: np.ndarray, ratio: float, kind: str, ranks: np.ndarray) -> np.ndarray:
    """Per-class counts n_c = max(1, ⌊n_max·f_c⌋) for the profile f (`kind` forward | uniform | backward).

    n_max is the largest head size that every class can supply (n_max·f_c ≤ available_c): the per-class count
    for a balanced test set, as in SADE. Classes absent from the test set get 0.
    """
    f = _profile(len(available), ratio, kind, ranks)
    present = available > 0
    if not present.any():
        raise UserError("test labels: the test set is empty")
    n_max = np.min(available[present] / f[present])
    counts = np.maximum(1, np.floor(n_max * f + 1e-9)).astype(np.int64)
    return np.where(present, np.minimum(counts, available), 0)


def resample_test_set(labels, kind: str = "uniform", ratio: float = 1.0, train_counts=None,
                      num_classes: int | None = None, seed: int = 0) -> ResampledSet:
    """Indices of a test subset with a forward-LT, uniform or backward-LT class profile (see module doc)."""
    if kind not in ("forward", "uniform", "backward"):
        raise UserError(f"resample kind must be forward, uniform or backward, got {kind!r}")
    labels, num_classes = _check_labels(labels, train_counts, num_classes)
    counts = profile_counts(_available(labels, num_classes), ratio, kind, class_ranks(num_classes, train_counts))
    name = "uniform" if kind == "uniform" else f"{kind}-{ratio:g}"
    return ResampledSet(name, kind, 1.0 if kind == "uniform" else float(ratio), counts,
                        _draw(labels, counts, _rng(seed, name)))


DIRICHLET_ALPHA_FLOOR = 1e-7  # the released ImageNet / iNat scripts: max(α_c, 1e-7) before scaling to α0


def released_profile_sizes(num_classes: int, ratio: float, kind: str, ranks: np.ndarray, n_max: float) -> np.ndarray:
    """The Dirichlet protocol's class-size profile as the released code forms it: integers
    ⌊n_max·(1/ρ)^(r_c/(C−1))⌋ (Python's ``int(img_max * imb_factor ** (…))``, imb_factor = 1/ρ), r_c the
    class's rank (reversed for backward); ⌊n_max⌋ for every class when uniform.

    >>> released_profile_sizes(4, 10.0, "forward", np.arange(4), 100).tolist()  # 100·10^(−r/3) = 100, 46.4, 21.5, 10
    [100.0, 46.0, 21.0, 10.0]
    """
    if kind == "uniform" or num_classes == 1:
        return np.full(num_classes, float(np.floor(n_max)))
    if ratio < 1:
        raise UserError(f"imbalance ratio must be ≥ 1, got {ratio}")
    r = ranks if kind == "forward" else num_classes - 1 - ranks
    return np.floor(n_max * (1.0 / float(ratio)) ** (r / (num_classes - 1.0)))


def _dirichlet_draw(labels: np.ndarray, available: np.ndarray, kind: str, ratio: float, ranks: np.ndarray,
                    n_max: int, alpha0: float, noise: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(counts, indices) of one Dirichlet test set (see `dirichlet_test_sets`)."""
    present = available > 0
    sizes = released_profile_sizes(len(available), ratio, kind, ranks, n_max)
    sizes = sizes * rng.uniform(1 - noise, 1 + noise, len(available)) * present
    sizes = np.maximum(sizes, DIRICHLET_ALPHA_FLOOR)
    p = np.where(present, rng.dirichlet(sizes / sizes.sum() * alpha0), 0.0)
    counts = np.maximum(1, np.floor(p / p.max() * n_max)).astype(np.int64)
    counts = np.where(present, np.minimum(counts, available), 0)
    return counts, _draw(labels, counts, rng)


def dirichlet_test_sets(labels, train_counts=None, num_classes: int | None = None, ratio: float = 100.0,
                        draws: int = 3, concentration: float | None = None, noise: float = 0.05,
                        seed: int = 0) -> list[ResampledSet]:
    """DirMixE's protocol: `draws` Dirichlet test sets around each of uniform, forward-ρ and backward-ρ.

    Per draw, as the released scripts (`test_training_{cifar,imagenet,inat}_dirmixe.py`): the integer profile
    n_c = ⌊n_max·(1/ρ)^(r_c/(C−1))⌋ (`released_profile_sizes`; ρ = `ratio`, default 100 as the code's
    `--ir 0.01`), times U(1 − noise, 1 + noise), floored at 1e-7; α = n / Σn · α0 with α0 = `concentration`
    (default: n_max, the per-class count of a balanced test set, as the code's CIFAR `img_max`; 1e4 in the
    ImageNet-LT script, 1e5 in the iNat one); p ~ Dir(α); counts max(1, ⌊p_c / max p · n_max⌋), capped at what
    the test set holds. Every set carries an `adaptation` draw, made the same way from its own seed: the
    unlabelled data test-time aggregation adapts on. Note: on ~100 images per class the uniform case is about
    Dir(1, …, 1), a strong shift. (The iNat script's minimum count is 0, not 1; here it is always 1.)
    """
    labels, num_classes = _check_labels(labels, train_counts, num_classes)
    available = _available(labels, num_classes)
    present = available > 0
    if not present.any():
        raise UserError("test labels: the test set is empty")
    n_max = int(available[present].min())
    alpha0 = float(n_max if concentration is None else concentration)
    ranks = class_ranks(num_classes, train_counts, ties="released")
    sets = []
    for kind in ("uniform", "forward", "backward"):
        for i in range(draws):
            name = f"dirichlet-{kind}" + ("" if kind == "uniform" else f"-{ratio:g}") + f"-{i}"
            args = (labels, available, kind, ratio, ranks, n_max, alpha0, noise)
            counts, indices = _dirichlet_draw(*args, _rng(seed, name))
            _, adaptation = _dirichlet_draw(*args, _rng(seed, f"{name}/adaptation"))
            sets.append(ResampledSet(name, f"dirichlet-{kind}", 1.0 if kind == "uniform" else float(ratio), counts,
                                     indices, adaptation))
    return sets


def shifted_test_sets(labels, train_counts=None, num_classes: int | None = None,
                      forward=FORWARD_RATIOS, backward=BACKWARD_RATIOS, dirichlet_draws: int = 3,
                      dirichlet_ratio: float = 100.0, seed: int = 0,
                      dirichlet_concentration: float | None = None) -> list[ResampledSet]:
    """The whole test-agnostic suite: forward-LT, uniform, backward-LT, then the Dirichlet draws (0 to skip).

    The data-set profiles hold the released settings (`downstream.profiles`, section ``test_agnostic``):
    ImageNet-LT ratios 50 … 2 with a Dirichlet ratio 50 and concentration 1e4, iNat 3, 2 with 3 and 1e5.
    """
    kwargs = {"train_counts": train_counts, "num_classes": num_classes, "seed": seed}
    sets = [resample_test_set(labels, "forward", r, **kwargs) for r in forward]
    sets.append(resample_test_set(labels, "uniform", **kwargs))
    sets += [resample_test_set(labels, "backward", r, **kwargs) for r in backward]
    if dirichlet_draws:
        sets += dirichlet_test_sets(labels, ratio=dirichlet_ratio, draws=dirichlet_draws,
                                    concentration=dirichlet_concentration, **kwargs)
    return sets


def inverse_prior(prior: np.ndarray) -> np.ndarray:
    """The prior's values re-assigned in reversed rank order: the most frequent class gets the rarest value.

    >>> inverse_prior(np.array([0.6, 0.3, 0.1])).tolist()
    [0.1, 0.3, 0.6]
    """
    order = np.argsort(-prior, kind="stable")
    out = np.empty_like(prior)
    out[order] = prior[order[::-1]]
    return out


class DirichletMetaDistribution:
    """DirMixE's meta-distribution of test priors: E = Σ_k p_k·Dir(α0·π_k), k over three components.

    π_1 is the training prior (forward-LT), π_2 uniform, π_3 the inverse prior (`inverse_prior`); α0 =
    `concentration` (1e4 in the CIFAR / ImageNet configs, 1e5 for iNat); p_k = 1/3 (`weights`). Each draw w
    has mean π_k; local variation is largest for rare classes. Zero-count classes get the floored prior
    (`PRIOR_FLOOR`), so every α is positive. Draws are returned as numpy makes them, as in the released code:
    where α0·π_c < 1 (ImageNet / iNat-scale priors) w_c can be far below 1e-8 or exactly 0; DirMixE's loss
    clamps the logit shift, not w (`dirmixe.draw_losses`). Expert k of DirMixE is trained on draws from
    component k only.

    >>> meta = DirichletMetaDistribution([8, 2], concentration=1e4)
    >>> meta.means.round(3).tolist()
    [[0.8, 0.2], [0.5, 0.5], [0.2, 0.8]]
    >>> k, w = meta.sample(4, seed=0)
    >>> w.shape, bool(np.allclose(w.sum(1), 1))
    ((4, 2), True)
    """

    COMPONENTS = ("forward", "uniform", "backward")

    def __init__(self, class_counts, concentration: float = DirMixEConfig.concentration,
                 weights=(1 / 3, 1 / 3, 1 / 3)):
        counts = as_counts(class_counts).numpy()
        prior = np.maximum(counts / counts.sum(), PRIOR_FLOOR)
        prior = prior / prior.sum()
        self.means = np.stack([prior, np.full_like(prior, 1.0 / prior.size), inverse_prior(prior)])
        weights = np.asarray(weights, dtype=np.float64)
        if weights.shape != (3,) or (weights < 0).any() or weights.sum() <= 0:
            raise UserError(f"component weights must be 3 non-negative numbers, got {weights.tolist()}")
        if concentration <= 0:
            raise UserError(f"concentration must be positive, got {concentration}")
        self.weights = weights / weights.sum()
        self.concentration = float(concentration)

    def sample(self, n: int, seed: int | None = None, rng: np.random.Generator | None = None,
               component: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """`n` draws: component ids k [n] and test priors w [n, C] (float64, rows sum to 1).

        `component` fixes k (e.g. to train one expert); otherwise k ~ `weights`.
        """
        rng = np.random.default_rng(seed) if rng is None else rng
        if component is None:
            ks = rng.choice(3, size=n, p=self.weights)
        else:
            ks = np.full(n, int(component))
        w = np.empty((n, self.means.shape[1]))
        for k in range(3):
            rows = ks == k
            if rows.any():
                w[rows] = rng.dirichlet(self.concentration * self.means[k], size=int(rows.sum()))
        return ks, w
