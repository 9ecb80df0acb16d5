"""Reading a model whose frozen base FSDP shards (FSDP1 `FullyShardedDataParallel` or FSDP2 `fully_shard`): the
sparse deltas stay whole on every rank (`keep_deltas_replicated`), but the base weight entries that an adapter
stores for a bit-exact unmerge have to be gathered from the shards, by every rank together."""

from __future__ import annotations

import torch
from torch import nn

from .model import iter_sparse_layers


def _fsdp1_units(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel.fsdp_modules(model)


def is_fsdp_wrapped(model: nn.Module) -> bool:
    """Whether FSDP (either version) shards any of the model's parameters."""
    from torch.distributed.fsdp import FSDPModule

    return bool(_fsdp1_units(model)) or any(isinstance(m, FSDPModule) for m in model.modules())


def is_whole(weight: torch.Tensor, shape: tuple[int, ...]) -> bool:
    """Whether `weight` is the full tensor of that shape here, not a shard: FSDP2 holds DTensors, FSDP1 1-D views."""
    from torch.distributed.tensor import DTensor

    return not isinstance(weight, DTensor) and tuple(weight.shape) == tuple(shape)


@torch.no_grad()
def gathered_base_values(model: nn.Module) -> dict[str, torch.Tensor]:
    """The frozen base weight at every sparse layer's indices, by adapter key, gathered from FSDP's shards.

    A collective: every rank must call it, in the same state. FSDP2 weights are gathered one matrix at a time
    (`DTensor.full_tensor`, in the stored dtype, whatever the mixed-precision policy), FSDP1 weights one wrapped
    unit at a time (`summon_full_params(recurse=False)`, full precision), so at most one unit is ever whole.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    layers = list(iter_sparse_layers(model))
    found: dict[str, torch.Tensor] = {}

    def collect() -> None:
        for key, layer in layers:
            weight = layer.stored_weight()
            if key not in found and is_whole(weight, layer.weight_shape):
                found[key] = layer.base_entries().clone()

    collect()  # bases outside any FSDP unit
    for key, layer in layers:
        weight = layer.stored_weight()
        if key not in found and isinstance(weight, DTensor):
            found[key] = weight.full_tensor().view(-1)[layer.indices].clone()
    for unit in _fsdp1_units(model):
        with FullyShardedDataParallel.summon_full_params(unit, recurse=False, writeback=False):
            collect()
    missing = [key for key, _ in layers if key not in found]
    if missing:
        raise RuntimeError(
            f"could not gather the base weight of {missing[0]} from FSDP's shards; save with store_base_values=False"
        )
    return found
