"""Selection statistics summed over ranks, so every process picks the same positions (identity without
torch.distributed). Scores are reduced before any top-k; gradients are left to DDP."""

from __future__ import annotations

import torch
import torch.distributed as dist


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
