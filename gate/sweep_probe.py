"""How `difffeat sweep` scores one configuration's features: channel reduction, a cheap probe fed image by
image, and a bootstrap interval over the scored images.

- **Reduction** keeps memory flat whatever a layer's width: a layer with more than `width` channels is
  mapped to `width` by a fixed random projection (Gaussian, seeded by the sweep seed and the layer name, so a
  layer is projected the same way at every timestep and variant) or by PCA fitted on the first batch of
  images a configuration sees; a narrower layer is kept as it is (a projection could only lose information).
- **Segmentation** (masks): a ridge probe on the cells of the layer's own grid, each cell labelled by the
  majority of its mask pixels. The fit images enter only through running sums (ΣxxT, ΣxyT, …), so they
  are never kept; the scored images' reduced maps are kept to predict once the fit is final. Predictions
  (class scores) are upsampled bilinearly to the mask size, so layers of every grid are scored on the same
  pixels: the per-image confusion matrix against the full-size mask.
- **Classification** (image labels): ridge, multinomial logistic regression or cosine kNN on pooled features.
- **Interval**: mIoU (from summed confusion matrices) or accuracy over the scored images, with a percentile
  bootstrap over those images (`gate.stats`); one resample shared by every configuration pairs them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from difffeat.errors import UserError
from difffeat.extraction.extract import item_seed
from gate.probe import ridge_fit, ridge_predict
from gate.stats import Interval, Statistic, bootstrap
from gate.sweep_labels import IGNORE, grid_labels

PROBES = {"seg": ("ridge",), "cls": ("ridge", "logistic", "knn")}
KNN_K = 5


# ------------------------------------------------------------------------------------------ reduction
class Reducer:
    """Maps [B, C, h, w] features of a configuration to at most `width` channels (see the module doc)."""

    def __init__(self, method: str = "random", width: int = 64, seed: int = 0):
        if method not in ("random", "pca"):
            raise UserError(f"reduce: must be random or pca, got {method!r}")
        self.method, self.width, self.seed = method, width, seed
        self.bases: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # config id → (mean [C], basis [C, D])

    def projection(self, layer: str, channels: int) -> torch.Tensor:
        """The fixed random projection [C, width] of `layer` (scaled so that distances are kept on average)."""
        gen = torch.Generator().manual_seed(item_seed(self.seed, layer, "projection"))
        return torch.randn(channels, self.width, generator=gen) / self.width ** 0.5

    def __call__(self, config: str, layer: str, fmap: torch.Tensor) -> torch.Tensor:
        fmap = fmap.float()
        if fmap.shape[1] <= self.width:
            return fmap
        if self.method == "random":
            return torch.einsum("bchw,cd->bdhw", fmap, self.projection(layer, fmap.shape[1]))
        if config not in self.bases:  # fitted once, on the first batch, then frozen so that sums add up
            rows = fmap.permute(0, 2, 3, 1).reshape(-1, fmap.shape[1]).double()
            mean = rows.mean(0)
            _, vecs = torch.linalg.eigh(torch.cov(rows.T, correction=0))
            basis = vecs.flip(1)[:, : self.width]
            basis = basis * torch.where(basis.sum(0) < 0, -1.0, 1.0)  # eigenvector signs made deterministic
            self.bases[config] = (mean.float(), basis.float())
        mean, basis = self.bases[config]
        return torch.einsum("bchw,cd->bdhw", fmap - mean[None, :, None, None], basis)

    def state(self) -> dict[str, torch.Tensor]:
        return {f"{cid}|{part}": t for cid, pair in self.bases.items() for part, t in zip(("mean", "basis"), pair)}

    def load_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            cid, part = name.rsplit("|", 1)
            mean, basis = self.bases.get(cid, (None, None))
            self.bases[cid] = (t, basis) if part == "mean" else (mean, t)


# ------------------------------------------------------------------------------------------ targets
class Targets:
    """Per image (by position in the sweep's image list): its mask [H, W] (seg) or class id (cls); masks reduced
    to each feature grid once."""

    def __init__(self, task: str, values: Sequence, n_classes: int):
        self.task, self.values, self.n_classes = task, list(values), n_classes
        self._grids: dict[tuple[int, tuple[int, int]], np.ndarray] = {}

    def grid(self, index: int, hw: tuple[int, int]) -> np.ndarray:
        key = (index, tuple(hw))
        if key not in self._grids:
            self._grids[key] = grid_labels(self.values[index], tuple(hw), self.n_classes)
        return self._grids[key]


@dataclass(frozen=True)
class ProbeSpec:
    """How configurations are probed and scored."""

    task: str  # seg | cls
    n_classes: int
    method: str = "ridge"
    lam: float = 1e-3  # ridge / logistic L2 strength, scaled by the number of rows
    n_boot: int = 1000
    level: float = 0.95
    seed: int = 0

    def __post_init__(self):
        if self.method not in PROBES[self.task]:
            raise UserError(f"probe: {self.method!r} does not score {'masks' if self.task == 'seg' else 'labels'}; "
                            f"use {' or '.join(PROBES[self.task])}")


# ------------------------------------------------------------------------------------------ probes
def population_std(var: np.ndarray) -> np.ndarray:
    """The std `gate.probe.ridge_fit` divides by (population std + 1e-6), from variances."""
    return np.sqrt(np.maximum(var, 0.0)) + 1e-6


class SegProbe:
    """Ridge regression of one-hot cell labels on reduced features, accumulated image by image.

    Solves exactly `gate.probe.ridge_fit`'s system, ``W = (XsᵀXs + λ·N·I)⁻¹ XsᵀY`` with Xs the standardised
    rows plus a bias column, from the sums N, Σx, ΣxxT, ΣxyT, Σy (Xsᵀ1 = 0, so the bias decouples)."""

    def __init__(self, dim: int, n_classes: int):
        self.dim, self.k = dim, n_classes
        self.n = 0.0
        self.sx, self.sy = np.zeros(dim), np.zeros(n_classes)
        self.sxx, self.sxy = np.zeros((dim, dim)), np.zeros((dim, n_classes))
        self.scored: list[int] = []
        self.kept: list[np.ndarray] = []  # reduced maps [D, h, w] of the scored images

    def add(self, index: int, role: str, fmap: torch.Tensor, targets: Targets) -> None:
        fmap = fmap.numpy() if isinstance(fmap, torch.Tensor) else fmap
        if role == "score":
            self.scored.append(index)
            self.kept.append(np.ascontiguousarray(fmap, dtype=np.float32))
            return
        labels = targets.grid(index, fmap.shape[1:]).reshape(-1)
        x = fmap.reshape(fmap.shape[0], -1).T.astype(np.float64)[labels != IGNORE]
        y = labels[labels != IGNORE]
        onehot = np.eye(self.k)[y]
        self.n += len(x)
        self.sx += x.sum(0)
        self.sy += onehot.sum(0)
        self.sxx += x.T @ x
        self.sxy += x.T @ onehot

    def solve(self, lam: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(W [D, K], bias [K], mean, std) of the ridge fit on every fit cell so far."""
        n = self.n
        if n < 1:
            raise UserError("the probe has no labelled fit pixels (are all masks 255 = ignore?)")
        mean = self.sx / n
        std = population_std(np.diag(self.sxx) / n - mean**2)
        gram = (self.sxx - n * np.outer(mean, mean)) / np.outer(std, std)
        rhs = (self.sxy - np.outer(mean, self.sy)) / std[:, None]
        w = np.linalg.solve(gram + lam * n * np.eye(self.dim), rhs)
        bias = self.sy / (n + lam * n)
        return w, bias, mean, std

    def per_image(self, spec: ProbeSpec, targets: Targets) -> np.ndarray:
        """Confusion matrices [n_scored, K, K] (rows: true class, columns: predicted) at full mask size."""
        w, bias, mean, std = self.solve(spec.lam)
        k = self.k
        out = np.zeros((len(self.scored), k, k), dtype=np.int64)
        for row, (index, fmap) in enumerate(zip(self.scored, self.kept)):
            d, h, wd = fmap.shape
            scores = ((fmap.reshape(d, -1).T - mean) / std) @ w + bias  # [h·w, K]
            mask = targets.values[index]
            up = F.interpolate(torch.from_numpy(scores.T.reshape(1, k, h, wd)), size=mask.shape, mode="bilinear",
                               align_corners=False)[0]
            pred = up.argmax(0).numpy().reshape(-1)
            target = mask.reshape(-1)
            keep = target != IGNORE
            out[row] = np.bincount(target[keep] * k + pred[keep], minlength=k * k).reshape(k, k)
        return out

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {"sx": self.sx, "sy": self.sy, "sxx": self.sxx, "sxy": self.sxy}
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}
        if self.kept:
            tensors["kept"] = torch.from_numpy(np.stack(self.kept))
        return tensors, {"n": self.n, "scored": self.scored}

    def load_state(self, tensors: Mapping[str, torch.Tensor], meta: Mapping) -> None:
        self.sx, self.sy = tensors["sx"].numpy(), tensors["sy"].numpy()
        self.sxx, self.sxy = tensors["sxx"].numpy(), tensors["sxy"].numpy()
        self.n, self.scored = float(meta["n"]), list(meta["scored"])
        self.kept = list(tensors["kept"].numpy()) if "kept" in tensors else []


