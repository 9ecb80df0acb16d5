"""SMT's block products against the dense torch reference, on grids whose dims are not multiples of the block."""

import pytest
import torch

from sparse_plugin.kernels.blocks import BlockPattern, block_grid, block_positions, tiles_whole_blocks
from sparse_plugin.kernels.pattern import SparsePattern

# (out, in, block_size): exact multiples, edges on both dims, and a block clamped to a small matrix.
SHAPES = [(12, 16, 4), (10, 7, 4), (13, 29, 8), (6, 40, 16)]


def _random_blocks(shape, block, gen, share=0.5):
    grid = [-(-n // b) for n, b in zip(shape, block)]
    ids = torch.randperm(grid[0] * grid[1], generator=gen)[: max(1, int(share * grid[0] * grid[1]))].sort().values
    return block_positions(ids, shape, block)


def _dense(indices, values, shape):
    delta = torch.zeros(shape[0] * shape[1], dtype=values.dtype)
    delta[indices] = values
    return delta.view(shape)


@pytest.mark.parametrize("out_features,in_features,block_size", SHAPES)
def test_block_products_equal_dense_reference(out_features, in_features, block_size):
    gen = torch.Generator().manual_seed(out_features * in_features)
    shape = (out_features, in_features)
    block = block_grid(shape, block_size)
    indices = _random_blocks(shape, block, gen)
    pattern = BlockPattern(indices, shape, block)
    values = torch.randn(indices.numel(), generator=gen)
    x, dy = torch.randn(9, in_features, generator=gen), torch.randn(9, out_features, generator=gen)
    delta = _dense(indices, values, shape)
    torch.testing.assert_close(pattern.matmul(x, values), x @ delta.t())
    torch.testing.assert_close(pattern.matmul_t(dy, values), dy @ delta)
    # The block GEMM gradient equals the dense gradient dyᵀx gathered at the blocks' positions.
    torch.testing.assert_close(pattern.values_grad(dy, x), (dy.t() @ x).view(-1)[indices])
    # ...and the element-wise CSR path agrees.
    torch.testing.assert_close(SparsePattern(indices, shape).values_grad(dy, x, "sampled"), pattern.values_grad(dy, x))


def test_block_positions_cover_edge_blocks_exactly():
    # 10×7 with 4×4 blocks: grid 3×2; block 5 is the bottom-right 2×3 corner.
    positions = block_positions(torch.tensor([0, 5]), (10, 7), (4, 4))
    expected = [r * 7 + c for r in range(4) for c in range(4)] + [r * 7 + c for r in range(8, 10) for c in range(4, 7)]
    assert positions.tolist() == sorted(expected)


def test_partial_blocks_are_not_a_block_pattern():
    full = block_positions(torch.tensor([1]), (8, 8), (4, 4))
    assert tiles_whole_blocks(full, (8, 8), (4, 4))
    assert not tiles_whole_blocks(full[1:], (8, 8), (4, 4))
    with pytest.raises(ValueError, match="do not tile whole 4×4 blocks"):
        BlockPattern(full[1:], (8, 8), (4, 4))


def test_block_grid_clamps_to_the_matrix():
    assert block_grid((192, 576), 256) == (192, 256)
    assert block_grid((4096, 4096), 256) == (256, 256)
