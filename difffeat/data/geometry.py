"""Where an input image lies in the frame the model saw: what evaluation needs to map predictions back.

Extraction brings every image to one frame (H, W) (`difffeat.data.images.resize_image`): stretched, scaled to
cover it and centre-cropped, or scaled to fit inside it and padded. A `Placement` records, per image, its own
size (H0, W0) and the box (x0, y0, x1, y1) in the image's pixel coordinates that the frame's full extent covers
(outside the image for padding, inside it for a crop). The box is computed here with the very arithmetic Pillow's
`ImageOps.fit` / `ImageOps.pad` use, so the recorded box and the pixels the model saw agree exactly.

`to_original` takes logits in the frame back to the image's own pixels the way mmsegmentation does it: padding
stripped, then a bilinear resize (align_corners False) to H0 × W0. A centre crop saw only part of the image: the
pixels it did not see are returned as not covered, and scoring leaves them out (and counts them).
Scoring does not resize logits itself: `difffeat.data.original_labels` gives argmax's ids over `to_original`'s
output without computing all of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

RESIZE_MODES = ("center-crop", "pad", "stretch")


@dataclass(frozen=True)
class Placement:
    """Image `size` = (H0, W0) shown in `frame` = (H, W) by `mode`; `box` = (x0, y0, x1, y1) in image pixels."""

    size: tuple[int, int]
    frame: tuple[int, int]
    mode: str
    box: tuple[float, float, float, float]

    @property
    def identity(self) -> bool:
        """The image is the frame, pixel for pixel (no resize was made)."""
        return tuple(self.size) == tuple(self.frame)

    def to_dict(self) -> dict:
        return {"size": list(self.size), "box": [round(v, 6) for v in self.box]}

    def pad_region(self) -> tuple[int, int, int, int]:
        """(top, left, height, width) of the image inside a padded frame (integer, as Pillow pasted it)."""
        (h0, w0), (h, w) = self.size, self.frame
        rw, rh = contained_size((w0, h0), (w, h))
        if rw != w:
            return 0, round((w - rw) * 0.5), h, rw
        return round((h - rh) * 0.5), 0, rh, w


def contained_size(image: tuple[int, int], frame: tuple[int, int]) -> tuple[int, int]:
    """(width, height) Pillow's `ImageOps.contain` gives an image of (width, height) `image` inside `frame`."""
    (iw, ih), (w, h) = image, frame
    im_ratio, dest_ratio = iw / ih, w / h
    if im_ratio == dest_ratio:
        return w, h
    if im_ratio > dest_ratio:
        return w, round(ih / iw * w)
    return round(iw / ih * h), h


def placement(size: Sequence[int], frame: Sequence[int], mode: str) -> Placement:
    """The `Placement` of an image of `size` = (H0, W0) brought to `frame` = (H, W) by `mode` (see module doc)."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r} (valid: {', '.join(RESIZE_MODES)})")
    (h0, w0), (h, w) = (int(size[0]), int(size[1])), (int(frame[0]), int(frame[1]))
    if (h0, w0) == (h, w) or mode == "stretch":
        box = (0.0, 0.0, float(w0), float(h0))
    elif mode == "center-crop":  # ImageOps.fit with centering (0.5, 0.5) and no bleed
        live, out = w0 / h0, w / h
        if live == out:
            cw, ch = float(w0), float(h0)
        elif live >= out:
            cw, ch = out * h0, float(h0)
        else:
            cw, ch = float(w0), w0 / out
        left, top = (w0 - cw) * 0.5, (h0 - ch) * 0.5
        box = (left, top, left + cw, top + ch)
    else:  # pad: the image scaled into (rw, rh) and pasted at (left, top) of the frame
        rw, rh = contained_size((w0, h0), (w, h))
        top, left = (0, round((w - rw) * 0.5)) if rw != w else (round((h - rh) * 0.5), 0)
        sx, sy = w0 / rw, h0 / rh
        box = (-left * sx, -top * sy, (w - left) * sx, (h - top) * sy)
    return Placement((h0, w0), (h, w), mode, tuple(float(v) for v in box))


def to_original(logits: torch.Tensor, place: Placement) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Frame logits ``[B, K, H, W]`` as ``[B, K, H0, W0]`` at the image's own size, and the mask of image pixels
    the frame covered (None: all of them).

    stretch: a bilinear resize; pad: the padding stripped, then resized (mmsegmentation's `postprocess_result`);
    center-crop: each image pixel sampled bilinearly where the crop saw it, not covered elsewhere.
    """
    import torch
    import torch.nn.functional as F

    h0, w0 = place.size
    if place.identity:
        return logits, None
    if place.mode == "stretch":
        return F.interpolate(logits, size=(h0, w0), mode="bilinear", align_corners=False), None
    if place.mode == "pad":
        top, left, rh, rw = place.pad_region()
        inner = logits[..., top : top + rh, left : left + rw]
        return F.interpolate(inner, size=(h0, w0), mode="bilinear", align_corners=False), None
    # center-crop: frame coordinate of each image pixel centre, as grid_sample's normalised [-1, 1]
    x0, y0, x1, y1 = place.box
    xs = (torch.arange(w0, dtype=torch.float64) + 0.5 - x0) / (x1 - x0) * 2 - 1
    ys = (torch.arange(h0, dtype=torch.float64) + 0.5 - y0) / (y1 - y0) * 2 - 1
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij")[::-1], dim=-1).to(logits.dtype)
    grid = grid.unsqueeze(0).expand(logits.shape[0], -1, -1, -1).to(logits.device)
    out = F.grid_sample(logits, grid, mode="bilinear", padding_mode="border", align_corners=False)
    covered = ((xs.abs() <= 1)[None, :] & (ys.abs() <= 1)[:, None]).to(logits.device)
    return out, covered
