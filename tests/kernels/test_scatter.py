"""Triton scatter kernel vs its torch reference, under TRITON_INTERPRET=1 on CPU (and on CUDA when present)."""

import pytest
import torch
from kernel_utils import interpreter

from sparse_plugin.kernels.scatter import (
    scatter_add_,
    scatter_add_reference,
    scatter_set_,
    scatter_set_reference,
)

DEVICES = [pytest.param("cpu", marks=interpreter)] + (["cuda"] if torch.cuda.is_available() else [])
# Sizes around the kernel's block of 1024 and prime shapes, so the tail mask is exercised.
SHAPES = [(1, 1), (7, 13), (33, 31), (64, 48), (1, 1023), (97, 211)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _case(shape, dtype, index_dtype, device, density=0.3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    numel = shape[0] * shape[1]
    count = max(1, int(numel * density))
    indices = torch.randperm(numel, generator=gen)[:count].sort().values.to(index_dtype)
    weight = torch.randn(shape, generator=gen).to(dtype)
    values = torch.randn(count, generator=gen) * 1e-2
    return weight.to(device), indices.to(device), values.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("alpha", [1.0, -1.0])
def test_triton_scatter_add_matches_reference_bit_for_bit(shape, dtype, index_dtype, device, alpha):
    # Both paths add in fp32 and round once to the weight dtype, so equality is exact, not approximate.
    weight, indices, values = _case(shape, dtype, index_dtype, device)
    expected = weight.clone()
    scatter_add_reference(expected, indices.long(), values, alpha)
    got = scatter_add_(weight.clone(), indices, values, alpha=alpha, backend="triton")
    assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_is_dense_addition_with_one_rounding(dtype):
    weight, indices, values = _case((33, 31), dtype, torch.int64, "cpu")
    dense = torch.zeros(weight.numel())
    dense[indices] = values
    expected = (weight.float() + dense.view_as(weight)).to(dtype)
    assert torch.equal(scatter_add_(weight.clone(), indices, values, backend="torch"), expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_scatter_set_restores_exactly(shape, dtype, device):
    weight, indices, values = _case(shape, dtype, torch.int32, device)
    original = weight.clone()
    stored = original.view(-1)[indices.long()].clone()
    merged = scatter_add_(weight.clone(), indices, values, backend="triton")
    assert torch.equal(scatter_set_(merged, indices, stored, backend="triton"), original)
    reference = weight.clone()
    scatter_set_reference(reference, indices.long(), values)
    assert torch.equal(scatter_set_(weight.clone(), indices, values, backend="triton"), reference)


@interpreter
def test_empty_indices_is_a_no_op():
    weight = torch.randn(4, 5)
    out = scatter_add_(weight.clone(), torch.empty(0, dtype=torch.int64), torch.empty(0), backend="triton")
    assert torch.equal(out, weight)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"indices": torch.tensor([[1]])}, "1-D"),
        ({"values": torch.ones(3)}, "equal length"),
        ({"backend": "cuda"}, "`backend`"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    args = {"weight": torch.zeros(2, 2), "indices": torch.tensor([1]), "values": torch.ones(1)} | kwargs
    with pytest.raises(ValueError, match=match):
        scatter_add_(**args)


def test_non_contiguous_weight_is_refused():
    with pytest.raises(ValueError, match="contiguous"):
        scatter_add_(torch.zeros(4, 4).t(), torch.tensor([1]), torch.ones(1))
