"""DRAUC's optimizer: LibAUC's PESG as EldercatSAM/DRAUC releases it (`optimizers/DRAUC.py`, `DRAUCOptim`;
research/longtail_suite.md §2.4), for the minimised variables of the AUC min-max problem (the model and a, b).
"""

from __future__ import annotations

import torch


class PESG(torch.optim.Optimizer):
    """Proximal epoch stochastic gradient with DRAUC's update of each minimised variable θ (model weights, a, b):

        d = clamp(∇θ, −c, c) + γ·(θ − θ_ref) + wd·θ             (c = `clip_value`, γ = `epoch_decay`)
        buf ← d at the first step, then (1 − β)·buf + β·d;  d = buf   (β = `momentum`; 0: no buffer)
        θ ← θ − lr·d;   θ_acc ← θ_acc + θ

    `update_reference()` (the code's `update_regularizer`, called at each learning-rate decay epoch) sets
    θ_ref ← θ_acc / T, T the steps since the last update, and clears θ_acc. θ_ref starts as N(0, 0.01²) noise,
    as in the code (drawn from a generator seeded by `seed` here, so that a run repeats). The momentum is the
    code's: the new direction is weighted by β = 0.9, the buffer by 1 − β (LibAUC's PESG form, not heavy-ball).
    α, the maximised variable, is not a parameter here: `downstream.losses.DRAUCLoss.ascend_alpha(lr)` after
    the step takes the code's closed-form ascent with the same learning rate.

    Defaults: the code's clip 1, γ = 2e-3 (1/500), momentum 0.9 as DRAUC's `train.py` passes it, weight decay
    5e-4 (`--wd`). State (buffer, reference, accumulator per parameter; T in the parameter group) lives in the
    optimizer's `state_dict`, so a checkpoint resumes it exactly.
    """

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 5e-4,
                 epoch_decay: float = 2e-3, clip_value: float = 1.0, seed: int = 0):
        if lr <= 0 or momentum < 0 or weight_decay < 0 or epoch_decay < 0 or clip_value <= 0:
            raise ValueError(f"PESG: lr {lr} and clip {clip_value} must be positive, momentum {momentum}, weight "
                             f"decay {weight_decay} and epoch decay {epoch_decay} non-negative")
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "epoch_decay": epoch_decay,
                    "clip_value": clip_value, "steps_since_reference": 0}
        super().__init__(params, defaults)
        gen = torch.Generator().manual_seed(seed)
        for group in self.param_groups:
            for p in group["params"]:
                ref = torch.empty(p.shape, dtype=p.dtype).normal_(0.0, 0.01, generator=gen).to(p.device)
                self.state[p]["reference"] = ref
                self.state[p]["accumulated"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, beta = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                d = p.grad.clamp(-group["clip_value"], group["clip_value"])
                d = d + group["epoch_decay"] * (p - state["reference"]) + group["weight_decay"] * p
                if beta != 0:
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = d.clone()
                    else:
                        state["momentum_buffer"].mul_(1 - beta).add_(d, alpha=beta)
                    d = state["momentum_buffer"]
                p.sub_(lr * d)
                state["accumulated"].add_(p)
            group["steps_since_reference"] += 1
        return loss

    @torch.no_grad()
    def update_reference(self) -> None:
        """θ_ref ← mean of the iterates since the last update; the accumulator restarts (no-op before any step)."""
        for group in self.param_groups:
            steps = group["steps_since_reference"]
            if steps == 0:
                continue
            for p in group["params"]:
                state = self.state[p]
                state["reference"].copy_(state["accumulated"] / steps)
                state["accumulated"].zero_()
            group["steps_since_reference"] = 0
