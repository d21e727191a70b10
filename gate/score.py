"""GATE's per-image scores: how close a reconstruction (or a feature map) stays to its input.

Image scores compare an img2img reconstruction with the input image (higher = closer): PSNR, SSIM, edge F1
of canny maps and, when its weights are on disk, LPIPS (lower = closer; reported as is). The feature score
is the content-shift paper's Laplacian contour Score (research/content_shift_gate.md §2.2, Eq. 1–2).
Every function returns one value per image, so that intervals and paired tests can be taken over images.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

# name → True when higher is better (defined beside GateConfig, whose --primary choices it gives)
from gate.config import HIGHER_IS_BETTER  # noqa: F401


def psnr(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images [B, 3, H, W] in [0, 1]: ``10 · log10(1 / mean((x − y)²))``."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return peak_signal_noise_ratio(recon.float(), target.float(), data_range=1.0, reduction="none", dim=(1, 2, 3))


def ssim(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (torchmetrics: 11×11 Gaussian window, σ = 1.5) of images [B, 3, H, W] in [0, 1]:
    the mean over windows of ``(2μxμy + C1)(2σxy + C2) / ((μx² + μy² + C1)(σx² + σy² + C2))``."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure(recon.float(), target.float(), data_range=1.0, reduction="none")


def edge_f1(recon: torch.Tensor, target: torch.Tensor, tolerance: int = 1) -> torch.Tensor:
    """Per-image F1 of the canny edges (OpenCV, thresholds 100 / 200) of a reconstruction against the input's.

    An edge pixel counts as matched when the other map has an edge within `tolerance` pixels (Chebyshev
    distance: a (2·tol + 1)² square), because a one-pixel shift of an outline is not content shift.
    ``P = |E_rec ∩ dil(E_in)| / |E_rec|``, ``R = |E_in ∩ dil(E_rec)| / |E_in|``, ``F1 = 2PR / (P + R)``;
    1 when neither image has an edge, 0 when only one has.
    """
    from pipelines.canny import canny_tensor

    e_rec = canny_tensor(recon)[:, :1]  # the three channels of a canny map are equal
    e_in = canny_tensor(target)[:, :1]
    return _edge_f1_maps(e_rec, e_in, tolerance)


def _edge_f1_maps(e_rec: torch.Tensor, e_in: torch.Tensor, tolerance: int) -> torch.Tensor:
    """Edge F1 of binary maps [B, 1, H, W] (see `edge_f1`)."""
    k = 2 * tolerance + 1
    dilate = lambda e: F.max_pool2d(e, k, stride=1, padding=tolerance) if tolerance > 0 else e
    n_rec, n_in = e_rec.sum((1, 2, 3)), e_in.sum((1, 2, 3))
    precision = (e_rec * dilate(e_in)).sum((1, 2, 3)) / n_rec.clamp(min=1)
    recall = (e_in * dilate(e_rec)).sum((1, 2, 3)) / n_in.clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    f1 = torch.where((n_rec == 0) & (n_in == 0), torch.ones_like(f1), f1)
    return torch.where((n_rec == 0) ^ (n_in == 0), torch.zeros_like(f1), f1)


# ------------------------------------------------------------------------------------------------ LPIPS
def lpips_weights() -> tuple[Path | None, str]:
    """(where LPIPS's AlexNet backbone weights lie, "") when LPIPS can run offline, else (None, why not).

    torchmetrics' LPIPS ships its linear heads but takes the backbone from torchvision's pretrained
    weights, which it would download; GATE never downloads, so it runs LPIPS only when they are cached.
    """
    try:
        import torchvision  # noqa: F401
    except Exception:  # not installed, or a torchvision that does not match torch
        return None, "torchvision is not installed"
    try:
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity  # noqa: F401
    except Exception as e:
        return None, f"torchmetrics LPIPS is unavailable ({type(e).__name__})"
    hub = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")) / "hub" / "checkpoints"
    found = sorted(hub.glob("alexnet-*.pth")) if hub.is_dir() else []
    if not found:
        return None, f"no AlexNet weights in {hub} (LPIPS needs them locally)"
    return found[0], ""


def lpips(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image LPIPS (AlexNet) distance of images [B, 3, H, W] in [0, 1]; lower is closer.

    Call only when `lpips_weights()` found the weights.
    """
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    metric = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True, reduction="mean")
    with torch.no_grad():  # one image per call: a per-image value, not the batch mean
        return torch.stack([metric(r[None].float(), t[None].float()).detach().flatten()[0]
                            for r, t in zip(recon, target)])


# -------------------------------------------------------------------------------------- feature Score
LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def laplacian_norm(features: torch.Tensor) -> torch.Tensor:
    """``‖Lap(F)(i, j)‖₂`` of features [B, C, h, w]: the 3×3 Laplacian of each channel (replicate-padded, so
    the map keeps its size without inventing edges at the border), then the ℓ2 norm over channels → [B, h, w]."""
    b, c, h, w = features.shape
    x = F.pad(features.float().reshape(b * c, 1, h, w), (1, 1, 1, 1), mode="replicate")
    lap = F.conv2d(x, LAPLACIAN.to(x)[None, None]).reshape(b, c, h, w)
    return lap.norm(dim=1)


def contour_diff(features: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Eq. 1 per image: ``diff = Σ_{i,j} | ‖Lap(FEAT_ref)(i,j)‖₂ − ‖Lap(FEAT)(i,j)‖₂ |`` for [B, C, h, w] maps."""
    if features.shape != reference.shape:
        raise ValueError(f"features {tuple(features.shape)} and reference {tuple(reference.shape)} differ in shape")
    return (laplacian_norm(reference) - laplacian_norm(features)).abs().sum((1, 2))


def feature_score(diff: torch.Tensor, diff_anchor: torch.Tensor) -> float:
    """Eq. 2 over a set of images: ``Score = (diff_anchor − diff) / diff_anchor``, with each diff summed over
    the images (a ratio of sums, so that one image with a tiny anchor diff cannot dominate). 1 is a perfect
    match with the t = 0 reference, 0 as much content shift as the anchor, below 0 more."""
    total = float(diff_anchor.sum())
    return (total - float(diff.sum())) / total if total > 0 else 0.0
