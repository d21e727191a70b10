"""The pixel AUC loss under data-parallel training: the loss of the global batch, from every process's class
moments (research/aucseg_dirmixe.md A.5).

`pixel_auc_loss` is a function of per-class sums only: the pixel counts N_d and the moment sums
S1[c, d] = Σ_{y_p = d} s[p, c], S2[c, d] = Σ_{y_p = d} s[p, c]². Sums over the processes' batches are the sums
over the global batch, so one all_reduce of (N, S1, S2) gives every process the loss one process would compute
on all the batches together: the same classes present, the same class means, the same pairs. On each process
alone the loss would pair only its own pixels, a different (noisier, and biased towards the classes each process
happens to hold) estimate.

Gradient: the all_reduce of S1, S2 is differentiable (`all_reduce_sum`): forward sums over processes, backward
sums the incoming gradients over processes too. Each process then holds W·∂L/∂S_r (W processes, all computing
the same L) and back-propagates it into its own pixels; data-parallel training averages the parameter gradients
over the W processes, which gives exactly ∂L/∂θ of the global loss. Without data-parallel averaging (a single
process with `group` of size 1) nothing changes: the function is `pixel_auc_loss`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from downstream.losses.pixel_auc import auc_from_moments, pixel_auc_loss, pixel_class_counts, pixel_class_moments


class _AllReduceSum(torch.autograd.Function):
    """Σ over the processes of `x`; the backward pass is the same sum of the incoming gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group):  # noqa: D102
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        out = grad.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=ctx.group)
        return out, None


def all_reduce_sum(x: torch.Tensor, group=None) -> torch.Tensor:
    """Σ_r x_r over the processes of `group`, differentiable (see the module doc); `x` itself when there is no
    process group or it has one process."""
    if not is_distributed(group):
        return x
    return _AllReduceSum.apply(x, group)


def is_distributed(group=None) -> bool:
    """Whether a process group of more than one process is running (torchrun, `accelerate launch`)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def distributed_pixel_auc_loss(logits: torch.Tensor, labels: torch.Tensor, margin: float = 1.0,
                               ignore_index: int = 255, group=None) -> torch.Tensor:
    """`pixel_auc_loss` of the global batch: the pixels of every process's (`logits`, `labels`) together.

    Every process of `group` must call it at the same step (it all-reduces the class counts [K] and the moment
    sums [2, K, K], float64). With fewer than two classes present in the global batch it is 0, connected to
    `logits`. Gradients: see the module doc (exact under data-parallel averaging).
    """
    if not is_distributed(group):
        return pixel_auc_loss(logits, labels, margin, ignore_index)
    counts = pixel_class_counts(logits, labels, ignore_index).clone()
    dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
    if int((counts > 0).sum()) < 2:  # the same on every process: all take this branch or none
        return logits.sum() * 0.0
    sum1, sum2 = pixel_class_moments(logits, labels, ignore_index)
    sums = all_reduce_sum(torch.stack([sum1, sum2]), group)
    return auc_from_moments(counts, sums[0], sums[1], margin).to(logits.dtype)
