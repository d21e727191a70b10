"""SSE-SAM: group-wise SAM for head and tail, then tail-only after γ·E epochs (Zemdalk/SSE-SAM;
research/longtail_suite.md §1.4)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from downstream.optim.head_tail import GroupLosses, tail_tensor
from downstream.optim.imbsam import group_losses
from downstream.optim.sam import SharpnessAware, backward


class SSESAM(SharpnessAware):
    """SSE-SAM: each group gets its own perturbation; the head's is switched off after γ·E epochs.

    With L_H, L_T the head and tail losses, each normalised by the full batch size (L_H + L_T = batch mean):

        ε_H = ρ_H(t)·∇L_H(w)/‖∇L_H(w)‖,  ε_T = ρ_T·∇L_T(w)/‖∇L_T(w)‖,
        w ← base_step(w, ∇L_H(w + ε_H) + ∇L_T(w + ε_T)),
        ρ_H(t) = ρ_H while fewer than ⌈γ·E⌉ epochs are complete, else 0 (then the head is taken at w: ImbSAM).

    Call `epoch_end()` once after every training epoch (the code's `update_rho`). γ = 0 means "never switch"
    (as the code's `cut_epoch > 0` guard intends; its γ ∉ (0, 1) crashes there). Defaults are the README's
    CIFAR-100-LT run: ρ_H = 0.05, ρ_T = 0.10, γ = 0.7 (switch after 140 of 200 epochs), with η = 100 for the
    tail split. An empty group contributes no gradient and no perturbation.

    `step(closure)` (closure as for `ImbSAM`) needs 3 forward and 4 backward passes (2 and 3 after the
    switch); the arithmetic is the code's 4 + 4. By hand, for each group: its loss at w `.backward()`, then
    `first_step(group)`, its loss at w + ε `.backward()`, `second_step()` (or just `accumulate()` for an
    unperturbed group), and finally `base_step()`.
    """

    def __init__(self, params, base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD, tail_classes=(),
                 rho_head: float = 0.05, rho_tail: float = 0.10, gamma: float = 0.7, total_epochs: int = 200,
                 normalization: str = "batch", ignore_index: int | None = None, adaptive: bool = False,
                 **kwargs):
        if rho_head < 0 or rho_tail < 0:
            raise ValueError(f"radii must be non-negative, got rho_head={rho_head}, rho_tail={rho_tail}")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {gamma}")
        switch = None if gamma == 0 else math.ceil(gamma * total_epochs - 1e-9)
        defaults = {"rho_head": rho_head, "rho_tail": rho_tail, "adaptive": adaptive, "epochs_done": 0,
                    "switch_epoch": switch}
        super().__init__(params, base_optimizer, defaults, **kwargs)
        self.tail = tail_tensor(tail_classes)
        self.normalization, self.ignore_index = normalization, ignore_index

    @property
    def epochs_done(self) -> int:
        return self.param_groups[0]["epochs_done"]

    @property
    def switched(self) -> bool:
        """True once ρ_H has been set to 0 (⌈γ·E⌉ epochs complete)."""
        switch = self.param_groups[0]["switch_epoch"]
        return switch is not None and self.epochs_done >= switch

    @property
    def rho_head(self) -> float:
        """The head radius in force now (0 after the switch)."""
        return 0.0 if self.switched else self.param_groups[0]["rho_head"]

    def epoch_end(self) -> None:
        """Count one completed epoch (ρ_H drops to 0 once ⌈γ·E⌉ are complete)."""
        for group in self.param_groups:
            group["epochs_done"] += 1

    def group_losses(self, out) -> GroupLosses:
        return group_losses(out, self.tail, self.normalization, 1.0, self.ignore_index)

    @torch.no_grad()
    def first_step(self, group: str, zero_grad: bool = True) -> None:
        """Climb to w + ε for `group` ("head" or "tail") from the gradient now in `.grad`."""
        if group == "head":
            self._perturb(self.rho_head)
        elif group == "tail":
            self._perturb("rho_tail")
        else:
            raise ValueError(f"group must be 'head' or 'tail', got {group!r}")
        if zero_grad:
            self.zero_grad(set_to_none=True)

    @torch.no_grad()
    def accumulate(self, zero_grad: bool = True) -> None:
        """Add `.grad` to the step's gradient sum."""
        for _, p, g in list(self._grads(None)):
            total = self.state[p].get("g_sum")
            self.state[p]["g_sum"] = g.clone() if total is None else total.add_(g)
        if zero_grad:
            self.zero_grad(set_to_none=True)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = True) -> None:
        """Add `.grad` (taken at w + ε) to the gradient sum and return to w."""
        self.accumulate(zero_grad)
        self._restore()

    @torch.no_grad()
    def base_step(self) -> None:
        """Base step with the gradient sum; clears it and `.grad`."""
        self.zero_grad(set_to_none=True)
        self._add_stored("g_sum")
        self.base_optimizer.step()
        self.zero_grad(set_to_none=True)

    def step(self, closure: Callable | None = None) -> torch.Tensor:
        """One SSE-SAM step; returns L_H + L_T at w (detached)."""
        if closure is None:
            raise RuntimeError("SSE-SAM needs a closure (or use first_step / second_step / base_step)")
        parts = self.group_losses(self._evaluate(closure))
        for name in ("head", "tail"):  # both gradients at w, from one forward
            backward(getattr(parts, name), retain_graph=name == "head")
            self._stash(f"g_{name}_w")
        for name, rho in (("head", self.rho_head), ("tail", self.param_groups[0]["rho_tail"])):
            if rho == 0 or getattr(parts, f"n_{name}") == 0:
                self._add_stored(f"g_{name}_w")
                self.accumulate()
                continue
            self._add_stored(f"g_{name}_w")
            self.first_step(name)
            backward(getattr(self.group_losses(self._evaluate(closure)), name))
            self.second_step()
        self.base_step()
        return (parts.head + parts.tail).detach()

    @torch.no_grad()
    def _stash(self, key: str) -> None:
        for _, p, g in list(self._grads(None)):
            self.state[p][key] = g.clone()
        self.zero_grad(set_to_none=True)
