"""The merged forward's weight, W = W0.to(dtype) + scatter(Δ), built fresh for one call.

The torch reference (the CPU path) copies W0 into the compute dtype, then scatters the values (one fp32
add, one rounding per position). On CUDA, `_merged_weight_kernel` does both in one pass: one program per
row copies the row, then adds that row's positions while the row is still in cache, instead of a copy
kernel followed by a scatter kernel that fetches every touched entry from memory again. Both round the
same way (copy rounded to `dtype`, then fp32 add, rounded again), so they agree bit for bit.
"""

from __future__ import annotations

import torch

from ._triton import tl, triton
from .backend import pick_backend
from .pattern import SparsePattern
from .scatter import scatter_add_

# Elements per step of the row copy, and positions per step of the row's scatter; not tuned on a GPU yet.
_BLOCK = 1024
_BLOCK_P = 64

if triton is not None:
    from ._triton import round_for_store

    @triton.jit
    def _merged_weight_kernel(
        base_ptr,
        out_ptr,
        crow_ptr,
        cols_ptr,
        values_ptr,
        in_features,
        BF16: tl.constexpr,
        BLOCK: tl.constexpr,
        BLOCK_P: tl.constexpr,
    ):
        """Row `program_id` of `out` = round(base row), then `out[row, cols[p]] = round(out[...] + values[p])`.

        Parameters:
            base_ptr: W0, (out × in) contiguous, fp32/bf16/fp16.
            out_ptr: the merged weight, (out × in) contiguous, written whole (fp32/bf16/fp16).
            crow_ptr: CSR row pointers (int64): the row's positions are crow[row] .. crow[row + 1].
            cols_ptr: column of each position (int32 or int64), sorted within a row.
            values_ptr: one value per position, any float dtype.
            in_features: row length.
            BF16: `out` is bf16 (rounded by `round_for_store`).
            BLOCK: elements copied per step.
            BLOCK_P: positions added per step.
        """
        row = tl.program_id(0).to(tl.int64)
        base_row = base_ptr + row * in_features
        out_row = out_ptr + row * in_features
        for start in range(0, in_features, BLOCK):
            offsets = start + tl.arange(0, BLOCK)
            mask = offsets < in_features
            weight = tl.load(base_row + offsets, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_row + offsets, round_for_store(weight, out_ptr, BF16), mask=mask)
        # The scatter reads entries other threads of this program just stored: make those stores visible.
        tl.debug_barrier()
        lo = tl.load(crow_ptr + row)
        hi = tl.load(crow_ptr + row + 1)
        for start in range(lo, hi, BLOCK_P):
            p = start + tl.arange(0, BLOCK_P)
            mask = p < hi
            cols = tl.load(cols_ptr + p, mask=mask, other=0).to(tl.int64)
            values = tl.load(values_ptr + p, mask=mask, other=0.0).to(tl.float32)
            current = tl.load(out_row + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_row + cols, round_for_store(current + values, out_ptr, BF16), mask=mask)


def merged_weight_reference(
    base_weight: torch.Tensor, values: torch.Tensor, pattern: SparsePattern, dtype: torch.dtype
) -> torch.Tensor:
    """Torch reference and CPU path: a copy of W0 in `dtype`, then the torch scatter."""
    weight = base_weight.to(dtype=dtype, copy=True)
    return scatter_add_(weight, pattern.indices, values, backend="torch")


def merged_weight(
    base_weight: torch.Tensor, values: torch.Tensor, pattern: SparsePattern, dtype: torch.dtype, backend: str = "auto"
) -> torch.Tensor:
    """A new (out × in) tensor W0 + Δ in `dtype`; `base_weight` is left untouched.

    Args:
        base_weight (`torch.Tensor`): W0, (out × in), any float dtype.
        values (`torch.Tensor`): Δ at the pattern's positions, 1-D, any float dtype.
        pattern (`SparsePattern`): the positions (its `crow` and `cols`).
        dtype (`torch.dtype`): dtype of the result (the compute dtype of the forward).
        backend (`str`, defaults to `"auto"`): `"triton"` on CUDA, `"torch"` otherwise.

    Returns:
        The merged weight, contiguous.
    """
    if base_weight.shape != torch.Size(pattern.shape) or values.shape != pattern.indices.shape:
        raise ValueError(
            f"base_weight {tuple(base_weight.shape)} and values {tuple(values.shape)} do not fit a pattern of shape "
            f"{pattern.shape} with {pattern.indices.numel()} positions."
        )
    if pick_backend(backend, base_weight) == "torch":
        return merged_weight_reference(base_weight, values, pattern, dtype)
    out_features, in_features = pattern.shape
    out = torch.empty(pattern.shape, dtype=dtype, device=base_weight.device)
    if out.numel():
        _merged_weight_kernel[(out_features,)](
            base_weight.contiguous(),
            out,
            pattern.crow,
            pattern.cols,
            values,
            in_features,
            BF16=dtype == torch.bfloat16,
            BLOCK=_BLOCK,
            BLOCK_P=_BLOCK_P,
        )
    return out
