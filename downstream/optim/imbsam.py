"""ImbSAM: sharpness-aware minimisation of the tail-class loss only (cool-xuan/Imbalanced_SAM;
research/longtail_suite.md §1.3)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from difffeat.errors import UserError
from downstream.optim.head_tail import GroupLosses, split_losses
from downstream.optim.sam import SharpnessAware, backward


class ImbSAM(SharpnessAware):
    """ImbSAM: min_w L_H(w) + max_{‖ε‖≤ρ} L_T(w + ε), with T = `tail_classes` (see `tail_classes(counts, η)`).

    One step, with L_H and L_T from `split_losses` (default: sums over the head / tail samples divided by the
    batch size, so that L_H + L_T is the batch mean):

        g_H = ∇L_H(w);  g_T = ∇L_T(w);  ε = ρ·g_T / ‖g_T‖;
        w ← base_step(w, ∇L_T(w + ε) + g_H)   (at the restored w).

    Only the tail loss is perturbed. A batch without tail samples is a plain step on g_H. Costs 2 forward and
    3 backward passes. The official code multiplies the tail loss by 2 (`tail_weight=2.0` reproduces it) and
    the SSE-SAM repo's copy uses group means (`normalization="group"`). `ignore_index` drops pixels/samples
    (segmentation). Default ρ = 0.05.

    The closure returns (per-sample losses, targets), e.g. `(F.cross_entropy(head(x), y, reduction="none"), y)`,
    or a `GroupLosses`; it must not call backward. By hand: `L_H.backward(retain_graph=True);
    opt.store_head_grad(); L_T.backward(); opt.first_step(); L_T_at_perturbed.backward(); opt.second_step()`.
    """

    def __init__(self, params, base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD, tail_classes=(),
                 rho: float = 0.05, tail_weight: float = 1.0, normalization: str = "batch",
                 ignore_index: int | None = None, adaptive: bool = False, **kwargs):
        if rho < 0:
            raise ValueError(f"rho must be non-negative, got {rho}")
        super().__init__(params, base_optimizer, {"rho": rho, "adaptive": adaptive}, **kwargs)
        self.tail = _tail_tensor(tail_classes)
        self.tail_weight, self.normalization, self.ignore_index = tail_weight, normalization, ignore_index

    def group_losses(self, out) -> GroupLosses:
        return group_losses(out, self.tail, self.normalization, self.tail_weight, self.ignore_index)

    @torch.no_grad()
    def store_head_grad(self) -> None:
        """Keep the head-loss gradient now in `.grad` (g_H) for `second_step`, and clear `.grad`."""
        for _, p, g in list(self._grads(None)):
            self.state[p]["g_head"] = g.clone()
        self.zero_grad(set_to_none=True)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = True) -> None:
        """Climb to w + ε, ε = ρ·g_T/‖g_T‖, from the tail-loss gradient now in `.grad`."""
        self._perturb("rho")
        if zero_grad:
            self.zero_grad(set_to_none=True)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = True) -> None:
        """Return to w; take the base step with `.grad` (∇L_T at w + ε) plus the stored g_H."""
        self._restore()
        _add_stored(self, "g_head")
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad(set_to_none=True)

    def step(self, closure: Callable | None = None) -> torch.Tensor:
        """One ImbSAM step; returns L_H + L_T at w (detached)."""
        if closure is None:
            raise RuntimeError("ImbSAM needs a closure (or use store_head_grad / first_step / second_step)")
        parts = self.group_losses(self._evaluate(closure))
        backward(parts.head, retain_graph=True)
        self.store_head_grad()
        if parts.n_tail != 0:
            backward(parts.tail)
            self.first_step(zero_grad=True)
            backward(self.group_losses(self._evaluate(closure)).tail)
        self.second_step(zero_grad=True)
        return (parts.head + parts.tail).detach()


def _tail_tensor(tail_classes) -> torch.Tensor:
    tail = torch.as_tensor(tail_classes)
    if tail.dtype == torch.bool:
        tail = torch.nonzero(tail).flatten()
    return tail.long().flatten()


def group_losses(out, tail: torch.Tensor, normalization: str, tail_weight: float,
                 ignore_index: int | None) -> GroupLosses:
    """A closure's output as head and tail losses: `GroupLosses` as is, (losses, targets) split by class."""
    if isinstance(out, GroupLosses):
        return out
    if isinstance(out, tuple) and len(out) == 2:
        return split_losses(out[0], out[1], tail, normalization, tail_weight, ignore_index)
    raise UserError("the closure of ImbSAM / SSE-SAM must return (per-sample losses, targets) or GroupLosses")


@torch.no_grad()
def _add_stored(opt: SharpnessAware, key: str) -> None:
    """p.grad += state[p][key] (and forget it), creating p.grad where only the stored gradient exists."""
    for group in opt.param_groups:
        for p in group["params"]:
            stored = opt.state[p].pop(key, None)
            if stored is None:
                continue
            if p.grad is None:
                p.grad = stored
            else:
                p.grad.add_(stored)
