"""Data-parallel training of a head over several processes: gradients averaged after every backward pass.

DDP assumes one backward pass per forward pass and a fixed set of trained parameters. The SAM family
back-propagates several losses of one forward (ImbSAM: the head part, then the tail part) and ReconBoost trains
a different subset in each phase, so gradients are averaged here instead, at the end of each backward pass:
every parameter's post-accumulate hook notes that it received a gradient, and the first one of a pass queues
an autograd-engine callback that all-reduces the noted gradients, in parameter order, as one flat tensor.
Every process runs the same code on equally sized batches, so the same parameters receive gradients in every
pass, and the collectives match. A gradient accumulated over several passes is averaged correctly too: the
part already averaged is equal on every process.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn


class GradientAverager:
    """While installed on `model`, `.grad` after every backward pass is the mean over the processes."""

    def __init__(self, model: nn.Module):
        self.world = dist.get_world_size()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.order = {id(p): i for i, p in enumerate(self.params)}
        self.noted: set[int] = set()
        self.handles = [p.register_post_accumulate_grad_hook(self._note) for p in self.params]

    def _note(self, param: torch.Tensor) -> None:
        if not self.noted:
            torch.autograd.Variable._execution_engine.queue_callback(self._average)
        self.noted.add(self.order[id(param)])

    def _average(self) -> None:
        grads = [self.params[i].grad for i in sorted(self.noted)]
        self.noted.clear()
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


@contextlib.contextmanager
def averaged_gradients(model: nn.Module, world: int):
    """Gradients averaged over the `world` processes while the block runs (nothing to do for one process)."""
    if world == 1:
        yield
        return
    averager = GradientAverager(model)
    try:
        yield
    finally:
        averager.remove()
