"""The values' gradient (SDDMM): the Triton kernel under TRITON_INTERPRET=1 on CPU tensors against the dense
torch reference, the three paths against each other, and the rule that picks one."""

import pytest
import torch
from kernel_utils import interpreter, random_pattern

from sparse_plugin.kernels.pattern import SparsePattern
from sparse_plugin.kernels.sddmm import (
    _BLOCK_P,
    _BLOCK_T,
    SAMPLED_MAX_DENSITY,
    TRITON_MAX_DENSITY,
    grad_path_rule,
    values_grad,
    values_grad_dense,
    values_grad_triton,
)
from sparse_plugin.layer import SparseDeltaLinear

# (out, in, tokens, density, empty leading rows): a single position; sizes that are not multiples of the
# kernel's 32 positions or 128 tokens (130 = one full token tile and a 2-token tail); exact multiples;
# rows without positions, leading and scattered (64×4 at 5% leaves most rows empty); primes.
CASES = [
    (1, 1, 1, 1.0, 0),
    (7, 13, 5, 0.3, 0),
    (33, 31, 130, 0.1, 0),
    (_BLOCK_P, 48, _BLOCK_T, 0.25, 0),
    (40, 50, 17, 0.2, 9),
    (64, 4, 9, 0.05, 0),
    (97, 211, 3, 0.1, 0),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _activations(tokens, shape, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    dy = torch.randn(tokens, shape[0], generator=generator).to(dtype)
    x = torch.randn(tokens, shape[1], generator=generator).to(dtype)
    return dy, x


def _reference(dy, x, pattern):
    """dyᵀx gathered, in float64 so that only the kernel's fp32 rounding is left in the comparison."""
    return values_grad_dense(dy.double(), x.double(), pattern.indices.long())


@interpreter
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_f, in_f, tokens, density, empty_rows", CASES)
def test_triton_sddmm_matches_dense_reference(out_f, in_f, tokens, density, empty_rows, dtype, index_dtype):
    pattern = random_pattern((out_f, in_f), density, index_dtype, empty_rows=empty_rows)
    dy, x = _activations(tokens, pattern.shape, dtype)
    got = values_grad_triton(dy, x, pattern)
    assert got.dtype == torch.float32 and got.shape == pattern.indices.shape
    # bf16/fp16 products are exact in fp32, fp32 ones round once; the fp32 sum of at most 130 terms of
    # size ~1 (randn) then differs from the float64 reference by far less than 1e-5.
    torch.testing.assert_close(got.double(), _reference(dy, x, pattern), atol=1e-5, rtol=1e-5)


@interpreter
def test_token_chunks_accumulate_into_one_result():
    # 300 tokens in chunks of 128: two full launches and a 44-token tail, each adding into the fp32 output.
    pattern = random_pattern((19, 23), 0.3)
    dy, x = _activations(300, pattern.shape, torch.float32)
    chunked = values_grad_triton(dy, x, pattern, token_chunk=_BLOCK_T)
    torch.testing.assert_close(chunked.double(), _reference(dy, x, pattern), atol=1e-5, rtol=1e-5)


@interpreter
def test_no_positions_or_no_tokens_give_zeros():
    empty = SparsePattern(torch.empty(0, dtype=torch.int64), (5, 6))
    assert values_grad_triton(*_activations(4, (5, 6), torch.float32), empty).shape == (0,)
    pattern = random_pattern((5, 6), 0.5)
    assert torch.equal(values_grad_triton(*_activations(0, (5, 6), torch.float32), pattern), torch.zeros(15))


@interpreter
@pytest.mark.parametrize("path", ["dense", "sampled", "triton"])
def test_every_path_gives_the_same_gradient(path):
    pattern = random_pattern((24, 40), 0.05)
    dy, x = _activations(33, pattern.shape, torch.float32)
    torch.testing.assert_close(
        values_grad(dy, x, pattern, path).double(), _reference(dy, x, pattern), atol=1e-5, rtol=1e-5
    )


@interpreter
def test_layer_trains_through_the_triton_path():
    torch.manual_seed(0)
    base = torch.nn.Linear(40, 24).requires_grad_(False)
    layer = SparseDeltaLinear(base, random_pattern((24, 40), 0.1).indices)
    x = torch.randn(2, 9, 40)
    layer(x, grad_path="triton").square().sum().backward()
    dense = base.weight.clone().requires_grad_(True)
    torch.nn.functional.linear(x, dense, base.bias).square().sum().backward()
    torch.testing.assert_close(layer.values.grad, dense.grad.view(-1)[layer.indices], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "density, device, path",
    [
        (0.01, "cpu", "sampled"),
        (SAMPLED_MAX_DENSITY, "cpu", "dense"),
        (0.01, "cuda", "triton"),
        (TRITON_MAX_DENSITY, "cuda", "dense"),
    ],
)
def test_rule_keeps_cpu_and_sends_sparse_cuda_to_triton(density, device, path):
    assert grad_path_rule(density, torch.device(device)) == path


def test_triton_path_on_cpu_without_interpreter_says_how_to_run_it(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    pattern = random_pattern((5, 6), 0.5)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        values_grad_triton(*_activations(3, (5, 6), torch.float32), pattern)
