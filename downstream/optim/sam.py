"""Sharpness-aware minimisation (Foret et al. 2021; research/longtail_suite.md §1.2), wrapping any optimizer.

The SAM family here shares one contract: the closure runs the forward pass and *returns* the loss, it does
not call `backward()` (the optimizer back-propagates each part itself; a closure that calls backward is
refused). This differs from davda54/sam, whose closure back-propagates. A closure may return a scalar loss,
a pair (per-sample losses, targets), or a `GroupLosses`; ImbSAM and SSE-SAM need one of the latter two.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from downstream.optim.head_tail import GroupLosses, split_losses

EPS = 1e-12


class SharpnessAware(torch.optim.Optimizer):
    """Base of SAM, ImbSAM and SSE-SAM: a base optimizer built on the same parameter groups, and perturbations.

    `base_optimizer` is an optimizer class (e.g. `torch.optim.SGD`), built as `base_optimizer(param_groups,
    **kwargs)`; weight decay and momentum live there and apply at the restored point. Learning-rate
    schedulers may wrap this optimizer or `.base_optimizer` (they share the parameter groups).
    """

    def __init__(self, params, base_optimizer: type[torch.optim.Optimizer], defaults: dict, **kwargs):
        super().__init__(params, {**defaults, **kwargs})
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    def _grads(self, source: str | None):
        for group in self.param_groups:
            for p in group["params"]:
                g = p.grad if source is None else self.state[p].get(source)
                if g is not None:
                    yield group, p, g

    @torch.no_grad()
    def _grad_norm(self, source: str | None = None) -> torch.Tensor:
        norms = [((p.abs() if group["adaptive"] else 1.0) * g).norm(2) for group, p, g in self._grads(source)]
        if not norms:
            return torch.zeros(())
        return torch.stack([n.to(norms[0].device) for n in norms]).norm(2)  # global, across devices

    @torch.no_grad()
    def _perturb(self, rho: str | float = "rho", source: str | None = None) -> None:
        """w ← w + ε, ε = ρ·g/‖g‖ (ASAM when `adaptive`: ε = ρ·w²·g/‖w·g‖), g = .grad or state[source];
        ρ is a value or the name of a parameter-group entry."""
        norm = self._grad_norm(source)
        for group, p, g in list(self._grads(source)):
            radius = group[rho] if isinstance(rho, str) else rho
            e_w = (p * p if group["adaptive"] else 1.0) * g * (radius / (norm.to(p.device) + EPS))
            p.add_(e_w)
            self.state[p]["e_w"] = e_w

    @torch.no_grad()
    def _restore(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                e_w = self.state[p].pop("e_w", None)
                if e_w is not None:
                    p.sub_(e_w)

    @torch.no_grad()
    def _add_stored(self, key: str) -> None:
        """p.grad += state[p][key] (and forget it), creating p.grad where only the stored gradient exists."""
        for group in self.param_groups:
            for p in group["params"]:
                stored = self.state[p].pop(key, None)
                if stored is None:
                    continue
                if p.grad is None:
                    p.grad = stored
                else:
                    p.grad.add_(stored)

    def _evaluate(self, closure: Callable):
        self.zero_grad(set_to_none=True)
        with torch.enable_grad():
            out = closure()
        if any(p.grad is not None for group in self.param_groups for p in group["params"]):
            raise RuntimeError("the closure must return the loss without calling backward(): "
                               "the SAM-family optimizer back-propagates itself")
        return out

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        self.base_optimizer.param_groups = self.param_groups


def as_loss(out) -> torch.Tensor:
    """A closure's output as one scalar: a loss as is; (losses, targets) their mean; GroupLosses head + tail."""
    if isinstance(out, GroupLosses):
        return out.head + out.tail
    if isinstance(out, tuple):
        losses, targets = out
        return sum(split_losses(losses, targets, torch.tensor([], dtype=torch.long), "batch")[:2])
    return out


def backward(loss: torch.Tensor, retain_graph: bool = False) -> None:
    if loss.requires_grad:
        loss.backward(retain_graph=retain_graph)


class SAM(SharpnessAware):
    """SAM: min_w max_{‖ε‖≤ρ} L(w + ε), one step as (Foret et al.; davda54/sam):

        g = ∇L(w);  ε = ρ·g / ‖g‖  (global norm over all parameters that have a gradient);
        g′ = ∇L(w + ε);  w ← base_step(w, g′)  (taken at the restored w).

    `step(closure)` does it all (2 forward, 2 backward). By hand: `loss.backward(); opt.first_step(zero_grad=
    True); loss_at_perturbed.backward(); opt.second_step(zero_grad=True)`. `adaptive=True` is ASAM (ε scaled
    by w², useful on small heads, research/longtail_suite.md §7). Default ρ = 0.05.

    >>> w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    >>> opt = SAM([w], torch.optim.SGD, rho=0.5, lr=0.1)
    >>> _ = opt.step(lambda: (w ** 2).sum() / 2)  # ∇ = w; ε = 0.5·w/5; w ← w − 0.1·(w + ε)
    >>> [round(x, 4) for x in w.tolist()]
    [2.67, 3.56]
    """

    def __init__(self, params, base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD, rho: float = 0.05,
                 adaptive: bool = False, **kwargs):
        if rho < 0:
            raise ValueError(f"rho must be non-negative, got {rho}")
        super().__init__(params, base_optimizer, {"rho": rho, "adaptive": adaptive}, **kwargs)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Climb to w + ε from the gradient now in `.grad`."""
        self._perturb("rho")
        if zero_grad:
            self.zero_grad(set_to_none=True)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Return to w and take the base step with the gradient now in `.grad` (computed at w + ε)."""
        self._restore()
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad(set_to_none=True)

    def step(self, closure: Callable | None = None) -> torch.Tensor:
        """One SAM step; returns the loss at w (detached). The closure returns the loss (no backward)."""
        if closure is None:
            raise RuntimeError("SAM needs a closure (or use first_step / second_step)")
        loss = as_loss(self._evaluate(closure))
        backward(loss)
        self.first_step(zero_grad=True)
        backward(as_loss(self._evaluate(closure)))
        self.second_step(zero_grad=True)
        return loss.detach()
