"""What the sparse deltas need from torch.distributed: selection statistics summed over ranks, so every process
picks the same positions (identity without torch.distributed), and gradients averaged over ranks, at the end of each
backward, for deltas that no data-parallel wrapper reduces (kept out of FSDP's shards, or resized by SMT after DDP
wrapped them)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .layer import SparseDelta
from .model import require_sparse_layers


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place (a copy is the caller's business); identity in a single process."""
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


def summed(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over ranks as a new tensor where reduction happens, else `tensor` itself (no copy)."""
    return all_reduce_sum(tensor.clone()) if is_distributed() else tensor


@torch.no_grad()
def average_over_ranks(tensors: list[torch.Tensor]) -> None:
    """Replace each tensor by its mean over ranks, in one flat fp32 all-reduce (identity in one process).

    Idempotent up to rounding on tensors that are already equal on all ranks, which is what makes a repeated call
    per micro-batch correct under gradient accumulation.
    """
    tensors = [t for t in tensors if t.numel()]
    if not tensors or not is_distributed():
        return
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for tensor, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        tensor.copy_(part.view_as(tensor))


class _GradientAverager:
    """Post-accumulate-grad hook on every delta's values: the first one to fire in a backward queues one callback
    for the end of that backward, which averages all the values' gradients over ranks in a single all-reduce."""

    def __init__(self, deltas: list[SparseDelta]):
        self.deltas = deltas
        self.queued = False
        for delta in deltas:
            delta.values.register_post_accumulate_grad_hook(self._on_gradient)
            delta._gradient_averager = self

    def _on_gradient(self, _param) -> None:
        if not self.queued and is_distributed():
            self.queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._average)

    def _average(self) -> None:
        self.queued = False
        average_over_ranks([d.values.grad for d in self.deltas if d.values.grad is not None])


def keep_deltas_replicated(model: nn.Module) -> list[nn.Module]:
    """Keep every sparse delta whole on each rank while a sharding wrapper (FSDP) shards the frozen base; returns
    the modules FSDP must leave unsharded.

    Prune/regrow, SM3's row/column maxima and the adapter file need each target's whole `values` and `indices`, and
    they are a few percent of the model, so FSDP should shard only the base: pass the returned modules to FSDP as
    ignored (FSDP1 `ignored_modules=`, FSDP2 `ignored_params=` their parameters). FSDP then leaves the values'
    gradients alone, so this also averages them over ranks at the end of every backward (one flat all-reduce),
    before gradient clipping and the optimizer see them. A sharded weight cannot hold W0 + Δ, so `nn.Linear`
    targets switch to the additive forward and only their `SparseDelta` is returned. A non-Linear target (fused
    experts, Conv1D, embeddings) has no additive path: the modules owning its weight are returned, so that weight
    stays whole on every rank, as under DDP (its full size per rank; the rest of the model is sharded). Idempotent;
    `SparseCallback` calls it for the Trainer when `fsdp` is configured.

    Example:
        ```python
        >>> ignored = {p for m in keep_deltas_replicated(model) for p in m.parameters()}
        >>> for block in model.model.layers:
        ...     fully_shard(block, ignored_params=ignored)
        >>> fully_shard(model, ignored_params=ignored)
        ```
    """
    from .parameter import SparseDeltaParameter  # imports the layer module, as this one does

    layers = [layer for _, layer in require_sparse_layers(model)]
    ignored: list[nn.Module] = []
    for layer in layers:
        if isinstance(layer, SparseDeltaParameter):
            ignored += [owner for owner in layer.owners if not any(owner is m for m in ignored)]
        else:  # a sharded base weight cannot hold W0 + Δ
            layer.restore_base_weight()
            layer.forward_strategy = "additive"
            ignored.append(layer.delta)
    average_gradients_after_backward([layer.delta for layer in layers])
    return ignored


def average_gradients_after_backward(deltas: list[SparseDelta]) -> None:
    """From the next backward on, average these deltas' gradients over ranks when it ends (idempotent)."""
    missing = [d for d in deltas if getattr(d, "_gradient_averager", None) is None]
    if missing:
        _GradientAverager(missing)


def averages_delta_gradients(deltas: list[SparseDelta]) -> bool:
    """Whether `keep_deltas_replicated` already averages these deltas' gradients over ranks."""
    return all(getattr(d, "_gradient_averager", None) is not None for d in deltas)
