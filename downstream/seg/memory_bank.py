"""AUCSeg's Tail-Classes Memory Bank (T-Memory Bank; research/aucseg_dirmixe.md A.6), in two forms.

Per tail class the bank keeps up to `capacity` objects seen in training samples; once full, a new object
overwrites a uniformly random slot (random replacement, not FIFO). For each sample, `ceil(sample_ratio ·
|missing|)` of the tail classes absent from it are picked at random, and for each a stored object is
pasted in at a random place, overwriting the sample *only on the object's pixels*. Storing happens
before pasting, as in the original. The point is to make tail classes present in almost every batch, so
that the pixel AUC loss sees (and estimates) their class pairs.

- `ImageMemoryBank`: the original, on one sample's image tensor and label, for online feature extraction.
  Unlike the original, stored canvases are copies and pasting writes into new tensors, so a stored
  object is never contaminated by objects pasted later into the same sample (quirk 1 of A.6).
- `FeatureMemoryBank`: the same for stored features: it keeps the object's feature patches (every
  layer, at the layer's grid) with its mask, and pastes them into the sample's feature maps and label.
  Offsets are whole feature cells, so patches land on the grid; a feature cell is replaced where the
  object covers at least `min_cell_fraction` of it, a label pixel where the object is. Objects keep their
  scale (a feature patch cannot be resized faithfully), and there is no context mixing beyond the cells.

Both banks are seeded (`seed`) and keep their state on the CPU or the device of what they are given.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F


class _TailBank:
    """Slots per tail class, random replacement, and the choice of classes to paste."""

    def __init__(self, tail_classes: Iterable[int], capacity: int = 5, sample_ratio: float = 1.0, seed: int = 0):
        if capacity < 1:
            raise ValueError(f"memory bank capacity must be ≥ 1, got {capacity}")
        if not 0.0 <= sample_ratio <= 1.0:
            raise ValueError(f"sample_ratio must be in [0, 1], got {sample_ratio}")
        self.tail = sorted({int(c) for c in tail_classes})
        self.capacity, self.sample_ratio = capacity, sample_ratio
        self.slots: dict[int, list] = {c: [] for c in self.tail}
        self.rng = np.random.default_rng(seed)

    def sizes(self) -> dict[int, int]:
        """Tail class → objects stored."""
        return {c: len(s) for c, s in self.slots.items()}

    def _add(self, c: int, entry) -> None:
        slots = self.slots[c]
        if len(slots) < self.capacity:
            slots.append(entry)
        else:
            slots[int(self.rng.integers(self.capacity))] = entry

    def _present(self, label: torch.Tensor) -> set[int]:
        return set(torch.unique(label).tolist()) & set(self.tail)

    def _picks(self, present: set[int]) -> list[int]:
        missing = [c for c in self.tail if c not in present]
        k = math.ceil(self.sample_ratio * len(missing))
        return [missing[i] for i in self.rng.choice(len(missing), size=k, replace=False)] if k else []

    def _draw(self, c: int):
        slots = self.slots[c]
        return slots[int(self.rng.integers(len(slots)))] if slots else None


class ImageMemoryBank(_TailBank):
    """The original image-space T-Memory Bank: ``image, label = bank(image, label)`` per training sample.

    `image` is ``[C, H, W]`` (any float tensor, e.g. normalised RGB), `label` ``[H, W]`` class ids. A stored
    object is the whole canvas (a copy) with its class mask; at paste time the canvas is resized by
    `resize_ratio` (image bilinear, mask nearest) and placed at a uniformly random offset (inside the
    image when it fits, else a random crop of it), and image and label change only on the object's pixels.
    """

    def __init__(self, tail_classes: Iterable[int], capacity: int = 5, sample_ratio: float = 1.0,
                 resize_ratio: float = 1.0, seed: int = 0):
        super().__init__(tail_classes, capacity, sample_ratio, seed)
        if resize_ratio <= 0:
            raise ValueError(f"resize_ratio must be > 0, got {resize_ratio}")
        self.resize_ratio = resize_ratio

    def store(self, image: torch.Tensor, label: torch.Tensor) -> None:
        present = self._present(label)
        if present:
            canvas = image.detach().clone()  # one copy shared by this sample's objects; never written
            for c in sorted(present):
                self._add(c, (canvas, label == c))

    def paste(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = image.clone(), label.clone()
        big_h, big_w = label.shape[-2:]
        for c in self._picks(self._present(label)):
            entry = self._draw(c)
            if entry is None:
                continue
            canvas, obj = entry
            if self.resize_ratio != 1.0:
                canvas = F.interpolate(canvas[None].float(), scale_factor=self.resize_ratio, mode="bilinear",
                                       align_corners=False)[0].to(canvas.dtype)
                obj = F.interpolate(obj[None, None].float(), size=canvas.shape[-2:], mode="nearest")[0, 0].bool()
            h, w = obj.shape
            oy = int(self.rng.integers(min(0, big_h - h), max(0, big_h - h) + 1))
            ox = int(self.rng.integers(min(0, big_w - w), max(0, big_w - w) + 1))
            ty0, tx0, ty1, tx1 = max(oy, 0), max(ox, 0), min(oy + h, big_h), min(ox + w, big_w)
            src = (slice(ty0 - oy, ty1 - oy), slice(tx0 - ox, tx1 - ox))
            m = obj[src].to(label.device)
            image[:, ty0:ty1, tx0:tx1][:, m] = canvas[:, src[0], src[1]][:, m].to(image.device, image.dtype)
            label[ty0:ty1, tx0:tx1][m] = c
        return image, label

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.store(image, label)
        return self.paste(image, label)


class FeatureMemoryBank(_TailBank):
    """T-Memory Bank for stored features: ``features, label = bank(features, label)`` per training sample.

    `features` is a list of ``[C_i, h_i, w_i]`` maps whose grids divide the label's ``[H, W]``. A stored
    object is its class mask cropped to its bounding box (widened to whole cells of every layer) and the
    matching feature patches of every layer (copies).
    """

    def __init__(self, tail_classes: Iterable[int], capacity: int = 5, sample_ratio: float = 1.0,
                 min_cell_fraction: float = 0.5, seed: int = 0):
        super().__init__(tail_classes, capacity, sample_ratio, seed)
        if not 0.0 < min_cell_fraction <= 1.0:
            raise ValueError(f"min_cell_fraction must be in (0, 1], got {min_cell_fraction}")
        self.min_cell_fraction = min_cell_fraction

    @staticmethod
    def _scales(features: Sequence[torch.Tensor], size: tuple[int, int]) -> tuple[list[tuple[int, int]], int, int]:
        big_h, big_w = size
        scales = []
        for f in features:
            h, w = f.shape[-2:]
            if big_h % h or big_w % w:
                raise ValueError(f"feature grid {h}×{w} does not divide the mask size {big_h}×{big_w}; "
                                 "the feature memory bank needs whole cells")
            scales.append((big_h // h, big_w // w))
        uy = math.lcm(*(s[0] for s in scales)) if scales else 1
        ux = math.lcm(*(s[1] for s in scales)) if scales else 1
        return scales, uy, ux

    def store(self, features: Sequence[torch.Tensor], label: torch.Tensor) -> None:
        present = self._present(label)
        if not present:
            return
        scales, uy, ux = self._scales(features, tuple(label.shape[-2:]))
        for c in sorted(present):
            obj = label == c
            rows, cols = obj.any(1).nonzero()[:, 0], obj.any(0).nonzero()[:, 0]
            y0, y1 = int(rows[0]) // uy * uy, -(-(int(rows[-1]) + 1) // uy) * uy
            x0, x1 = int(cols[0]) // ux * ux, -(-(int(cols[-1]) + 1) // ux) * ux
            crops = [f[:, y0 // sy: y1 // sy, x0 // sx: x1 // sx].detach().clone()
                     for f, (sy, sx) in zip(features, scales)]
            self._add(c, (obj[y0:y1, x0:x1].clone(), crops))

    def paste(self, features: Sequence[torch.Tensor], label: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        features, label = [f.clone() for f in features], label.clone()
        big_h, big_w = label.shape[-2:]
        scales, uy, ux = self._scales(features, (big_h, big_w))
        for c in self._picks(self._present(label)):
            entry = self._draw(c)
            if entry is None:
                continue
            obj, crops = entry
            h, w = obj.shape
            if h > big_h or w > big_w:  # stored from a larger mask: it cannot fit
                continue
            oy = uy * int(self.rng.integers((big_h - h) // uy + 1))
            ox = ux * int(self.rng.integers((big_w - w) // ux + 1))
            label[oy:oy + h, ox:ox + w][obj.to(label.device)] = c
            for f, crop, (sy, sx) in zip(features, crops, scales):
                cells = F.avg_pool2d(obj[None, None].float(), (sy, sx))[0, 0] >= self.min_cell_fraction
                cells = cells.to(f.device)  # a restored bank lives on the CPU; the batch may not
                target = f[:, oy // sy: (oy + h) // sy, ox // sx: (ox + w) // sx]  # a view: writes go to f
                target[:, cells] = crop.to(f.device, f.dtype)[:, cells]
        return features, label

    def __call__(self, features: Sequence[torch.Tensor], label: torch.Tensor) -> tuple[list[torch.Tensor],
                                                                                      torch.Tensor]:
        self.store(features, label)
        return self.paste(features, label)

    def apply_batch(self, features: Sequence[torch.Tensor], labels: torch.Tensor) -> tuple[list[torch.Tensor],
                                                                                            torch.Tensor]:
        """The bank on every sample of a batch (``[B, C_i, h_i, w_i]`` maps, ``[B, H, W]`` labels), in order."""
        out_f = [f.clone() for f in features]
        out_y = labels.clone()
        for b in range(labels.shape[0]):
            fs, y = self([f[b] for f in features], labels[b])
            for o, f in zip(out_f, fs):
                o[b] = f
            out_y[b] = y
        return out_f, out_y

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, JSON-able metadata) that `load_state_dict` restores exactly (for resumed runs)."""
        tensors = {}
        for c, slots in self.slots.items():
            for j, (obj, crops) in enumerate(slots):
                tensors[f"{c}.{j}.mask"] = obj.cpu().contiguous()
                for i, crop in enumerate(crops):
                    tensors[f"{c}.{j}.f{i}"] = crop.cpu().contiguous()
        meta = {"sizes": {str(c): len(s) for c, s in self.slots.items()},
                "layers": max((len(s[0][1]) for s in self.slots.values() if s), default=0),
                "rng": self.rng.bit_generator.state}
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        layers = int(meta["layers"])
        self.slots = {c: [] for c in self.tail}
        for c_str, n in meta["sizes"].items():
            c = int(c_str)
            self.slots[c] = [(tensors[f"{c}.{j}.mask"].bool(), [tensors[f"{c}.{j}.f{i}"] for i in range(layers)])
                             for j in range(int(n))]
        self.rng.bit_generator.state = meta["rng"]
