"""AUCSeg's pixel-level AUC loss (research/aucseg_dirmixe.md A.2–A.5)."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

# Block size of the moment pass, in elements of one [B, K, block] slice: on the CPU the sigmoid, its square
# and the scatter of a block stay in cache (about 2 MiB in float32), so the logits are read once from
# memory and no [n, K] temporary is ever made; on accelerators large blocks (few kernel launches). At most
# MAX_BLOCK_PIXELS pixels per block, so that the per-block sums in float32 keep about 1e-7 relative error.
CPU_BLOCK_ELEMENTS = 1 << 19
DEVICE_BLOCK_ELEMENTS = 1 << 24
MAX_BLOCK_PIXELS = 1 << 14


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _block(x: torch.Tensor) -> int:
    b, k, n = x.shape
    elements = CPU_BLOCK_ELEMENTS if x.device.type == "cpu" else DEVICE_BLOCK_ELEMENTS
    return max(1, min(n, MAX_BLOCK_PIXELS, elements // max(1, b * k)))


class _ClassMoments(torch.autograd.Function):
    """``(Σ_p s[p,c], Σ_p s[p,c]²)`` over the pixels p of each label bin d, with ``s = sigmoid(x)``.

    ``x``: logits [B, K, n]; ``bins``: [B, 1, n] int64 in 0…K (K: ignored pixels). Returns two float64
    [K, K + 1] tensors indexed [channel c, bin d]. Per block of pixels: sigmoid and square into one reused
    [B, 2K, block] buffer, one scatter-add into per-block sums (compute dtype), added up in float64.
    Backward: ``∂/∂x[b,c,p] = (g₁[c,d] + 2·s·g₂[c,d])·s·(1 − s)`` with d the pixel's bin, by blocks too:
    the exact gradient of the same sums, with no [n, K] intermediate kept between the passes.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, bins: torch.Tensor):  # noqa: D102
        b, k, n = x.shape
        dt, step = _compute_dtype(x.dtype), _block(x)
        acc = torch.zeros(b, 2 * k, k + 1, dtype=torch.float64, device=x.device)
        part = torch.empty(b, 2 * k, k + 1, dtype=dt, device=x.device)
        buf = torch.empty(b, 2 * k, step, dtype=dt, device=x.device)  # rows 0…K−1: s, rows K…2K−1: s²
        for i in range(0, n, step):
            xs = x[:, :, i:i + step]
            sq = buf[:, :, :xs.shape[2]]
            s = sq[:, :k]
            if xs.dtype == dt:
                torch.sigmoid(xs, out=s)
            else:
                s.copy_(torch.sigmoid(xs.to(dt)))
            torch.mul(s, s, out=sq[:, k:])
            part.zero_().scatter_add_(2, bins[:, :, i:i + step].expand(sq.shape), sq)
            acc += part
        ctx.save_for_backward(x, bins)
        acc = acc.sum(0)
        return acc[:k], acc[k:]

    @staticmethod
    @once_differentiable
    def backward(ctx, g1: torch.Tensor | None, g2: torch.Tensor | None):  # noqa: D102
        x, bins = ctx.saved_tensors
        b, k, n = x.shape
        dt, step = _compute_dtype(x.dtype), _block(x)
        table = torch.zeros(2 * k, k + 1, dtype=dt, device=x.device)  # rows: g₁, then 2·g₂
        if g1 is not None:
            table[:k] = g1
        if g2 is not None:
            table[k:] = 2 * g2
        table = table.expand(b, 2 * k, k + 1)
        grad = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        gbuf = torch.empty(b, 2 * k, step, dtype=dt, device=x.device)
        sbuf = torch.empty(b, k, step, dtype=dt, device=x.device)
        tbuf = torch.empty_like(sbuf)
        for i in range(0, n, step):
            xs = x[:, :, i:i + step]
            m = xs.shape[2]
            s, t, g = sbuf[:, :, :m], tbuf[:, :, :m], gbuf[:, :, :m]
            if xs.dtype == dt:
                torch.sigmoid(xs, out=s)
            else:
                s.copy_(torch.sigmoid(xs.to(dt)))
            torch.gather(table, 2, bins[:, :, i:i + step].expand(g.shape), out=g)
            ds = g[:, k:].mul_(s).add_(g[:, :k])  # ∂/∂s = g₁ + 2·g₂·s
            torch.mul(s, s, out=t)
            torch.sub(s, t, out=t)  # s(1 − s)
            if x.dtype == dt:
                torch.mul(ds, t, out=grad[:, :, i:i + step])
            else:
                grad[:, :, i:i + step] = ds * t
        return grad, None


