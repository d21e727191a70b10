"""Classification data: pooled features from feature stores, paired with image labels (`labels`).

Features: each stored layer ``[C, h, w]`` is average-pooled over space (globally, or onto a G×G grid and
flattened, `pool_grid`), and the layers of one *source* are concatenated. A source is a whole store
(`sources="store"`, the default: every store is one source) or one layer of a store (`sources="layer"`:
layers and timesteps ``layer@t`` become separate sources, as ReconBoost and the weighted fusion need).

Which keys are used: a split given as a key prefix (``train/``) takes every store key under it, and each of
them needs a label; a split given as its own labels CSV takes exactly the CSV's keys. Every labelled key
must be in every store. Either rule broken fails with one line naming the file and a few keys.

Classes: given explicitly (a names file, a JSON list / classes.json, or ``a,b,c``), else from the training
labels (`labels.infer_class_names`). Training needs at least two classes among its labels. A test label
outside the training classes, or of a class with no training sample, fails (naming the file), unless unseen
test samples are dropped on request. A class with zero training samples is reported; the losses floor its
prior (`losses.prior.PRIOR_FLOOR`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from difffeat.errors import UserError
from difffeat.store.feature_store import FeatureStore
from downstream.cls.config import SOURCE_MODES, ClsTrainConfig
from downstream.cls.labels import Labels, encode_labels, infer_class_names, load_class_names, read_labels, some


# ---------------------------------------------------------------------------------------------- features
@dataclass(frozen=True)
class SourceSpec:
    """One feature source: the layers of store number `store` that are pooled and concatenated."""

    name: str  # the store's folder name, or "store:layer"
    store: int
    layers: tuple[str, ...]
    dim: int

    def to_dict(self) -> dict:
        return {"name": self.name, "store": self.store, "layers": list(self.layers), "dim": self.dim}

    @classmethod
    def from_dict(cls, d: dict) -> SourceSpec:
        return cls(d["name"], int(d["store"]), tuple(d["layers"]), int(d["dim"]))


def pool(array: np.ndarray, grid: int = 1) -> np.ndarray:
    """Average-pool a [C, h, w] map over space: [C] (grid 1) or [C·G·G] (adaptive G×G cells, as torch's
    `adaptive_avg_pool2d`, flattened channel-major)."""
    x = np.asarray(array, dtype=np.float64)
    if x.ndim != 3:
        raise UserError(f"expected a [C, h, w] feature map, got shape {x.shape}")
    if grid == 1:
        return x.mean((1, 2))
    c, h, w = x.shape
    rows = [(i * h // grid, -(-(i + 1) * h // grid)) for i in range(grid)]
    cols = [(j * w // grid, -(-(j + 1) * w // grid)) for j in range(grid)]
    cells = [x[:, r0:r1, c0:c1].mean((1, 2)) for r0, r1 in rows for c0, c1 in cols]
    return np.stack(cells, 1).reshape(c * grid * grid)


def open_stores(paths: Sequence[str | os.PathLike]) -> list[FeatureStore]:
    if not paths:
        raise UserError("give at least one feature store")
    return [FeatureStore(p) for p in paths]


def source_specs(stores: Sequence[FeatureStore], layers: Sequence[str] | None = None, sources: str = "store",
                 pool_grid: int = 1) -> list[SourceSpec]:
    """The sources of `stores` (see the module doc); `layers` restricts every store to those layers."""
    if sources not in SOURCE_MODES:
        raise UserError(f"sources must be one of {', '.join(SOURCE_MODES)}, got {sources!r}")
    if pool_grid < 1:
        raise UserError(f"pool_grid must be ≥ 1, got {pool_grid}")
    specs = []
    names = [Path(s.path).name or str(s.path) for s in stores]
    if len(set(names)) < len(names):  # two stores with one folder name: tell them apart by index
        names = [f"{i}:{n}" for i, n in enumerate(names)]
    for i, (store, name) in enumerate(zip(stores, names)):
        if not len(store):
            raise UserError(f"{store.path}: the feature store is empty")
        shapes = store.shapes
        chosen = list(store.layers) if not layers else list(layers)
        missing = [lay for lay in chosen if lay not in shapes]
        if missing:
            raise UserError(f"{store.path}: no layer {missing[0]!r} (layers: {', '.join(store.layers)})")
        dims = {lay: int(shapes[lay][0]) * pool_grid * pool_grid for lay in chosen}
        if sources == "store":
            specs.append(SourceSpec(name, i, tuple(chosen), sum(dims.values())))
        else:
            specs += [SourceSpec(f"{name}:{lay}", i, (lay,), dims[lay]) for lay in chosen]
    return specs


def pooled_features(stores: Sequence[FeatureStore], specs: Sequence[SourceSpec], keys: Sequence[str],
                    pool_grid: int = 1) -> list[np.ndarray]:
    """Per source, the pooled features of `keys`: a list of float32 arrays [N, D_s]."""
    blocks = [np.empty((len(keys), s.dim), np.float32) for s in specs]
    for n, key in enumerate(keys):
        cache: dict[int, dict[str, np.ndarray]] = {}
        for block, spec in zip(blocks, specs):
            if spec.store not in cache:
                cache[spec.store] = stores[spec.store][key]
            maps = cache[spec.store]
            vec = np.concatenate([pool(maps[lay], pool_grid) for lay in spec.layers])
            if vec.shape[0] != spec.dim:
                raise UserError(f"{stores[spec.store].path}: {key!r} has layers of another size than the "
                                f"first image ({vec.shape[0]} pooled values, expected {spec.dim})")
            block[n] = vec
    for block, spec in zip(blocks, specs):
        if not np.isfinite(block).all():
            raise UserError(f"{stores[spec.store].path}: non-finite feature values in source {spec.name!r}")
    return blocks


# ------------------------------------------------------------------------------------------------- split
def _in_split(key: str, split: str | None) -> bool:
    return split is None or key.startswith(split.rstrip("/") + "/")


def select_keys(stores: Sequence[FeatureStore], labels: Labels, split: str | None, explicit: bool) -> list[str]:
    """The keys of one split, checked (see the module doc).

    `explicit`: the labels CSV is this split's own (its keys, under `split` if given); otherwise every store
    key under `split` is taken and must be labelled.
    """
    for store in stores:
        unknown = [k for k in labels if k not in store]
        if unknown:
            raise UserError(f"{labels.path}: {len(unknown)} keys are not in the feature store {store.path} "
                            f"(e.g. {some(unknown)})")
    if explicit:
        keys = sorted(k for k in labels if _in_split(k, split))
    else:
        keys = sorted(k for k in stores[0].keys() if _in_split(k, split))
        unlabelled = [k for k in keys if k not in labels]
        if unlabelled:
            where = f" under {split.rstrip('/')}/" if split else ""
            raise UserError(f"{stores[0].path}: {len(unlabelled)} keys{where} have no label in {labels.path} "
                            f"(e.g. {some(unlabelled)})")
        for store in stores[1:]:
            missing = [k for k in keys if k not in store]
            if missing:
                raise UserError(f"{store.path}: {len(missing)} keys of {stores[0].path} are missing "
                                f"(e.g. {some(missing)})")
    if not keys:
        where = f"under {split.rstrip('/')}/ " if split else ""
        raise UserError(f"{labels.path}: no labelled keys {where}in {stores[0].path}")
    return keys


# ------------------------------------------------------------------------------------------------- data
@dataclass
class ClsData:
    """Pooled features of one split: one block per source, class ids, keys."""

    blocks: list[np.ndarray]  # [N, D_s] float32 per source
    labels: np.ndarray  # [N] int64 class ids
    keys: list[str]
    specs: list[SourceSpec]
    names: list[str]
    report: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def features(self) -> np.ndarray:
        """All sources side by side, [N, ΣD_s]."""
        return np.concatenate(self.blocks, 1)

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.num_classes)


def load_split(features: Sequence[str], labels_file: str, *, split: str | None = None, explicit: bool = False,
               names: Sequence[str] | None = None, layers: Sequence[str] | None = None, sources: str = "store",
               pool_grid: int = 1, specs: Sequence[SourceSpec] | None = None) -> ClsData:
    """Load one split. `names` (the class list) defaults to `infer_class_names` of its labels; `specs`
    (a trained run's sources) are checked against the stores when given."""
    stores = open_stores(features)
    found = source_specs(stores, layers, sources, pool_grid)
    # Stores may be other folders than in training (a test set extracted apart): layers and sizes must match.
    if specs is not None and [(s.store, s.layers, s.dim) for s in found] != [(s.store, s.layers, s.dim) for s in specs]:
        raise UserError(f"{', '.join(map(str, features))}: features differ from the run's "
                        f"(run: {[(s.layers, s.dim) for s in specs]}, given: {[(s.layers, s.dim) for s in found]})")
    labels = read_labels(labels_file)
    keys = select_keys(stores, labels, split, explicit)
    names = list(names) if names is not None else infer_class_names(labels, keys)
    ids = encode_labels(labels, keys, names)
    blocks = pooled_features(stores, found, keys, pool_grid)
    return ClsData(blocks, ids, keys, list(found), list(names),
                   {"labels": str(labels_file), "split": split, "images": len(keys)})


def check_test_classes(test: ClsData, train_counts: np.ndarray, where: str, drop_unseen: bool = False) -> ClsData:
    """Refuse (or, with `drop_unseen`, drop and report) test samples of classes with no training sample."""
    unseen = sorted({int(c) for c in np.unique(test.labels) if train_counts[c] == 0})
    if not unseen:
        return test
    names = [test.names[c] for c in unseen]
    if not drop_unseen:
        raise UserError(f"{where}: test labels of classes absent from training: {some(names)} "
                        "(evaluate without them: drop_unseen, --drop-unseen)")
    keep = ~np.isin(test.labels, unseen)
    report = {**test.report, "dropped_unseen": {"classes": names, "images": int((~keep).sum())}}
    return ClsData([b[keep] for b in test.blocks], test.labels[keep], [k for k, m in zip(test.keys, keep) if m],
                   test.specs, test.names, report)


# ------------------------------------------------------------------------------------- a run's splits
def load_train_data(config: ClsTrainConfig) -> ClsData:
    """The training split of a run; it must hold at least two classes (one class cannot be classified)."""
    names = load_class_names(config.classes) if config.classes is not None else None
    train = load_split(config.features, config.labels, split=config.split, explicit=config.test_labels is not None,
                       names=names, layers=config.layers, sources=config.sources, pool_grid=config.pool_grid)
    present = np.unique(train.labels)
    if present.size < 2:
        raise UserError(f"{config.labels}: all {len(train)} training labels are of one class "
                        f"({train.names[int(present[0])]!r}); a classifier needs at least 2 classes")
    return train


def load_test_data(config: ClsTrainConfig, train: ClsData) -> ClsData | None:
    """The test split of a training run (None without a test split or test labels), checked against training."""
    if config.test_labels is None and config.test_split is None:
        return None
    file = config.test_labels or config.labels
    test = load_split(config.features, file, split=config.test_split, explicit=config.test_labels is not None,
                      names=train.names, layers=config.layers, sources=config.sources, pool_grid=config.pool_grid,
                      specs=train.specs)
    overlap = sorted(set(test.keys) & set(train.keys))
    if overlap:
        raise UserError(f"{file}: {len(overlap)} test keys are also training keys (e.g. {overlap[0]!r})")
    return check_test_classes(test, train.counts(), file, config.drop_unseen)
