"""Neural-collapse tools: fixed simplex-ETF and Grassmannian-frame classifier heads, and the NC1–NC4
diagnostics (Papyan et al. 2020; research/longtail_suite.md §6).

The papers behind §6 (arXiv 2310.08358, 2304.08914) have no code; the constructions here are the standard
ones. Which coherence the "Grassmannian frame" paper uses (signed or absolute) is unverified: both exist.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from difffeat.errors import UserError


def simplex_etf(num_classes: int, dim: int, seed: int = 0) -> torch.Tensor:
    """A simplex equiangular tight frame: C unit vectors in R^d ([C, d], float64) with ⟨w_i, w_j⟩ = −1/(C−1).

    W = sqrt(C/(C−1))·B·Uᵀ, B [C, C−1] an orthonormal basis of 1⊥ (so BBᵀ = I − 11ᵀ/C) and U [d, C−1] random
    orthonormal columns (QR of a seeded Gaussian): the rows of W span a random (C−1)-dimensional subspace.
    Needs d ≥ C − 1 (the most separated C points on the sphere; with C ≤ d + 1 no frame beats it).

    >>> w = simplex_etf(4, 3)
    >>> bool(torch.allclose(w @ w.T, (4 * torch.eye(4, dtype=w.dtype) - 1) / 3))
    True
    """
    if num_classes < 2:
        raise UserError(f"an ETF needs at least 2 classes, got {num_classes}")
    if dim < num_classes - 1:
        raise UserError(f"a simplex ETF of {num_classes} classes needs dim ≥ {num_classes - 1}, got {dim}; "
                        "use grassmannian_frame")
    g = torch.Generator().manual_seed(seed)
    centred = torch.eye(num_classes, dtype=torch.float64) - 1.0 / num_classes
    basis = torch.linalg.svd(centred).U[:, : num_classes - 1]  # orthonormal basis of 1⊥
    u = torch.linalg.qr(torch.randn(dim, num_classes - 1, generator=g, dtype=torch.float64)).Q
    return math.sqrt(num_classes / (num_classes - 1)) * basis @ u.T


def coherence(frame: torch.Tensor, signed: bool = True) -> float:
    """max_{i≠j} ⟨w_i, w_j⟩ of the normalised rows (signed), or max |⟨w_i, w_j⟩| (absolute, Grassmannian)."""
    w = F.normalize(frame.double(), dim=1)
    gram = w @ w.T
    off = gram[~torch.eye(len(w), dtype=torch.bool, device=w.device)]
    return float(off.max() if signed else off.abs().max())


def coherence_bound(num_classes: int, dim: int, signed: bool = True) -> float:
    """Lower bound on `coherence`: signed −1/(C−1) (the simplex bound, attained only when C ≤ d + 1);
    absolute 0 when C ≤ d, else the Welch bound sqrt((C − d)/(d(C − 1)))."""
    if signed:
        return -1.0 / (num_classes - 1)
    if num_classes <= dim:
        return 0.0
    return math.sqrt((num_classes - dim) / (dim * (num_classes - 1)))


def grassmannian_frame(num_classes: int, dim: int, signed: bool = True, steps: int = 1000, restarts: int = 4,
                       lr: float = 0.1, tau: tuple[float, float] = (0.5, 0.001), seed: int = 0) -> torch.Tensor:
    """C unit vectors in R^d ([C, d], float64) with small `coherence`: a best spherical code, for C > d + 1.

    Where the optimum is known it is returned directly: the simplex ETF (signed, C ≤ d + 1) or orthonormal
    vectors (absolute, C ≤ d). Otherwise: projected gradient descent (Adam, rows renormalised after every
    step) on the smooth maximum τ·log Σ_{i≠j} exp(c_ij/τ) of the pairwise values c_ij = ⟨w_i, w_j⟩ (signed)
    or |⟨w_i, w_j⟩| (absolute, through exp(±⟨w_i, w_j⟩/τ)); τ is annealed geometrically from tau[0] to
    tau[1] and the step from lr to lr/100. Of `restarts` seeded random starts, the iterate with the lowest exact
    coherence is kept. A local optimum: compare `coherence(frame)` with `coherence_bound`.
    """
    if num_classes < 2 or dim < 1:
        raise UserError(f"a frame needs at least 2 classes and 1 dimension, got {num_classes} and {dim}")
    if signed and num_classes <= dim + 1:
        return simplex_etf(num_classes, dim, seed)
    g = torch.Generator().manual_seed(seed)
    if not signed and num_classes <= dim:
        return torch.linalg.qr(torch.randn(dim, num_classes, generator=g, dtype=torch.float64)).Q.T.contiguous()
    with torch.enable_grad():  # the caller may have switched autograd off
        return _descend_frame(num_classes, dim, signed, steps, restarts, lr, tau, g)


def _descend_frame(num_classes: int, dim: int, signed: bool, steps: int, restarts: int, lr: float,
                   tau: tuple[float, float], g: torch.Generator) -> torch.Tensor:
    off = ~torch.eye(num_classes, dtype=torch.bool)
    best, best_value = None, math.inf
    for _ in range(restarts):
        w = F.normalize(torch.randn(num_classes, dim, generator=g, dtype=torch.float64), dim=1).requires_grad_()
        opt = torch.optim.Adam([w], lr=lr)
        for step in range(steps):
            progress = step / max(steps - 1, 1)
            t = tau[0] * (tau[1] / tau[0]) ** progress
            opt.param_groups[0]["lr"] = lr * 0.01 ** progress
            gram = (w @ w.T)[off]
            value = float(gram.detach().max() if signed else gram.detach().abs().max())
            if value < best_value:  # the exact coherence of the current (unit-norm) iterate
                best_value, best = value, w.detach().clone()
            values = gram if signed else torch.cat([gram, -gram])
            loss = t * torch.logsumexp(values / t, dim=0)
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                w.copy_(F.normalize(w, dim=1))
    final = coherence(w.detach(), signed)
    return w.detach().clone() if final < best_value else best


def label_assignment(num_classes: int, assignment: str | Sequence[int] = "identity", seed: int = 0) -> torch.Tensor:
    """Which frame vertex each label gets: "identity", "random" (a seeded permutation) or an explicit permutation.

    Different assignments give different generalisation at the same collapse (arXiv 2310.08358), hence a choice.
    """
    if isinstance(assignment, str):
        if assignment == "identity":
            return torch.arange(num_classes)
        if assignment == "random":
            return torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed))
        raise UserError(f"assignment must be 'identity', 'random' or a permutation, got {assignment!r}")
    perm = torch.as_tensor(list(assignment), dtype=torch.long)
    if sorted(perm.tolist()) != list(range(num_classes)):
        raise UserError(f"assignment must be a permutation of 0..{num_classes - 1}, got {perm.tolist()}")
    return perm


def align_frame(frame: torch.Tensor, class_means: torch.Tensor) -> torch.Tensor:
    """The frame rotated to best match the centred class means: W·Q, Q = argmin_{QᵀQ=I} ‖W Q − M̃‖_F.

    Orthogonal Procrustes (Q = U Vᵀ from the SVD of Wᵀ M̃, M̃ the centred, row-normalised means [C, d]); the
    rotation keeps the frame's geometry and its label assignment. An option, not from the NC papers.
    """
    means = class_means.to(frame.dtype)
    centred = F.normalize(means - means.mean(0, keepdim=True), dim=1)
    u, _, vh = torch.linalg.svd(frame.T @ centred)
    return frame @ (u @ vh)


class FixedFrameClassifier(nn.Module):
    """A classifier with a fixed (frozen) frame as its weight: logits = scale · normalize(P x) · W_π(y)ᵀ.

    P is a trainable linear projection from `in_features` to `dim` (identity when `project=False`, which needs
    dim = in_features); W [C, dim] is a simplex ETF when C ≤ dim + 1 and a Grassmannian frame otherwise
    (`frame="auto"`), or as named; row y of `weight` is the vertex `assignment[y]`. Training the projection
    with CE (or the dot-regression loss) on a fixed ETF avoids minority collapse under long tails.
    """

    def __init__(self, in_features: int, num_classes: int, dim: int | None = None, frame: str = "auto",
                 assignment: str | Sequence[int] = "identity", scale: float = 10.0, project: bool = True,
                 signed: bool = True, seed: int = 0):
        super().__init__()
        dim = in_features if dim is None else dim
        if not project and dim != in_features:
            raise UserError(f"without a projection dim must equal in_features ({in_features}), got {dim}")
        if frame == "auto":
            frame = "etf" if num_classes <= dim + 1 else "grassmannian"
        if frame == "etf":
            vertices = simplex_etf(num_classes, dim, seed)
        elif frame == "grassmannian":
            vertices = grassmannian_frame(num_classes, dim, signed=signed, seed=seed)
        else:
            raise UserError(f"frame must be 'auto', 'etf' or 'grassmannian', got {frame!r}")
        self.register_buffer("assignment", label_assignment(num_classes, assignment, seed))
        self.register_buffer("weight", vertices[self.assignment].float())
        self.projection = nn.Linear(in_features, dim) if project else nn.Identity()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(self.projection(x), dim=-1) @ self.weight.T


# ---- NC metrics -------------------------------------------------------------------------------------------


def _class_stats(features: torch.Tensor, labels: torch.Tensor):
    h = features.detach().double().flatten(1)
    labels = labels.detach().long()
    classes = torch.unique(labels)
    means = torch.stack([h[labels == c].mean(0) for c in classes])
    global_mean = means.mean(0)  # the mean of class means (balanced, as in Papyan et al.)
    return h, labels, classes, means, global_mean


def nc1(features: torch.Tensor, labels: torch.Tensor) -> float:
    """NC1 = Tr(Σ_W Σ_B†)/C: within-class variability relative to between-class, over the C classes present.

    Σ_W = mean_i (h_i − μ_{y_i})(h_i − μ_{y_i})ᵀ, Σ_B = mean_c (μ_c − μ_G)(μ_c − μ_G)ᵀ, μ_G the mean of the μ_c.
    """
    h, labels, classes, means, global_mean = _class_stats(features, labels)
    index = torch.searchsorted(classes, labels)
    within = h - means[index]
    sigma_w = within.T @ within / len(h)
    between = means - global_mean
    sigma_b = between.T @ between / len(classes)
    return float(torch.trace(sigma_w @ torch.linalg.pinv(sigma_b)) / len(classes))


def nc2(features: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """NC2, convergence of the centred class means M̃ (rows μ_c − μ_G) to a simplex ETF:

    equinorm: std/mean of ‖μ_c − μ_G‖; equiangularity: std over c ≠ c′ of cos(μ̃_c, μ̃_c′); max_angle: mean
    of |cos + 1/(C−1)|; etf_distance: ‖ M̃M̃ᵀ/‖M̃M̃ᵀ‖_F − (I − 11ᵀ/C)/sqrt(C−1) ‖_F.
    """
    _, _, classes, means, global_mean = _class_stats(features, labels)
    c = len(classes)
    if c < 2:
        raise UserError("NC2 needs at least 2 classes")
    centred = means - global_mean
    norms = centred.norm(dim=1)
    unit = centred / norms.clamp(min=1e-300)[:, None]
    cos = (unit @ unit.T)[~torch.eye(c, dtype=torch.bool, device=unit.device)]
    gram = centred @ centred.T
    etf = (torch.eye(c, dtype=gram.dtype, device=gram.device) - 1.0 / c) / math.sqrt(c - 1)
    return {
        "equinorm": float(norms.std() / norms.mean()),
        "equiangularity": float(cos.std()),
        "max_angle": float((cos + 1.0 / (c - 1)).abs().mean()),
        "etf_distance": float(torch.linalg.norm(gram / torch.linalg.norm(gram) - etf)),
    }


def nc3(features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> float:
    """NC3 (self-duality) = ‖ W/‖W‖_F − M̃/‖M̃‖_F ‖²_F, W [C, d] the classifier rows of the classes present."""
    _, _, classes, means, global_mean = _class_stats(features, labels)
    w = weight.detach().double()[classes]
    centred = means - global_mean
    return float(torch.linalg.norm(w / torch.linalg.norm(w) - centred / torch.linalg.norm(centred)) ** 2)


def nc4(features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> float:
    """NC4 = rate of disagreement between the classifier, argmax_c (W h + b)_c, and the nearest class centre,
    argmin_c ‖h − μ_c‖ (centres of the classes present, from these features)."""
    h, _, classes, means, _ = _class_stats(features, labels)
    logits = h @ weight.detach().double().T
    if bias is not None:
        logits = logits + bias.detach().double()
    nearest = classes[torch.cdist(h, means).argmin(1)]
    return float((logits.argmax(1) != nearest).double().mean())


def multiclass_margins(features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """Normalised multi-class margins (z_y − max_{j≠y} z_j) / (‖W‖_F·‖h‖) per sample, z = W h + b: the quantity
    the terminal-phase margin bound depends on (arXiv 2310.08358)."""
    h = features.detach().double().flatten(1)
    w = weight.detach().double()
    z = h @ w.T + (0.0 if bias is None else bias.detach().double())
    labels = labels.long()
    target = z.gather(1, labels[:, None]).squeeze(1)
    others = z.scatter(1, labels[:, None], -math.inf).max(1).values
    return (target - others) / (torch.linalg.norm(w) * h.norm(dim=1)).clamp(min=1e-300)


def neural_collapse_metrics(features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None,
                            bias: torch.Tensor | None = None, groups: dict[str, Sequence[int]] | None = None
                            ) -> dict[str, float]:
    """NC1, NC2 (its four parts), and with a classifier NC3, NC4 and the mean / min normalised margin.

    `groups` (e.g. {"head": [...], "tail": [...]}) adds NC1 and NC2 computed on each group's classes alone
    (keys like "tail/nc1"), as suggested for imbalanced data; groups with fewer than two present classes are
    skipped.
    """
    out = {"nc1": nc1(features, labels), **{f"nc2_{k}": v for k, v in nc2(features, labels).items()}}
    if weight is not None:
        out["nc3"] = nc3(features, labels, weight)
        out["nc4"] = nc4(features, labels, weight, bias)
        margins = multiclass_margins(features, labels, weight, bias)
        out["margin_mean"], out["margin_min"] = float(margins.mean()), float(margins.min())
    for name, members in (groups or {}).items():
        keep = torch.isin(labels, torch.as_tensor(list(members), dtype=labels.dtype))
        if torch.unique(labels[keep]).numel() < 2:
            continue
        out[f"{name}/nc1"] = nc1(features[keep], labels[keep])
        out.update({f"{name}/nc2_{k}": v for k, v in nc2(features[keep], labels[keep]).items()})
    return out
