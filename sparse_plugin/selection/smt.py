"""SMT (He et al., arXiv:2405.15525): train the sub-matrix blocks with the largest mean |gradient|.

For `warmup_steps` optimizer steps no value is updated; each layer's backward forms its dense weight gradient
once per micro-batch and adds |g| summed over each block of a `block_size` grid (clamped to the matrix;
blocks on the edges of dimensions that are not multiples are smaller) to a small (blocks_down × blocks_across)
table. Then the blocks of all targets are ranked together by mean |g| (sum over the block, summed over the
micro-batches, divided by the block's area: the reference's signed mean lets positive and negative
gradients cancel) and taken best first while they fit in the budget. Those blocks are trained for the rest of
the run with block GEMMs (`BlockPattern`), so per-layer counts change at selection and a layer may get none.

Under torch.distributed the block tables are summed over ranks before ranking.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..distributed import average_gradients_after_backward, is_distributed, summed
from ..kernels.blocks import block_areas, block_grid, block_positions
from ..layer import SparseDeltaLinear
from .base import Collector, OneShotSelector
from .schedule import warmup_length


class BlockStats(Collector):
    """Per-block sums of |g| for one layer over the warm-up micro-batches; no values' gradient meanwhile."""

    STATE = ("sums",)

    def __init__(self, layer: SparseDeltaLinear, block_size: int):
        self.shape = layer.shape
        self.block = block_grid(layer.shape, block_size)
        grid = tuple(-(-n // b) for n, b in zip(self.shape, self.block))
        self.sums = torch.zeros(grid, dtype=torch.float32, device=layer.indices.device)

    @torch.no_grad()
    def __call__(self, dense_grad: torch.Tensor) -> None:
        (out_features, in_features), (height, width) = self.shape, self.block
        grid_rows, grid_cols = self.sums.shape
        padded = F.pad(dense_grad.abs(), (0, grid_cols * width - in_features, 0, grid_rows * height - out_features))
        self.sums += padded.view(grid_rows, height, grid_cols, width).sum(dim=(1, 3))

    def block_areas(self) -> torch.Tensor:
        ids = torch.arange(self.sums.numel(), device=self.sums.device)
        return block_areas(ids, self.shape, self.block).view_as(self.sums)


def choose_blocks(scores: list[torch.Tensor], areas: list[torch.Tensor], budget: int) -> list[torch.Tensor]:
    """Global best-first choice: for each layer, the ids (row-major over its grid) of the chosen blocks.

    Blocks are ranked by score over all layers together (ties: earlier layer, then lower id) and taken while
    the running total of their areas stays within `budget`; at least one block is always taken.
    """
    flat_scores = torch.cat([s.reshape(-1).cpu() for s in scores])
    flat_areas = torch.cat([a.reshape(-1).cpu() for a in areas])
    owner = torch.cat([torch.full((s.numel(),), i) for i, s in enumerate(scores)])
    order = torch.sort(flat_scores, descending=True, stable=True).indices
    fits = torch.cumsum(flat_areas[order], 0) <= budget
    fits[0] = True
    chosen = order[fits]
    offsets = torch.tensor([0] + [s.numel() for s in scores]).cumsum(0)
    return [(chosen[owner[chosen] == i] - offsets[i]).sort().values.to(s.device) for i, s in enumerate(scores)]


class SmtSelector(OneShotSelector):
    """SMT's schedule: block statistics during the warm-up, one global choice of blocks, then static."""

    def __init__(self, model, config, optimizer, total_steps=None):
        super().__init__(model, config, optimizer, total_steps)
        self.prepare_next_step()

    def prepare_next_step(self) -> None:
        if self.selected and is_distributed():
            # DDP's gradient hooks stay on the accumulators of the values it wrapped, which the resize replaced, so
            # the resized values' gradients are averaged by hooks of our own, at the end of each backward.
            average_gradients_after_backward([layer.delta for _, layer in self.layers])
        super().prepare_next_step()

    def make_collector(self, layer: SparseDeltaLinear) -> BlockStats:
        return BlockStats(layer, self.config.block_size)

    def after_step(self) -> None:
        if not self.selected:
            warmup = warmup_length(self.config, self.total_steps)
            if warmup is None:
                self.require_total_steps()
            if self.optimizer.completed_steps >= warmup:
                self.select()
        self.prepare_next_step()

    @torch.no_grad()
    def select(self) -> None:
        """Rank the gathered blocks of all layers and switch every layer to its chosen blocks."""
        stats = [self.collectors[key] for key, _ in self.layers]
        areas = [s.block_areas() for s in stats]
        scores = [summed(s.sums) / a for s, a in zip(stats, areas)]
        budget = sum(layer.indices.numel() for _, layer in self.layers)
        chosen = choose_blocks(scores, areas, budget)
        trained = 0
        for (_, layer), blocks, s in zip(self.layers, chosen, stats):
            layer.set_indices(block_positions(blocks, layer.shape, s.block))
            self.optimizer.reset_state(layer.values)
            trained += layer.indices.numel()
        self.mark_selected(
            {"sparse/selected_blocks": sum(b.numel() for b in chosen), "sparse/trained_values": trained}
        )
