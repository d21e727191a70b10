"""Dense matching on feature maps: nearest neighbours by cosine similarity, as DIFT matches, with GeoAware-SC's window
soft-argmax as an option, and mutual nearest neighbours for dense matches.

A *descriptor* is read from one or several feature maps (store layers, or ``NAME/LAYER`` variants): each map is
resized bilinearly (``align_corners=False``) to where it is read, L2-normalised over its channels, and the maps are
concatenated and divided by √L, so the descriptor has unit norm and its cosine is the mean of the L per-map cosines
(one map: exactly DIFT's cosine). Source descriptors are read at the keypoints (bilinear sampling at a frame position
equals DIFT's "upsample to the image, index the pixel"); target descriptors on a *lattice*: a working grid of
(H, W) cells over the frame, or explicit frame positions, e.g. every pixel of the target image at its own size
(`downstream.corr.points.image_lattice`), with positions the frame does not cover left out.

For each source point the match is the lattice cell of highest cosine (hard argmax; the first on ties), or with
``soft_argmax = R`` the expected position under ``softmax(cos / temperature)`` over the (2R+1)² window around it
(GeoAware-SC; SFNet's temperature β = 0.02): a sub-cell position. The cosines are computed on the feature grid
and then read on the lattice (`lattice_similarity`: bilinear reading is linear), so a point costs ``C·h·w`` rather
than ``C·H·W``, and the target's norms come from products of neighbouring cells. Everything is batched over pairs and
points; the caller bounds memory by the pairs it gives at once (``[B, N, H, W]`` similarities). Positions are
returned as fractional (column, row) on the lattice.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

DEFAULT_TEMPERATURE = 0.02  # SFNet's β, GeoAware-SC's window soft-argmax
Lattice = tuple[int, int] | tuple[torch.Tensor, torch.Tensor]  # (H, W) working grid, or frame positions (u [W], v [H])


def _maps(maps: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    out = [maps] if isinstance(maps, torch.Tensor) else list(maps)
    if not out or any(m.ndim != 4 for m in out):
        raise ValueError("feature maps must be [B, C, h, w] tensors (one or a list)")
    return [m if m.dtype == torch.float64 else m.float() for m in out]  # float32 (float64 kept, for references)


def sample_descriptors(maps: torch.Tensor | Sequence[torch.Tensor], uv: torch.Tensor) -> torch.Tensor:
    """``[B, N, ΣC]`` unit descriptors of the maps (each ``[B, C_l, h_l, w_l]``) at frame positions `uv`
    ``[B, N, 2]`` (u, v in [0, 1]; outside the frame the border value), bilinear."""
    parts = []
    maps = _maps(maps)
    for m in maps:
        grid = (uv.to(m.device, m.dtype) * 2 - 1).unsqueeze(2)  # [B, N, 1, 2]: grid_sample's [-1, 1]
        v = F.grid_sample(m, grid, mode="bilinear", padding_mode="border", align_corners=False)
        parts.append(F.normalize(v.squeeze(3).transpose(1, 2), dim=-1))  # [B, N, C]
    return torch.cat(parts, dim=-1) / math.sqrt(len(maps))


def lattice_descriptors(maps: torch.Tensor | Sequence[torch.Tensor], lattice: Lattice) -> torch.Tensor:
    """``[B, ΣC, H, W]`` unit descriptors of the maps on `lattice`: an (H, W) grid over the frame (a bilinear
    resize), or frame positions ``(u [W], v [H])`` (bilinear sampling there)."""
    maps = _maps(maps)
    return torch.cat([F.normalize(_resample(m, lattice), dim=1) for m in maps], dim=1) / math.sqrt(len(maps))


def lattice_size(lattice: Lattice) -> tuple[int, int]:
    """(H, W) of a lattice."""
    if isinstance(lattice[0], int):
        return int(lattice[0]), int(lattice[1])
    return len(lattice[1]), len(lattice[0])


def similarity(descriptors: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """Cosine ``[B, N, H, W]`` of unit descriptors ``[B, N, C]`` against unit lattice descriptors ``[B, C, H, W]``."""
    b, c, h, w = dense.shape
    return torch.bmm(descriptors.to(dense.device), dense.reshape(b, c, h * w)).reshape(b, -1, h, w)


def frame_positions(lattice: Lattice) -> tuple[torch.Tensor, torch.Tensor]:
    """The lattice as frame positions ``(u [W], v [H])``; an (H, W) grid's cell centres ``(i + 0.5) / n``."""
    if isinstance(lattice[0], int):
        h, w = int(lattice[0]), int(lattice[1])
        return (torch.arange(w, dtype=torch.float64) + 0.5) / w, (torch.arange(h, dtype=torch.float64) + 0.5) / h
    return (torch.as_tensor(lattice[0]).to(torch.float64), torch.as_tensor(lattice[1]).to(torch.float64))