def pixel_auc_loss(logits: torch.Tensor, labels: torch.Tensor, margin: float = 1.0,
                   ignore_index: int = 255) -> torch.Tensor:
    """AUCSeg's one-vs-one square-surrogate pixel AUC loss, in O(nK) by class moments.

    With scores s = sigmoid(logits) ([B,K,H,W] → n pixels × K channels, ignored pixels removed) and P the
    classes present in the batch (K_b = |P|), for every ordered pair (c, d) of distinct present classes

        ℓ(c|d) = mean over p with y_p = c and q with y_q = d of (margin − s[p,c] + s[q,c])²
               = (margin − μ_cc + μ_dc)² + σ²_cc + σ²_dc,

    where μ_dc and σ²_dc are the mean and population variance of channel c over the pixels of class d.
    The loss is the mean of ℓ over the K_b(K_b − 1) pairs (no ½, unlike the AUCSeg code). The moment form
    is an identity (brief A.5): same value and gradients as the pairwise mean, without forming pairs.
    With fewer than two classes present it is 0, still connected to `logits` so backward works.

    The class sums of s and s² come from one blocked pass over the logits (`pixel_class_moments`:
    sigmoid, square and scatter-add per block of pixels, block sums in float64; its backward is the exact
    gradient of those sums); ignored pixels go to an extra bin instead of being removed. Labels other than
    `ignore_index` must lie in 0…K−1. Under data-parallel training the class sums of all processes make the
    loss of the global batch (`downstream.losses.distributed.distributed_pixel_auc_loss`).

    >>> logits = torch.tensor([[[[3.0, -3.0]], [[-3.0, 3.0]]]])  # [1, 2, 1, 2]: pixel 0 → class 0, 1 → 1
    >>> round(pixel_auc_loss(logits, torch.tensor([[[0, 1]]])).item(), 4)
    0.009
    """
    x, bins = _bins(logits, labels, ignore_index)
    counts = _counts(x, bins)
    if int((counts > 0).sum()) < 2:
        return logits.sum() * 0.0
    sum1, sum2 = _moments(x, bins)
    return auc_from_moments(counts, sum1, sum2, margin).to(logits.dtype)


def _bins(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits as [B, K, n], label bins [B, 1, n] with ignored pixels in bin K), labels checked."""
    b, k = logits.shape[:2]
    x = logits.reshape(b, k, -1)
    y = labels.reshape(b, 1, -1).long()
    if y.shape[2] != x.shape[2]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match logits {tuple(logits.shape)}")
    ignored = y == ignore_index
    bins = y.masked_fill(ignored, k)  # ignored pixels: bin K, dropped below
    low, high = bins.aminmax() if bins.numel() else (torch.tensor(0), torch.tensor(0))
    if low < 0 or high > k or int((bins == k).sum()) != int(ignored.sum()):
        bad = y[~ignored & ((y >= k) | (y < 0))]
        raise ValueError(f"label {int(bad[0])} outside 0…{k - 1} (and not ignore_index {ignore_index})")
    return x, bins


def _counts(x: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    return torch.bincount(bins.reshape(-1), minlength=x.shape[1] + 1)[:x.shape[1]]


def _moments(x: torch.Tensor, bins: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    k = x.shape[1]
    sum1, sum2 = _ClassMoments.apply(x, bins)  # [channel c, bin d], float64
    return sum1[:, :k], sum2[:, :k]


def pixel_class_counts(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """N_d: the number of pixels of each class d in the batch ([K] int64; ignored pixels left out)."""
    return _counts(*_bins(logits, labels, ignore_index))


def pixel_class_moments(logits: torch.Tensor, labels: torch.Tensor,
                        ignore_index: int = 255) -> tuple[torch.Tensor, torch.Tensor]:
    """(S1, S2): S1[c, d] = Σ_{p: y_p = d} s[p, c], S2[c, d] = Σ_{p: y_p = d} s[p, c]², s = sigmoid(logits), as
    float64 [K, K] (channel c, class d) with the exact gradient (one blocked pass, `_ClassMoments`). Sums add up
    over batches and processes: the moment form of `pixel_auc_loss` needs nothing else (`auc_from_moments`)."""
    return _moments(*_bins(logits, labels, ignore_index))


def auc_from_moments(counts: torch.Tensor, sum1: torch.Tensor, sum2: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """The mean over ordered pairs (c, d) of present classes of ℓ(c|d) = (margin − μ_cc + μ_dc)² + σ²_cc + σ²_dc,
    from the class counts N [K] and the moment sums S1, S2 [K, K] of `pixel_class_moments` (float64, 0-d);
    0 with fewer than two classes present."""
    k = counts.shape[0]
    present = counts > 0
    kb = int(present.sum())
    if kb < 2:
        return (sum1.sum() + sum2.sum()) * 0.0
    n = counts.clamp(min=1).double()[:, None]
    mu, m2 = sum1.T / n, sum2.T / n  # row d: pixels of class d; column c: channel c
    var = m2 - mu * mu
    mu_cc, var_cc = mu.diagonal(), var.diagonal()
    pair = (margin - mu_cc[None, :] + mu) ** 2 + var_cc[None, :] + var  # pair[d, c] = ℓ(c|d)
    mask = present[:, None] & present[None, :] & ~torch.eye(k, dtype=torch.bool, device=sum1.device)
    return pair[mask].sum() / (kb * (kb - 1))


def pixel_auc_loss_pairwise(logits: torch.Tensor, labels: torch.Tensor, margin: float = 1.0,
                            ignore_index: int = 255) -> torch.Tensor:
    """The definition of `pixel_auc_loss`, pair by pair (O(n²) memory): the reference for tests only."""
    k = logits.shape[1]
    s = torch.sigmoid(logits).movedim(1, -1).reshape(-1, k)
    y = labels.reshape(-1)
    keep = y != ignore_index
    s, y = s[keep], y[keep]
    classes = [c for c in range(k) if (y == c).any()]
    if len(classes) < 2:
        return logits.sum() * 0.0
    terms = [((margin - s[y == c, c][:, None] + s[y == d, c][None, :]) ** 2).mean()
             for c in classes for d in classes if c != d]
    return torch.stack(terms).mean()
