"""SIFT (Song et al., "Sparse is Enough in Fine-tuning Pre-trained LLMs"): per matrix, train the k positions
with the largest |gradient| accumulated over the first `selection_steps` micro-batches, then keep them.

Keeping a dense gradient sum per matrix across micro-batches would cost full fine-tuning's gradient memory,
so the sum is kept for a *pool*: the `POOL_FACTOR`·k positions with the largest |g| in the first micro-batch
(exact whenever the pool covers the matrix, i.e. density ≥ 1/POOL_FACTOR). The dense per-layer gradient exists
only inside that layer's backward.

No one-step lag (the reference applies its first update a step late): each layer chooses inside the backward
of the `selection_steps`-th micro-batch and returns, as the values' gradient, the pool sums of the current
optimizer step at the chosen positions; the step's remaining micro-batches add theirs normally, so the update
of that step (clipping included) lands in the weights the next step uses. Earlier steps update nothing.

Under torch.distributed the first-micro-batch gradient and the sums are summed over ranks before any top-k.
"""

from __future__ import annotations

import torch

from ..distributed import summed
from ..layer import SparseDeltaLinear
from ..sizing import POOL_FACTOR
from .base import Collector, OneShotSelector


class PoolGatherer(Collector):
    """SIFT statistics of one layer: gradient sums over a candidate pool, for the run and for the current step."""

    STATE = ("calls", "pool", "sums", "step_sums")

    def __init__(self, layer: SparseDeltaLinear, selection_steps: int):
        self.layer = layer
        self.selection_steps = selection_steps
        self.calls = 0
        self.pool: torch.Tensor | None = None
        self.sums: torch.Tensor | None = None
        self.step_sums: torch.Tensor | None = None

    @property
    def done(self) -> bool:
        return self.calls >= self.selection_steps

    def new_step(self) -> None:
        if self.step_sums is not None:
            self.step_sums.zero_()

    @torch.no_grad()
    def __call__(self, dense_grad: torch.Tensor) -> torch.Tensor | None:
        flat = dense_grad.view(-1)
        if self.done:  # later micro-batches of the selecting step: the plain values' gradient
            return flat.index_select(0, self.layer.indices)
        if self.pool is None:
            size = min(flat.numel(), POOL_FACTOR * self.layer.indices.numel())
            top = torch.topk(summed(flat).abs(), size, sorted=False).indices
            self.pool = top.sort().values.to(self.layer.indices.dtype)
            self.sums = torch.zeros(size, dtype=torch.float32, device=flat.device)
            self.step_sums = torch.zeros_like(self.sums)
        pooled = flat.index_select(0, self.pool)
        self.sums += pooled
        self.step_sums += pooled
        self.calls += 1
        return self.select() if self.done else None

    def select(self) -> torch.Tensor:
        """Train the top-k |accumulated gradient| positions of the pool; their gradient for the current step."""
        top = torch.topk(summed(self.sums).abs(), self.layer.indices.numel(), sorted=False).indices
        top = top[torch.argsort(self.pool[top])]
        self.layer.set_indices(self.pool[top])  # values are still 0: no update before the choice
        grad = self.step_sums[top]
        self.pool = self.sums = self.step_sums = None
        return grad


class SiftSelector(OneShotSelector):
    """SIFT's schedule: pool statistics until each layer has seen `selection_steps` micro-batches, then static."""

    def __init__(self, model, config, optimizer, total_steps=None):
        super().__init__(model, config, optimizer, total_steps)
        self.prepare_next_step()

    def make_collector(self, layer: SparseDeltaLinear) -> PoolGatherer:
        return PoolGatherer(layer, self.config.selection_steps)

    def updates_allowed(self) -> bool:
        """From the step whose backward made the choice on."""
        return self.selected or bool(self.collectors) and all(g.done for g in self.collectors.values())

    def after_step(self) -> None:
        if not self.selected and self.updates_allowed():
            self.mark_selected({"sparse/trained_values": sum(layer.indices.numel() for _, layer in self.layers)})
        self.prepare_next_step()