def interpolation_matrix(positions: torch.Tensor, cells: int) -> torch.Tensor:
    """``[n, cells]``: row i holds the bilinear weights with which a map of `cells` cells along an axis is read at
    frame position ``positions[i]`` (cell centres at ``(j + 0.5) / cells``; outside them the border cell), the
    weights of ``F.interpolate(…, align_corners=False)`` and of ``F.grid_sample(…, padding_mode="border")``."""
    src = (positions.to(torch.float64) * cells - 0.5).clamp(0, cells - 1)
    low = src.floor().long().clamp(max=cells - 1)
    high = (low + 1).clamp(max=cells - 1)
    frac = src - low
    out = torch.zeros(len(src), cells, dtype=torch.float64, device=positions.device)
    out.scatter_add_(1, low[:, None], (1 - frac)[:, None])
    out.scatter_add_(1, high[:, None], frac[:, None])
    return out


def _matrices(lattice: Lattice, size: tuple[int, int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [H, h], columns [W, w]) interpolation matrices reading an (h, w) grid on `lattice`."""
    u, v = frame_positions(lattice)
    return interpolation_matrix(v.to(device), size[0]), interpolation_matrix(u.to(device), size[1])


def _resample(maps: torch.Tensor, lattice: Lattice) -> torch.Tensor:
    """``[B, K, H, W]``: ``[B, K, h, w]`` maps read bilinearly on `lattice`, as two products with the separable
    interpolation matrices (``R_y · M · R_xᵀ``; on a CPU far faster than a bilinear resize kernel)."""
    if isinstance(lattice[0], int) and tuple(lattice) == tuple(maps.shape[-2:]):
        return maps  # the grid itself
    ry, rx = _matrices(lattice, tuple(maps.shape[-2:]), maps.device)
    return ry.to(maps.dtype) @ (maps @ rx.to(maps.dtype).T)


def _shifted(r: torch.Tensor, d: int) -> torch.Tensor:
    """``r * r[:, j + d]`` (zero where j + d is off the grid): the weight products of cells d apart."""
    other = torch.zeros_like(r)
    if d >= 0:
        other[:, : r.shape[1] - d] = r[:, d:]
    else:
        other[:, -d:] = r[:, :d]
    return r * other


def lattice_norms(maps: torch.Tensor, lattice: Lattice) -> torch.Tensor:
    """``[B, H, W]``: the L2 norm over channels of ``[B, C, h, w]`` maps read bilinearly on `lattice`, without reading
    the C channels there. At p the read vector is ``Σ_k w_k(p) t_k`` over at most 4 neighbouring cells, so its squared
    norm is ``Σ_{k,l} w_k w_l ⟨t_k, t_l⟩``: the products of cells at most one apart (9 offsets, ``9·C·h·w`` work per
    image) read through the separable weight products (no C at the lattice's size)."""
    b, c, h, w = maps.shape
    ry, rx = _matrices(lattice, (h, w), maps.device)
    total = None
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            gram = torch.zeros(b, h, w, dtype=maps.dtype, device=maps.device)
            ys, yd = slice(max(0, -dy), h - max(0, dy)), slice(max(0, dy), h - max(0, -dy))
            xs, xd = slice(max(0, -dx), w - max(0, dx)), slice(max(0, dx), w - max(0, -dx))
            gram[:, ys, xs] = (maps[:, :, ys, xs] * maps[:, :, yd, xd]).sum(1)
            term = _shifted(ry, dy) @ gram.to(torch.float64) @ _shifted(rx, dx).T
            total = term if total is None else total + term
    return total.clamp_min(0).sqrt().to(maps.dtype)


def lattice_similarity(descriptors: torch.Tensor, target: torch.Tensor | Sequence[torch.Tensor],
                       lattice: Lattice) -> torch.Tensor:
    """Cosine ``[B, N, H, W]`` of unit descriptors ``[B, N, ΣC]`` (`sample_descriptors`) against the target maps'
    descriptors on `lattice` (`lattice_descriptors`), without forming those: bilinear reading is linear, so the dot
    product of a point's descriptor with the map read at p is the map of dot products (``[B, N, h, w]``, on the
    feature grid) read at p, and the map's norm at p comes from products of neighbouring cells (`lattice_norms`).
    Equal to ``similarity(descriptors, lattice_descriptors(target, lattice))`` up to float rounding; its work and
    memory grow with N·H·W, not with C·H·W."""
    maps = _maps(target)
    b, n = descriptors.shape[:2]
    scale = math.sqrt(len(maps))
    cos = None
    start = 0
    for m in maps:
        c = m.shape[1]
        part = descriptors[..., start : start + c].to(m.device) * scale  # this map's unit descriptor
        start += c
        dots = torch.bmm(part, m.flatten(2)).reshape(b, n, *m.shape[-2:])
        inverse = 1 / (lattice_norms(m, lattice).clamp_min(1e-12) * len(maps))  # [B, H, W], small
        term = _resample(dots, lattice)
        term = (term if term is not dots else term.clone()).mul_(inverse.unsqueeze(1))
        cos = term if cos is None else cos.add_(term)
    return cos


def hard_argmax(sim: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(position [B, N, 2] long (column, row), score [B, N])`` of the highest similarity per point; `valid`
    ``[B, H, W]`` or ``[H, W]`` bool leaves lattice positions out."""
    b, n, h, w = sim.shape
    if valid is not None:
        sim = sim.masked_fill(~valid.to(sim.device).expand(b, h, w).unsqueeze(1), float("-inf"))
    score, flat = sim.reshape(b, n, h * w).max(dim=-1)
    return torch.stack([flat % w, flat // w], dim=-1), score


def window_soft_argmax(sim: torch.Tensor, peak: torch.Tensor, radius: int, temperature: float = DEFAULT_TEMPERATURE,
                       valid: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, N, 2]`` fractional (column, row): the mean position under ``softmax(sim / temperature)`` over the
    (2·radius+1)² window around each `peak` ``[B, N, 2]`` (window cells off the lattice or not `valid` left out)."""
    b, n, h, w = sim.shape
    r = torch.arange(-radius, radius + 1, device=sim.device)
    dy, dx = (t.reshape(-1) for t in torch.meshgrid(r, r, indexing="ij"))  # K = (2R+1)²
    cols = peak[..., 0:1].to(sim.device) + dx  # [B, N, K]
    rows = peak[..., 1:2].to(sim.device) + dy
    inside = (cols >= 0) & (cols < w) & (rows >= 0) & (rows < h)
    flat = (rows.clamp(0, h - 1) * w + cols.clamp(0, w - 1))
    values = sim.reshape(b, n, h * w).gather(-1, flat)
    if valid is not None:
        inside &= valid.to(sim.device).expand(b, h, w).reshape(b, 1, h * w).expand(b, n, h * w).gather(-1, flat)
    logits = (values / temperature).masked_fill(~inside, float("-inf"))
    weights = torch.softmax(logits, dim=-1)
    return torch.stack([(weights * cols).sum(-1), (weights * rows).sum(-1)], dim=-1)


def match_points(source: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor | Sequence[torch.Tensor],
                 uv: torch.Tensor, lattice: Lattice, *, soft_argmax: int = 0,
                 temperature: float = DEFAULT_TEMPERATURE,
                 valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest neighbours of source points in the target: ``(position [B, N, 2] (column, row) on the target
    `lattice`, float; cosine [B, N])``.

    `source`, `target`: feature maps ``[B, C_l, h_l, w_l]`` (one or a list, the same layers on both sides; the
    two images' grids may differ); `uv` ``[B, N, 2]``: the source points' frame positions; `valid` ``[H, W]`` or
    ``[B, H, W]``: lattice positions that may be matched. ``soft_argmax = R > 0``: the window soft-argmax of radius
    R around the hard argmax (module doc)."""
    sim = lattice_similarity(sample_descriptors(source, uv), target, lattice)
    peak, score = hard_argmax(sim, valid)
    if soft_argmax > 0:
        return window_soft_argmax(sim, peak, soft_argmax, temperature, valid), score
    return peak.float(), score


def mutual_nearest(a: torch.Tensor | Sequence[torch.Tensor], b: torch.Tensor | Sequence[torch.Tensor],
                   lattice: Lattice | None = None,
                   chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense mutual nearest neighbours of two images' maps (``[1, C_l, h, w]`` each, or lists): ``(index_a [M],
    index_b [M], cosine [M])``, flat lattice indices (row · W + column) of the cells whose nearest neighbour in
    the other image has them as its own nearest neighbour. Both on `lattice` (default: the first map's grid of
    each image); `chunk` rows of the similarity at a time, so memory stays ``chunk × cells``."""
    maps_a, maps_b = _maps(a), _maps(b)
    if len(maps_a[0]) != 1 or len(maps_b[0]) != 1:
        raise ValueError("mutual_nearest takes one image per side ([1, C, h, w] maps)")
    la = lattice or tuple(maps_a[0].shape[-2:])
    lb = lattice or tuple(maps_b[0].shape[-2:])
    fa = lattice_descriptors(maps_a, la)[0].flatten(1).T  # [Na, C]
    fb = lattice_descriptors(maps_b, lb)[0].flatten(1).T  # [Nb, C]

    def nearest(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        best, score = [], []
        for start in range(0, len(x), chunk):
            s, i = (x[start : start + chunk] @ y.T).max(dim=1)
            best.append(i)
            score.append(s)
        return torch.cat(best), torch.cat(score)

    ab, score = nearest(fa, fb)
    ba, _ = nearest(fb, fa)
    index_a = torch.arange(len(fa), device=fa.device)
    mutual = ba[ab] == index_a
    return index_a[mutual], ab[mutual], score[mutual]
