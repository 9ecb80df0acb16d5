"""The Triton kernel of `scatter` (merge `W[idx] += alpha * v`, exact restore `W[idx] = v`) and its launcher.

Kept apart from `scatter.py` so that only the CUDA path imports Triton. Indices are unique, so each program writes
disjoint positions and needs no atomics.
"""

from __future__ import annotations

import torch

from ._triton import round_for_store, tl, triton

_BLOCK = 1024


@triton.jit
def _scatter_kernel(
    weight_ptr, indices_ptr, values_ptr, n, alpha, ADD: tl.constexpr, BF16: tl.constexpr, BLOCK: tl.constexpr
):
    """Write `weight[indices[p]] = weight[...] * ADD + alpha * values[p]` for p in one block.

    Parameters:
        weight_ptr: flat dense weight, modified in place (fp32/bf16/fp16).
        indices_ptr: flat positions, unique, int32 or int64, each in [0, weight's numel): validated by the
            caller (see `scatter`'s module docstring), as the kernel does not check.
        values_ptr: one value per position, any float dtype.
        n: number of positions.
        alpha: scale of the values (1 to merge, -1 to subtract); ignored when ADD is false.
        ADD: add to the current entry (merge) or overwrite it (exact restore).
        BF16: the weight is bf16 (rounded by `round_for_store`).
        BLOCK: positions per program.
    """
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    idx = tl.load(indices_ptr + offsets, mask=mask, other=0).to(tl.int64)
    vals = tl.load(values_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if ADD:
        current = tl.load(weight_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        vals = current + alpha * vals
    tl.store(weight_ptr + idx, round_for_store(vals, weight_ptr, BF16), mask=mask)


def launch(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, alpha: float, add: bool) -> None:
    n = indices.numel()
    if n == 0:
        return
    grid = (triton.cdiv(n, _BLOCK),)
    _scatter_kernel[grid](
        weight, indices, values, n, float(alpha), ADD=add, BF16=weight.dtype == torch.bfloat16, BLOCK=_BLOCK
    )