class ClsProbe:
    """A classifier on pooled features (mean over the grid); every image's pooled vector [D] is kept (small)."""

    def __init__(self, dim: int, n_classes: int):
        self.dim, self.k = dim, n_classes
        self.rows: dict[str, list[int]] = {"fit": [], "score": []}
        self.x: dict[str, list[np.ndarray]] = {"fit": [], "score": []}

    @property
    def scored(self) -> list[int]:
        return self.rows["score"]

    def add(self, index: int, role: str, fmap: torch.Tensor, targets: Targets) -> None:
        pooled = fmap.float().mean((1, 2)) if isinstance(fmap, torch.Tensor) else fmap.mean((1, 2))
        self.rows[role].append(index)
        self.x[role].append(np.asarray(pooled, dtype=np.float64))

    def per_image(self, spec: ProbeSpec, targets: Targets) -> np.ndarray:
        """1.0 where a scored image's class is predicted right, else 0.0 [n_scored]."""
        y = np.asarray(targets.values)
        xf, yf = np.stack(self.x["fit"]), y[self.rows["fit"]]
        xs, ys = np.stack(self.x["score"]), y[self.rows["score"]]
        if spec.method == "ridge":
            pred = ridge_predict(ridge_fit(xf, np.eye(self.k)[yf], spec.lam), xs)
        elif spec.method == "logistic":
            pred = logistic_predict(xf, yf, xs, self.k, spec.lam)
        else:
            pred = knn_predict(xf, yf, xs)
        return (pred == ys).astype(np.float64)

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {f"x_{r}": torch.from_numpy(np.stack(v)) for r, v in self.x.items() if v}
        return tensors, {"rows": self.rows}

    def load_state(self, tensors: Mapping[str, torch.Tensor], meta: Mapping) -> None:
        self.rows = {r: list(v) for r, v in meta["rows"].items()}
        self.x = {r: list(tensors[f"x_{r}"].numpy()) if f"x_{r}" in tensors else [] for r in ("fit", "score")}


