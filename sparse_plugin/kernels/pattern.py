"""`SparsePattern`: the positions of a sparse delta Δ (out × in, sorted flat `indices`), shared by the layer,
SM3's row/column accumulators and `BlockPattern`, with the three products the layer needs.
"""

from __future__ import annotations

import warnings

import torch

from .sddmm import delta_matmul, delta_matmul_t, values_grad


class SparsePattern:
    """CSR row pointers of sorted flat indices, computed once per index set; rows and columns on demand.

    Only `crow` (out + 1 entries) persists: per-position row and column ids would cost 8-16 B per trained value
    for the whole run, while deriving them where a product needs them costs one pass over the indices. `crow`
    takes the indices' dtype (int32 below 2^31 positions), as torch's CSR tensors want crow and cols alike.
    """

    def __init__(self, indices: torch.Tensor, shape: tuple[int, int], matrices: int = 1):
        out_features, _ = shape
        self.indices = indices
        self.shape = shape
        # Equal matrices stacked along the rows (the experts of a fused MoE tensor): columns are counted per matrix.
        self.matrices = matrices
        self.crow = torch.zeros(out_features + 1, dtype=indices.dtype, device=indices.device)
        self.crow[1:] = torch.bincount(self.rows, minlength=out_features).cumsum(0)

    @property
    def rows(self) -> torch.Tensor:
        """Row of each position (the indices' dtype), computed on each call."""
        return torch.div(self.indices, self.shape[1], rounding_mode="floor")

    @property
    def cols(self) -> torch.Tensor:
        """Column of each position (the indices' dtype), computed on each call."""
        return torch.remainder(self.indices, self.shape[1])

    @property
    def column_slots(self) -> torch.Tensor:
        """Column of each position counted per stacked matrix (matrix · columns + column): SM3's column
        accumulators; equal to `cols` for a single matrix."""
        if self.matrices == 1:
            return self.cols
        rows_per_matrix = self.shape[0] // self.matrices
        return torch.div(self.rows, rows_per_matrix, rounding_mode="floor") * self.shape[1] + self.cols

    @property
    def row_lengths(self) -> torch.Tensor:
        """Positions in each row: the segments of the row-sorted indices."""
        return self.crow[1:] - self.crow[:-1]

    @property
    def density(self) -> float:
        return self.indices.numel() / (self.shape[0] * self.shape[1])

    def csr(self, values: torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(self.crow, self.cols, values, self.shape, check_invariants=False)

    # The three products the layer needs; `BlockPattern` overrides them with block GEMMs.
    def matmul(self, x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return delta_matmul(x, values, self)

    def matmul_t(self, dy: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return delta_matmul_t(dy, values, self)

    def values_grad(self, dy: torch.Tensor, x: torch.Tensor, path: str = "auto") -> torch.Tensor:
        return values_grad(dy, x, self, path)
