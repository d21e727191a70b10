"""ImbSAM: sharpness-aware minimisation of the tail-class loss only (cool-xuan/Imbalanced_SAM;
research/longtail_suite.md §1.3)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from difffeat.errors import UserError
from downstream.optim.head_tail import GroupLosses, split_losses, tail_tensor
from downstream.optim.sam import SharpnessAware, backward

RELEASED_TAIL_WEIGHT = 2.0  # the factor both released ImbSAM implementations put on the tail loss


class ImbSAM(SharpnessAware):
    """ImbSAM: min_w L_H(w) + max_{‖ε‖≤ρ} w_T·L_T(w + ε), with T = `tail_classes` (see `tail_classes(counts, η)`).

    One step, with L_H and L_T from `split_losses` (default: sums over the head / tail samples divided by the
    batch size) and w_T = `tail_weight`:

        g_H = ∇L_H(w);  g_T = ∇(w_T·L_T)(w);  ε = ρ·g_T / ‖g_T‖;
        w ← base_step(w, ∇(w_T·L_T)(w + ε) + g_H)   (at the restored w).

    Only the tail loss is perturbed. A batch without tail samples is a plain step on g_H. Costs 2 forward and
    3 backward passes. Default ρ = 0.05.

    Tail weight: both released implementations (cool-xuan/Imbalanced_SAM `utils/trainval.py` and its
    MindSpore port) multiply the tail loss by 2, hence the default `tail_weight=2.0`; ε does not depend on
    it (a direction), only the tail part of the update does. `tail_weight=1.0` is difffeat's former
    behaviour, kept as an option: then L_H + L_T is the batch mean, so that ImbSAM with ρ = 0 is plain
    SGD on the usual loss. The SSE-SAM repo's copy uses group means and no factor (`normalization="group"`,
    `tail_weight=1.0`). The weight applies to the tail loss whether the closure returns (losses, targets) or
    `GroupLosses` (unweighted group losses). `ignore_index` drops pixels/samples (segmentation).

    The closure returns (per-sample losses, targets), e.g. `(F.cross_entropy(head(x), y, reduction="none"), y)`,
    or a `GroupLosses`; it must not call backward. By hand: `parts = opt.group_losses(out)` (weighted);
    `parts.head.backward(retain_graph=True); opt.store_head_grad(); parts.tail.backward(); opt.first_step();
    opt.group_losses(out_at_perturbed).tail.backward(); opt.second_step()`.
    """

    def __init__(self, params, base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD, tail_classes=(),
                 rho: float = 0.05, tail_weight: float = RELEASED_TAIL_WEIGHT, normalization: str = "batch",
                 ignore_index: int | None = None, adaptive: bool = False, **kwargs):
        if rho < 0 or tail_weight < 0:
            raise ValueError(f"rho and tail_weight must be non-negative, got rho={rho}, tail_weight={tail_weight}")
        super().__init__(params, base_optimizer, {"rho": rho, "adaptive": adaptive}, **kwargs)
        self.tail = tail_tensor(tail_classes)
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
        self._add_stored("g_head")
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad(set_to_none=True)

    def step(self, closure: Callable | None = None) -> torch.Tensor:
        """One ImbSAM step; returns the objective L_H + w_T·L_T at w (detached)."""
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


def group_losses(out, tail: torch.Tensor, normalization: str, tail_weight: float,
                 ignore_index: int | None) -> GroupLosses:
    """A closure's output as head and tail losses, the tail one times `tail_weight`: (losses, targets) split by
    class (`split_losses`), a `GroupLosses` taken as the unweighted group losses."""
    if isinstance(out, GroupLosses):
        if tail_weight == 1.0:  # as is: bit-identical to the unweighted losses
            return out
        return out._replace(tail=tail_weight * out.tail)
    if isinstance(out, tuple) and len(out) == 2:
        return split_losses(out[0], out[1], tail, normalization, tail_weight, ignore_index)
    raise UserError("the closure of ImbSAM / SSE-SAM must return (per-sample losses, targets) or GroupLosses")
