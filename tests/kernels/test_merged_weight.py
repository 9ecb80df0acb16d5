"""The merged forward's weight W0.to(dtype) + scatter(Δ): the fused Triton kernel under TRITON_INTERPRET=1 on
CPU tensors against the torch reference (bit for bit), and the reference against a dense addition."""

import pytest
import torch
from kernel_utils import interpreter, random_pattern

from sparse_plugin.kernels.merged_weight import _BLOCK, _BLOCK_P, merged_weight, merged_weight_reference
from sparse_plugin.kernels.pattern import SparsePattern

# (out, in, density, empty leading rows): a single position; awkward sizes; rows longer than one copy
# step (1024 + 76); rows with more positions than two scatter steps (~0.5 × (4 × 64 + 3) = ~130 > 2 × 64);
# leading and scattered empty rows (24 × 4 at 10%: ~10 positions); primes.
CASES = [
    (1, 1, 1.0, 0),
    (7, 13, 0.3, 0),
    (3, _BLOCK + 76, 0.02, 0),
    (4, 4 * _BLOCK_P + 3, 0.5, 0),
    (16, 50, 0.2, 5),
    (24, 4, 0.1, 0),
    (29, 211, 0.05, 0),
]
# (W0 dtype, result dtype): the auto rule's fp32 case, fp32 masters computed in 16 bits, 16-bit bases.
DTYPE_PAIRS = [
    (torch.float32, torch.float32),
    (torch.float32, torch.bfloat16),
    (torch.float32, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.float32),
]


def _case(shape, density, base_dtype, index_dtype=torch.int64, empty_rows=0, seed=0):
    pattern = random_pattern(shape, density, index_dtype, empty_rows=empty_rows, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    base = torch.randn(shape, generator=generator).to(base_dtype)
    values = torch.randn(pattern.indices.numel(), generator=generator) * 1e-2
    return base, values, pattern


@interpreter
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("base_dtype, dtype", DTYPE_PAIRS)
@pytest.mark.parametrize("out_f, in_f, density, empty_rows", CASES)
def test_fused_kernel_matches_reference_bit_for_bit(out_f, in_f, density, empty_rows, base_dtype, dtype, index_dtype):
    # Both copy W0 rounded to `dtype`, then add each value in fp32 and round once more, so equality is exact.
    base, values, pattern = _case((out_f, in_f), density, base_dtype, index_dtype, empty_rows)
    untouched = base.clone()
    got = merged_weight(base, values, pattern, dtype, backend="triton")
    assert got.dtype == dtype and got.is_contiguous()
    assert torch.equal(got, merged_weight_reference(base, values, pattern, dtype))
    assert torch.equal(base, untouched)


@pytest.mark.parametrize("base_dtype, dtype", DTYPE_PAIRS)
def test_reference_is_rounded_copy_plus_dense_delta(base_dtype, dtype):
    base, values, pattern = _case((33, 31), 0.2, base_dtype)
    delta = torch.zeros(base.numel())
    delta[pattern.indices] = values
    expected = (base.to(dtype).float() + delta.view_as(base)).to(dtype)
    assert torch.equal(merged_weight(base, values, pattern, dtype), expected)  # auto: torch on CPU


@interpreter
def test_no_positions_is_a_rounded_copy():
    base = torch.randn(4, 5)
    empty = SparsePattern(torch.empty(0, dtype=torch.int64), (4, 5))
    got = merged_weight(base, torch.empty(0), empty, torch.bfloat16, backend="triton")
    assert torch.equal(got, base.to(torch.bfloat16))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=interpreter)])
def test_mismatched_shapes_are_refused(backend):
    base, values, pattern = _case((6, 7), 0.3, torch.float32)
    with pytest.raises(ValueError, match="do not fit a pattern"):
        merged_weight(base.t().contiguous(), values, pattern, torch.float32, backend=backend)
    with pytest.raises(ValueError, match="do not fit a pattern"):
        merged_weight(base, values[1:], pattern, torch.float32, backend=backend)