def new_probe(spec: ProbeSpec, dim: int) -> SegProbe | ClsProbe:
    return (SegProbe if spec.task == "seg" else ClsProbe)(dim, spec.n_classes)


def logistic_predict(xf: np.ndarray, yf: np.ndarray, xs: np.ndarray, k: int, lam: float,
                     steps: int = 100) -> np.ndarray:
    """Multinomial logistic regression on standardised features: minimise mean cross-entropy + λ·‖W‖²
    (full-batch L-BFGS from zero, deterministic); returns the predicted classes of `xs`."""
    mean, std = xf.mean(0), xf.std(0) + 1e-6
    a = torch.from_numpy((xf - mean) / std)
    b = torch.from_numpy((xs - mean) / std)
    target = torch.from_numpy(yf).long()
    w = torch.zeros(a.shape[1], k, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(a @ w + bias, target) + lam * (w**2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return (b @ w + bias).argmax(1).detach().numpy()


def knn_predict(xf: np.ndarray, yf: np.ndarray, xs: np.ndarray, k: int = KNN_K) -> np.ndarray:
    """Majority label of the k nearest fit images by cosine similarity of standardised features; a tie goes to
    the tied class with the nearest member."""
    mean, std = xf.mean(0), xf.std(0) + 1e-6
    a, b = (xf - mean) / std, (xs - mean) / std
    a /= np.linalg.norm(a, axis=1, keepdims=True) + 1e-12
    b /= np.linalg.norm(b, axis=1, keepdims=True) + 1e-12
    sim = b @ a.T
    k = min(k, len(a))
    order = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    pred = np.empty(len(b), dtype=np.int64)
    for i, nearest in enumerate(order):
        votes = np.bincount(yf[nearest], minlength=int(yf.max()) + 1)
        tied = set(np.flatnonzero(votes == votes.max()))
        pred[i] = next(int(yf[j]) for j in nearest if yf[j] in tied)
    return pred


# ------------------------------------------------------------------------------------------ scores
def miou_from_confusion(conf: np.ndarray) -> np.ndarray:
    """mIoU of confusion matrices [..., K, K] (rows true, columns predicted) over the classes present in the
    targets: ``IoU_c = TP / (TP + FP + FN)``, the same as `gate.probe.mean_iou` on the pixels behind them."""
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diagonal(conf, axis1=-2, axis2=-1)
    true, pred = conf.sum(-1), conf.sum(-2)
    present = true > 0
    iou = np.where(present, tp / np.where(present, true + pred - tp, 1.0), 0.0)
    return iou.sum(-1) / np.maximum(present.sum(-1), 1)


def resample_weights(idx: np.ndarray, n: int) -> np.ndarray:
    """How often each of n images is drawn in each resample: [B, n] counts from indices [B, n]."""
    weights = np.zeros((len(idx), n))
    np.add.at(weights, (np.repeat(np.arange(len(idx)), idx.shape[1]), idx.reshape(-1)), 1.0)
    return weights


def statistic(task: str, per_image: np.ndarray) -> Statistic:
    """The probe score of resampled images: mIoU of their summed confusion matrices (seg; a ratio of sums,
    so that one small image cannot dominate), or mean accuracy (cls)."""
    per_image = np.asarray(per_image, dtype=np.float64)
    if task == "cls":
        return lambda idx: per_image[idx].mean(axis=1)
    n, k = per_image.shape[0], per_image.shape[1]
    flat = per_image.reshape(n, k * k)
    return lambda idx: miou_from_confusion((resample_weights(idx, n) @ flat).reshape(-1, k, k))


def interval(spec: ProbeSpec, per_image: np.ndarray, idx: np.ndarray) -> Interval:
    return bootstrap(statistic(spec.task, per_image), idx, spec.level)


def score_features(spec: ProbeSpec, features: Mapping[str, torch.Tensor], targets: Targets,
                   roles: Sequence[str], reducer: Reducer | None = None, idx: np.ndarray | None = None,
                   ) -> dict[str, tuple[Interval, np.ndarray]]:
    """Score whole feature tensors {name: [N, C, h, w]} of the images of `targets` (roles[i]: "fit" or "score"):
    {name: (interval, per-image values)}. What the sweep does incrementally, in one call (tests, greedy)."""
    from gate.stats import resample

    reducer = reducer or Reducer(width=10**9)
    out = {}
    for name, feats in features.items():
        reduced = reducer(name, name, feats)
        probe = new_probe(spec, reduced.shape[1])
        for i, role in enumerate(roles):
            probe.add(i, role, reduced[i], targets)
        per_image = probe.per_image(spec, targets)
        draw = idx if idx is not None else resample(len(per_image), spec.n_boot, spec.seed)
        out[name] = (interval(spec, per_image, draw), per_image)
    return out
