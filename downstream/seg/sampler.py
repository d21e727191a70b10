"""Batch samplers of train-seg: the seeded random stream, or class-aware batches in which every class present in
the training masks appears.

The pixel AUC loss pairs the classes present in a batch (research/aucseg_dirmixe.md A.2, A.4): a class absent
from a batch contributes no pair, and its AUC terms are then never estimated. AUCSeg's released code draws
batches with mmseg's plain (distributed) random sampler and brings the tail classes into each sample with its
T-Memory Bank. The class-aware sampler brings every class into each batch instead, by choosing the images:

    for each class c, rarest first (fewest images holding it): if no image chosen so far holds c, add an image
    drawn uniformly from those that hold c; then fill the batch with images drawn uniformly from the rest.

A batch is a pure function of (seed, global batch number) (`downstream.engine.BatchStream` takes it as its
`indices`), so a resumed run and every process of a launch see the same stream. When the batch is too small for
one image per needed class, the rarest classes are covered first and the commonest may be missing (a warning
says so once).
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Sequence

import numpy as np

SAMPLERS = ("random", "class-aware")


def image_classes(dataset) -> list[np.ndarray]:
    """The classes each image's mask holds (`dataset.mask(i)`; the ignore label left out), as sorted id arrays."""
    ignore = dataset.classes.ignore_index
    out = []
    for i in range(len(dataset)):
        ids = np.unique(dataset.mask(i).numpy())
        out.append(ids[ids != ignore].astype(np.int64))
    return out


class ClassAwareBatches:
    """``batches(iteration) → indices``: a batch of `batch_size` distinct images (all of them when there are fewer)
    holding every class of `classes_per_image` (see the module doc).

    >>> batches = ClassAwareBatches([[0], [0], [0, 1], [0], [2]], batch_size=2, seed=0)
    >>> sorted(batches(0)), sorted(batches(7))  # classes 1 and 2 live in one image each: both always there
    ([2, 4], [2, 4])
    """

    def __init__(self, classes_per_image: Sequence[Sequence[int]], batch_size: int, seed: int = 0):
        self.image_classes = [frozenset(int(c) for c in ids) for ids in classes_per_image]
        self.n = len(self.image_classes)
        if self.n == 0:
            raise ValueError("class-aware batches need at least one image")
        self.size = min(int(batch_size), self.n)
        self.seed = seed
        holders: dict[int, list[int]] = {}
        for i, ids in enumerate(self.image_classes):
            for c in ids:
                holders.setdefault(c, []).append(i)
        self.holders = {c: np.asarray(v) for c, v in holders.items()}
        self.order = sorted(self.holders, key=lambda c: (len(self.holders[c]), c))  # rarest first
        self.warned = False

    def __call__(self, iteration: int) -> list[int]:
        rng = np.random.default_rng([self.seed, int(iteration), zlib.crc32(b"class-aware")])
        chosen: list[int] = []
        covered: set[int] = set()
        for c in self.order:
            if c in covered:
                continue
            if len(chosen) == self.size:
                self._warn(c)
                break
            i = int(rng.choice(self.holders[c]))  # none of c's holders is chosen yet, or c would be covered
            chosen.append(i)
            covered |= self.image_classes[i]
        rest = np.setdiff1d(np.arange(self.n), chosen)
        fill = rng.choice(rest, size=self.size - len(chosen), replace=False) if len(chosen) < self.size else []
        batch = np.concatenate([np.asarray(chosen, dtype=np.int64), np.asarray(fill, dtype=np.int64)])
        return rng.permutation(batch).tolist()

    def classes_in(self, batch: Sequence[int]) -> set[int]:
        """The classes the images of `batch` hold together."""
        return set().union(*(self.image_classes[i] for i in batch))

    def _warn(self, first_missing: int) -> None:
        if not self.warned:
            warnings.warn(f"class-aware batches of {self.size} images cannot hold every class (class {first_missing} "
                          "and commoner ones may be missing); raise the batch size", stacklevel=3)
            self.warned = True


def batch_indices_for(config, dataset):
    """The `indices` callable of train-seg's `BatchStream` for `config.sampler`: None for the random stream
    (`downstream.engine.batch_indices`), class-aware batches over `dataset`'s masks otherwise."""
    if config.sampler == "random":
        return None
    return ClassAwareBatches(image_classes(dataset), config.batch_size, config.seed)
