"""SpIEL's prune/regrow (Ansell et al., arXiv:2401.16405), as vectorised tensor ops on the indices' device.

Each round, per matrix with k trained positions and rate p: prune the n = ⌊p·k⌋ positions with the smallest
|Δ|, then regrow the n best-scoring positions not among those that remain. A pruned position that is
also regrown never leaves: it keeps its value and optimizer state (and is not counted as regrown). New
positions start at Δ = 0 with zeroed per-position optimizer state. Scores:

* MA: r_i · c_j from the SM3 accumulators, computed in row chunks so no dense (out × in) score matrix exists.
* AG: gradients summed over the gathering micro-batches for the top-k |g| candidates of the first one; the
  dense per-layer gradient exists only inside that layer's backward (see `SparseLinearFunction`).

Under torch.distributed the first gathering gradient and the sums are all-reduced, so every rank takes the
same decision; MA's accumulators are identical on all ranks already, since DDP reduces gradients first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..distributed import summed
from ..layer import SparseDeltaLinear
from ..sizing import SCORE_CHUNK
from .base import Collector, Selector
from .protocol import RowColAccumulators
from .schedule import gathers_for_a_round, is_reselection_step, reselection_rate


@dataclass
class Regrowth:
    """New sorted indices, and for each new slot its old slot (-1 for a regrown position)."""

    indices: torch.Tensor
    source: torch.Tensor
    regrown: int


CandidateFn = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


def prune_regrow(indices: torch.Tensor, values: torch.Tensor, count: int, candidates: CandidateFn) -> Regrowth:
    """One round on one matrix.

    Args:
        indices: sorted unique flat positions (k,). values: their Δ (k,).
        count: positions to prune and regrow (clamped to k).
        candidates: `fn(remaining, n) -> (positions, scores)`, the n best positions outside the sorted
            `remaining` set (active minus pruned), or fewer if fewer exist.
    """
    k = indices.numel()
    slots = torch.arange(k, device=indices.device)
    count = min(count, k)
    if count == 0:
        return Regrowth(indices, slots, 0)
    pruned = torch.topk(values.detach().abs().float(), count, largest=False, sorted=True).indices  # smallest first
    remaining_mask = torch.ones(k, dtype=torch.bool, device=indices.device)
    remaining_mask[pruned] = False
    positions, scores = candidates(indices[remaining_mask], count)
    incoming = positions[torch.topk(scores, min(count, positions.numel()), sorted=True).indices]
    pruned_positions = indices[pruned]
    new_positions = incoming[~torch.isin(incoming, pruned_positions)]
    leaving = pruned[~torch.isin(pruned_positions, incoming)][: new_positions.numel()]
    keep = torch.ones(k, dtype=torch.bool, device=indices.device)
    keep[leaving] = False
    merged = torch.cat([indices[keep], new_positions])
    source = torch.cat([slots[keep], torch.full_like(new_positions, -1)])
    order = torch.argsort(merged)
    return Regrowth(merged[order], source[order], int(new_positions.numel()))


def top_outer_scores(
    row: torch.Tensor, col: torch.Tensor, exclude: torch.Tensor, count: int, matrices: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """The `count` largest r_i·c_j over flat positions not in the sorted `exclude`, in row chunks.

    With `matrices` > 1 (fused experts) rows and columns are per stacked matrix: row i of matrix m pairs with
    that matrix's columns, `col[m·in + j]`.
    """
    out_features, in_features = row.numel(), col.numel() // matrices
    col_by_matrix = col.view(matrices, in_features)
    rows_per_matrix = out_features // matrices
    rows_per_chunk = max(1, SCORE_CHUNK // in_features)
    best_pos = torch.empty(0, dtype=torch.int64, device=row.device)
    best_score = torch.empty(0, dtype=torch.float32, device=row.device)
    for start in range(0, out_features, rows_per_chunk):
        stop = min(out_features, start + rows_per_chunk)
        if matrices == 1:
            chunk_cols = col[None, :]
        else:
            chunk_cols = col_by_matrix[torch.arange(start, stop, device=row.device) // rows_per_matrix]
        scores = (row[start:stop, None].float() * chunk_cols.float()).reshape(-1)
        lo, hi = torch.searchsorted(
            exclude,
            torch.tensor([start * in_features, stop * in_features], dtype=exclude.dtype, device=exclude.device),
        ).tolist()
        scores[exclude[lo:hi] - start * in_features] = -torch.inf
        top = torch.topk(scores, min(count, scores.numel()))
        best_pos = torch.cat([best_pos, top.indices + start * in_features])
        best_score = torch.cat([best_score, top.values])
        if best_pos.numel() > count:
            keep = torch.topk(best_score, count).indices
            best_pos, best_score = best_pos[keep], best_score[keep]
    valid = best_score > -torch.inf
    return best_pos[valid], best_score[valid]


class GradientGatherer(Collector):
    """AG statistics of one layer, fed the dense weight gradient of each gathering micro-batch.

    The first call fixes the candidates (top-k |g|, k = trained positions, over all positions); every call
    adds the gradient at the candidates. It also sums ‖g_active‖² and ‖g‖² for the logged share of the
    gradient that the trained positions capture. Returns the values' gradient, gathered from the dense one.
    """

    STATE = ("candidates", "sums", "active_sq", "total_sq")

    def __init__(self, layer: SparseDeltaLinear):
        self.layer = layer
        self.candidates: torch.Tensor | None = None
        self.sums: torch.Tensor | None = None
        self.active_sq = 0.0
        self.total_sq = 0.0

    @torch.no_grad()
    def __call__(self, dense_grad: torch.Tensor) -> torch.Tensor:
        flat = dense_grad.view(-1)
        if self.candidates is None:
            global_grad = summed(flat)
            top = torch.topk(global_grad.abs(), self.layer.indices.numel(), sorted=False).indices
            self.candidates = top.sort().values.to(self.layer.indices.dtype)
            self.sums = torch.zeros(self.candidates.numel(), dtype=torch.float32, device=flat.device)
        self.sums += flat[self.candidates]
        self.active_sq += float(flat[self.layer.indices].square().sum())
        self.total_sq += float(flat.square().sum())
        return flat.index_select(0, self.layer.indices)

    def candidate_fn(self) -> CandidateFn:
        scores = summed(self.sums).abs()

        def candidates(remaining: torch.Tensor, count: int):
            outside = ~torch.isin(self.candidates, remaining)
            return self.candidates[outside], scores[outside]

        return candidates


class SpielSelector(Selector):
    """SpIEL's schedule: gathering on AG steps, prune/regrow every `reselection_steps` optimizer steps."""

    def __init__(self, model, config, optimizer, total_steps=None):
        if config.regrow == "ma" and not isinstance(optimizer, RowColAccumulators):
            raise ValueError(
                f"`regrow='ma'` scores positions by SM3's accumulators, which {type(optimizer).__name__} does not keep; "
                "use optim='spiel_sm3' (sparse_plugin.optim.SM3) or set `regrow='ag'`."
            )
        super().__init__(model, config, optimizer, total_steps)
        self.prepare_next_step()

    def make_collector(self, layer: SparseDeltaLinear) -> GradientGatherer:
        return GradientGatherer(layer)

    def prepare_next_step(self) -> None:
        """Switch AG gathering on for the coming step's micro-batches if it is a gathering step, else off."""
        step = self.optimizer.completed_steps + 1
        gather = self.config.regrow == "ag" and gathers_for_a_round(step, self.config, self.total_steps)
        if gather:
            for key, layer in self.layers:
                if key not in self.collectors:
                    self.collectors[key] = self.make_collector(layer)
        self.set_collectors(self.collectors if gather else None)

    def after_step(self) -> None:
        step, total = self.optimizer.completed_steps, self.require_total_steps()
        if is_reselection_step(step, self.config, total):
            self.reselect(reselection_rate(step, self.config, total))
        self.prepare_next_step()

    @torch.no_grad()
    def reselect(self, rate: float) -> dict[str, float]:
        """Prune and regrow `rate` of every matrix now; returns (and keeps for logging) the round's metrics."""
        regrown = trained = 0
        active_sq = total_sq = 0.0
        for key, layer in self.layers:
            count = int(rate * layer.indices.numel())
            candidates = self._candidates(key, layer)
            if candidates is None or count == 0:
                continue
            result = prune_regrow(layer.indices, layer.values, count, candidates)
            self._apply(layer, result)
            regrown += result.regrown
            trained += layer.indices.numel()
        for gatherer in self.collectors.values():
            active_sq, total_sq = active_sq + gatherer.active_sq, total_sq + gatherer.total_sq
        self.collectors.clear()
        self.last_round = {"sparse/reselection_rate": rate, "sparse/regrown": regrown}
        if total_sq > 0:
            self.last_round["sparse/active_grad_share"] = active_sq / total_sq
        return self.last_round

    def _candidates(self, key: str, layer: SparseDeltaLinear) -> CandidateFn | None:
        if self.config.regrow == "ag":
            gatherer = self.collectors.get(key)
            return gatherer.candidate_fn() if gatherer is not None and gatherer.candidates is not None else None
        accumulators = self.optimizer.row_col_accumulators(layer.values)
        if accumulators is None:
            return None
        row, col = accumulators
        return lambda remaining, count: top_outer_scores(row, col, remaining, count, layer.matrices)

    def _apply(self, layer: SparseDeltaLinear, result: Regrowth) -> None:
        source = result.source
        new = source < 0
        values = layer.values.detach()[source.clamp(min=0)]
        values[new] = 0
        layer.assign(result.indices, values)
        layer.values.grad = None
        self.optimizer.remap_state(layer.values, source)
