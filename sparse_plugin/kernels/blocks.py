"""Block-sparse products for SMT: a delta made of whole blocks of a block grid, as batched dense GEMMs.

The values stay in the flat sorted order every adapter uses (so `sparse-merge` needs no special case);
`BlockPattern` keeps, per block shape, the value slots of each block in row-major block order plus the
output rows and input columns it covers. Each product then gathers those rows/columns of the activations
and runs one `bmm` over all blocks of that shape (full blocks, and at most three edge shapes):

* x · Δᵀ: y[:, rows_b] += x[:, cols_b] · Δ_bᵀ
* dy · Δ: dx[:, cols_b] += dy[:, rows_b] · Δ_b
* values' gradient: dΔ_b = dy[:, rows_b]ᵀ · x[:, cols_b], one small GEMM per block.

Like the CSR paths, they run in fp32 and the caller casts back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .pattern import SparsePattern


@dataclass
class BlockGroup:
    """All blocks of one (height, width): value slots (n, h·w), output rows (n, h), input columns (n, w)."""

    slots: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor


def block_grid(shape: tuple[int, int], block_size: int) -> tuple[int, int]:
    """SMT's block (height, width): `block_size` clamped to the matrix."""
    return min(block_size, shape[0]), min(block_size, shape[1])


def tiles_whole_blocks(indices: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> bool:
    """Whether the sorted flat `indices` are exactly a union of whole blocks of the grid."""
    if indices.numel() == 0:
        return False
    ids, counts = torch.unique(_block_ids(indices, shape, block), return_counts=True)
    return bool(torch.equal(counts, block_areas(ids, shape, block)))


def block_positions(block_ids: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    """Sorted flat positions of every element of the given blocks (ids numbered row-major over the grid)."""
    out_features, in_features = shape
    height, width = block
    grid_cols = -(-in_features // width)
    parts = []
    for block_id in block_ids.tolist():
        row0, col0 = (block_id // grid_cols) * height, (block_id % grid_cols) * width
        rows = torch.arange(row0, min(row0 + height, out_features), device=block_ids.device)
        cols = torch.arange(col0, min(col0 + width, in_features), device=block_ids.device)
        parts.append((rows[:, None] * in_features + cols[None, :]).reshape(-1))
    if not parts:
        return torch.empty(0, dtype=torch.int64, device=block_ids.device)
    return torch.cat(parts).sort().values


def _block_ids(indices: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    in_features = shape[1]
    height, width = block
    rows, cols = indices // in_features, indices % in_features
    return (rows // height) * (-(-in_features // width)) + cols // width


def block_areas(block_ids: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    """Elements in each given block: edge blocks of dimensions that are not multiples are smaller."""
    heights, widths = _block_dims(block_ids, shape, block)
    return heights * widths


def _block_dims(block_ids: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]):
    out_features, in_features = shape
    height, width = block
    grid_cols = -(-in_features // width)
    heights = (out_features - (block_ids // grid_cols) * height).clamp(max=height)
    widths = (in_features - (block_ids % grid_cols) * width).clamp(max=width)
    return heights, widths


class BlockPattern(SparsePattern):
    """A `SparsePattern` whose indices tile whole blocks; products become batched block GEMMs.

    Raises `ValueError` if the indices are not a union of whole blocks (use `tiles_whole_blocks` first).
    """

    def __init__(self, indices: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]):
        super().__init__(indices, shape)
        if not tiles_whole_blocks(indices, shape, block):
            raise ValueError(
                f"The indices do not tile whole {block[0]}×{block[1]} blocks of a {shape[0]}×{shape[1]} matrix."
            )
        self.block = block
        height, width = block
        ids = _block_ids(indices, shape, block)
        # Block-major order, row-major inside a block (offsets use the full width, so edge blocks sort too).
        local = (self.rows % height) * width + self.cols % width
        perm = torch.argsort(ids * (height * width) + local)
        block_ids, counts = torch.unique(ids, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        heights, widths = _block_dims(block_ids, shape, block)
        grid_cols = -(-shape[1] // width)
        self.groups: list[BlockGroup] = []
        for h, w in torch.unique(torch.stack([heights, widths], 1), dim=0).tolist():
            chosen = (heights == h) & (widths == w)
            slots = perm[starts[chosen][:, None] + torch.arange(h * w, device=indices.device)]
            rows = (block_ids[chosen] // grid_cols * height)[:, None] + torch.arange(h, device=indices.device)
            cols = (block_ids[chosen] % grid_cols * width)[:, None] + torch.arange(w, device=indices.device)
            self.groups.append(BlockGroup(slots, rows, cols))

    def _blocks(self, values: torch.Tensor, group: BlockGroup) -> torch.Tensor:
        n, h, w = group.slots.shape[0], group.rows.shape[1], group.cols.shape[1]
        return values.float()[group.slots].view(n, h, w)

    def matmul(self, x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        x = x.float()
        out = torch.zeros(x.shape[0], self.shape[0], dtype=torch.float32, device=x.device)
        for group in self.groups:
            y = torch.bmm(x[:, group.cols].transpose(0, 1), self._blocks(values, group).transpose(1, 2))
            out.index_add_(1, group.rows.reshape(-1), y.transpose(0, 1).reshape(x.shape[0], -1))
        return out

    def matmul_t(self, dy: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        dy = dy.float()
        out = torch.zeros(dy.shape[0], self.shape[1], dtype=torch.float32, device=dy.device)
        for group in self.groups:
            dx = torch.bmm(dy[:, group.rows].transpose(0, 1), self._blocks(values, group))
            out.index_add_(1, group.cols.reshape(-1), dx.transpose(0, 1).reshape(dy.shape[0], -1))
        return out

    def values_grad(self, dy: torch.Tensor, x: torch.Tensor, path: str = "auto") -> torch.Tensor:
        dy, x = dy.float(), x.float()
        out = torch.empty(self.indices.numel(), dtype=torch.float32, device=dy.device)
        for group in self.groups:
            grad = torch.bmm(dy[:, group.rows].permute(1, 2, 0), x[:, group.cols].transpose(0, 1))
            out[group.slots.reshape(-1)] = grad.reshape(-1)
        return out
