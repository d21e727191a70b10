"""Class ids at an image's own size without resizing every logit map: what scoring at the original resolution needs.

mmsegmentation's rule (`difffeat.data.geometry.to_original`) resizes a head's K logit maps to the image's
H0 × W0 and takes the argmax: K · H0 · W0 values, most of them thrown away. `labels_at_original` gives the very
ids that argmax gives, by two facts about bilinear resizing (weights ≥ 0 that sum to 1):

1. **Classes**: every output pixel's logit vector is a convex combination of grid logits in a small window, so a
   class whose maximum in every window stays below another class's minimum there cannot win anywhere
   (`candidate_classes`). Only the others are resized; each channel is resized on its own, so the kept channels
   are the values the full resize gives, bit for bit.
2. **Pixels** (stretch and pad, the `F.interpolate` placements): an output pixel lies in one cell of the frame
   (two adjacent rows × two adjacent columns) and its logits are a convex combination of the cell's four
   corners. Where one class's minimum over the corners beats every other class's maximum by a margin, the whole
   cell is that class: those pixels are filled by an index gather. The other pixels (along class boundaries) are
   interpolated here in float64 with `F.interpolate`'s own weights (read off by resizing one-hot rows); where the best
   classes of a pixel are closer than float32 rounding could separate, `F.interpolate` itself resizes the classes
   involved, so ties and near-ties are decided by its own values (first maximum) and the ids never differ
   (tests/test_original_resolution.py).

A centre-crop placement (`grid_sample`), and logits on an accelerator, get the class pruning only.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from difffeat.data.geometry import Placement, to_original

if TYPE_CHECKING:
    import torch

MARGIN = 1e-3  # relative to 1 + max |logit|: far above float32 rounding (≈ 1e-7), so every decision is certain


def candidate_classes(logits: torch.Tensor, frame: Sequence[int], margin: float = MARGIN) -> torch.Tensor:
    """Sorted ids of the classes that can be the argmax somewhere after the grid → frame → image resizes of grid
    `logits` ``[K, h, w]`` (the others lose everywhere).

    A frame pixel mixes two adjacent grid rows; frame rows are h / H grid rows apart, and the image's resize (or
    a crop's sampling) mixes two adjacent frame rows, so an output pixel's support lies in a window of
    2 + ceil(h / H) grid rows (the same for columns). In a window W the winner a* has
    ``max_W l_a* ≥ l_a* ≥ l_b ≥ min_W l_b`` for every class b: it is a class whose window maximum reaches
    ``L_W = max_b min_W l_b``. `margin` keeps classes within rounding of that bound: more candidates, never fewer.
    """
    import torch
    import torch.nn.functional as F

    k, h, w = logits.shape
    window = (min(h, 2 + math.ceil(h / frame[0])), min(w, 2 + math.ceil(w / frame[1])))
    x = logits.unsqueeze(0).float()
    high = F.max_pool2d(x, window, stride=1)[0]  # [K, h', w']: each window's maximum per class
    low = -F.max_pool2d(-x, window, stride=1)[0]
    slack = margin * (1.0 + float(logits.abs().max()))
    reach = high >= (low.max(0).values - slack)
    return torch.nonzero(reach.flatten(1).any(1)).flatten()


@functools.lru_cache(maxsize=256)
def _weights(size_in: int, size_out: int):
    """F.interpolate's own bilinear weights along one axis (align_corners False, output size given), read off by
    resizing one-hot rows (each output is then one weight times 1 plus zeros: exact): per output index the two
    input indices and their float32 weights, as float64 tensors."""
    import torch
    import torch.nn.functional as F

    onehot = torch.eye(size_in).view(1, size_in, size_in, 1)  # channel i: 1 at row i
    table = F.interpolate(onehot, size=(size_out, 1), mode="bilinear", align_corners=False)[0, :, :, 0].T
    used = table != 0  # [out, in]: at most two neighbouring inputs per output
    first = used.float().argmax(1)
    last = size_in - 1 - used.flip(1).float().argmax(1)
    w0 = table.gather(1, first[:, None])[:, 0].double()
    w1 = torch.where(last > first, table.gather(1, last[:, None])[:, 0].double(), 0.0)
    return first, last, w0, w1


def _resize_labels(frame: torch.Tensor, size: tuple[int, int], ids: torch.Tensor | None = None) -> torch.Tensor:
    """argmax over classes of ``F.interpolate(frame[None], size, bilinear)`` for `frame` ``[K, h, w]``, by cells
    (module doc, fact 2); channel c is class ``ids[c]`` (ascending; None: c)."""
    import torch
    import torch.nn.functional as F

    k, h, w = frame.shape
    (y0, y1, wy0, wy1), (x0, x1, wx0, wx1) = _weights(h, size[0]), _weights(w, size[1])
    name = (lambda c: c) if ids is None else (lambda c: ids[c])  # channel → class id, on small tensors only
    if k == 1:
        return torch.full(size, int(name(torch.tensor(0))), dtype=torch.long)
    # F.interpolate's own weights times its own frame values: its float32 result is within a few roundings
    # (≈ 2e-7 of the largest logit) of the exact one. `tie`: classes closer than that are asked of F.interpolate;
    # `slack`: a cell whose winner leads by more is decided whatever the rounding.
    scale = 1.0 + float(frame.abs().max())
    tie, slack = 1e-6 * scale, 1e-5 * scale
    # cell (i, j) = rows i, i+1 × columns j, j+1 (the last row and column with themselves): each cell's corner
    # minimum and maximum per class
    edged = torch.cat([frame, frame[:, -1:]], 1)
    edged = torch.cat([edged, edged[:, :, -1:]], 2).float()
    corners = (edged[:, :-1, :-1], edged[:, :-1, 1:], edged[:, 1:, :-1], edged[:, 1:, 1:])
    high = torch.maximum(torch.maximum(corners[0], corners[1]), torch.maximum(corners[2], corners[3]))
    low = torch.minimum(torch.minimum(corners[0], corners[1]), torch.minimum(corners[2], corners[3]))
    floor, winner = low.max(0)
    rival = high.scatter(0, winner[None], float("-inf")).max(0).values
    open_ = floor <= rival + slack  # [h, w]: cells whose winner is not certain
    cell = torch.where(open_, -1, name(winner))
    labels = cell.index_select(1, x0).index_select(0, y0)  # [H0, W0]: whole rows copied
    ci, cj = torch.nonzero(open_, as_tuple=True)
    if not len(ci):
        return labels
    # The output pixels of the open cells: a block of rows × columns each (F.interpolate's first source index is
    # non-decreasing along each axis).
    cells = torch.arange(h), torch.arange(w)
    row_start, row_count = torch.searchsorted(y0, cells[0]), torch.bincount(y0, minlength=h)
    col_start, col_count = torch.searchsorted(x0, cells[1]), torch.bincount(x0, minlength=w)
    per_cell = row_count[ci] * col_count[cj]
    owner = torch.repeat_interleave(torch.arange(len(ci)), per_cell)
    offset = torch.arange(len(owner)) - (torch.cumsum(per_cell, 0) - per_cell)[owner]
    across = col_count[cj][owner]
    ys = row_start[ci][owner] + torch.div(offset, across, rounding_mode="floor")
    xs = col_start[cj][owner] + offset % across
    # their values: the bilinear sum in float64 over the classes that can win in their cell (the m highest corner
    # maxima hold every class whose maximum reaches the cell's floor)
    m = int((high[:, ci, cj] >= (floor[ci, cj] - slack)[None]).sum(0).max())
    options = high[:, ci, cj].topk(m, dim=0).indices if m < k else torch.arange(k)[:, None].expand(k, len(ci))
    classes = options[:, owner]  # [m, n]
    r0, r1, c0, c1 = ci[owner], y1[ys], cj[owner], x1[xs]
    flat, plane = frame.double().reshape(-1), classes * (h * w)
    values = ((flat.take(plane + r0 * w + c0) * wx0[xs] + flat.take(plane + r0 * w + c1) * wx1[xs]) * wy0[ys]
              + (flat.take(plane + r1 * w + c0) * wx0[xs] + flat.take(plane + r1 * w + c1) * wx1[xs]) * wy1[ys])
    best = values.max(0)
    chosen = classes.gather(0, best.indices[None])[0]
    close = values >= (best.values - tie)[None]  # [m, n]: classes float32 rounding could still put first
    unsure = torch.nonzero(close.sum(0) > 1).flatten()
    if len(unsure):  # near-ties: decided by F.interpolate's own values of the classes involved, first maximum
        near, choices = close[:, unsure], classes[:, unsure]
        involved = torch.unique(choices[near])  # sorted
        exact = F.interpolate(frame[None].index_select(1, involved), size=size, mode="bilinear",
                              align_corners=False)[0][:, ys[unsure], xs[unsure]]
        slot = torch.searchsorted(involved, choices)  # each option's row in `involved`
        pixel = torch.arange(len(unsure)).expand_as(slot)
        allowed = torch.zeros(len(involved), len(unsure), dtype=torch.bool)
        allowed[slot[near], pixel[near]] = True
        chosen[unsure] = involved[exact.masked_fill(~allowed, float("-inf")).max(0).indices]
    labels.view(-1)[ys * size[1] + xs] = name(chosen)
    return labels


def labels_at_original(logits: torch.Tensor, frame: Sequence[int], place: Placement, prune: bool = True,
                       margin: float = MARGIN) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Class ids ``[H0, W0]`` of one image: grid `logits` ``[1, K, h, w]`` resized (bilinear) to the `frame`, then to
    the image's own size by `to_original`, argmax (ties to the smaller id); and `to_original`'s covered mask.

    With `prune` (the default) the module doc's two shortcuts give the same ids as ``prune=False`` (every class
    resized to every pixel), at a fraction of the cost (benchmarks/eval_original_resolution.py)."""
    import torch.nn.functional as F

    frame = tuple(int(v) for v in frame)
    keep = candidate_classes(logits[0], frame, margin) if prune else None
    if keep is not None and len(keep) == logits.shape[1]:
        keep = None
    grid = logits if keep is None else logits.index_select(1, keep.to(logits.device))
    at_frame = F.interpolate(grid, size=frame, mode="bilinear", align_corners=False)
    # The cell path is many small tensor steps: worth it on a CPU, where the full resize costs K·H0·W0 values;
    # an accelerator resizes everything in well under a millisecond.
    if prune and place.mode in ("stretch", "pad") and not place.identity and logits.device.type == "cpu":
        inner = at_frame[0]
        if place.mode == "pad":
            top, left, rh, rw = place.pad_region()
            inner = inner[:, top : top + rh, left : left + rw]
        # the classes kept are in ascending order: the first maximum among them is the first among all classes
        return _resize_labels(inner, tuple(place.size), keep), None
    at_size, covered = to_original(at_frame, place)
    # max(1).indices: argmax's ids (the first maximum on ties) at a third of its time on CPU at full size
    ids = at_size.max(1).indices[0]
    if keep is not None:
        ids = keep.to(ids.device)[ids]
    return ids, covered
