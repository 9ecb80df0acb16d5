"""The kernels compiled for a real GPU (TRITON_INTERPRET=0, CUDA tensors) against their torch references, at
model-sized shapes, and the layer's CUDA rule end to end. Run by tools/gpu_check.sh; skipped elsewhere.

The interpreter tests check the kernels' arithmetic; these check what only a compile can break: layouts,
vectorised loads, the barrier in the fused merged weight, int32 address overflow at large shapes.
"""

import functools

import pytest
import torch
import torch.nn.functional as F
from kernel_utils import compiled_cuda, random_pattern

from sparse_plugin.kernels.merged_weight import merged_weight, merged_weight_reference
from sparse_plugin.kernels.scatter import scatter_add_, scatter_add_reference, scatter_set_
from sparse_plugin.kernels.sddmm import pick_grad_path, values_grad_dense, values_grad_triton
from sparse_plugin.layer import SparseDeltaLinear

pytestmark = compiled_cuda
# Drawing 45M-position permutations for 4096×11008 takes a while; the tests only read the patterns.
random_pattern = functools.cache(random_pattern)

# (out, in, tokens, density): SmolLM2's k/v and down projections, Llama's 4096² and 4096×11008, primes.
CASES = [
    (192, 576, 512, 0.05),
    (576, 1536, 1000, 0.02),
    (4096, 4096, 2048, 0.01),
    (4096, 11008, 1024, 0.005),
    (97, 211, 77, 0.3),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (W0 dtype, merged weight dtype)
DTYPE_PAIRS = [
    (torch.float32, torch.float32),
    (torch.float32, torch.bfloat16),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
]


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_f, in_f, tokens, density", CASES)
def test_sddmm_matches_float64_reference(out_f, in_f, tokens, density, dtype, index_dtype):
    pattern = random_pattern((out_f, in_f), density, index_dtype, device="cuda")
    dy = torch.randn(tokens, out_f, device="cuda").to(dtype)
    x = torch.randn(tokens, in_f, device="cuda").to(dtype)
    got = values_grad_triton(dy, x, pattern)
    expected = values_grad_dense(dy.double(), x.double(), pattern.indices.long())
    # fp32 sums of up to 2048 products of size ~1: error ~sqrt(T)·2^-24·|terms|, far below 1e-3.
    torch.testing.assert_close(got.double(), expected, atol=1e-3, rtol=1e-4)


def test_sddmm_token_chunks_agree_with_one_launch():
    pattern = random_pattern((576, 1536), 0.02, device="cuda")
    dy, x = torch.randn(1000, 576, device="cuda"), torch.randn(1000, 1536, device="cuda")
    whole = values_grad_triton(dy, x, pattern, token_chunk=1000)
    torch.testing.assert_close(values_grad_triton(dy, x, pattern, token_chunk=256), whole, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("base_dtype, dtype", DTYPE_PAIRS)
@pytest.mark.parametrize("out_f, in_f, tokens, density", CASES)
def test_fused_merged_weight_matches_reference_bit_for_bit(
    out_f, in_f, tokens, density, base_dtype, dtype, index_dtype
):
    pattern = random_pattern((out_f, in_f), density, index_dtype, device="cuda")
    base = torch.randn(out_f, in_f, device="cuda").to(base_dtype)
    values = torch.randn(pattern.indices.numel(), device="cuda") * 1e-2
    got = merged_weight(base, values, pattern, dtype, backend="triton")
    assert torch.equal(got, merged_weight_reference(base, values, pattern, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_f, in_f, tokens, density", CASES)
def test_scatter_matches_reference_and_restores_exactly(out_f, in_f, tokens, density, dtype):
    pattern = random_pattern((out_f, in_f), density, torch.int32, device="cuda")
    weight = torch.randn(out_f, in_f, device="cuda").to(dtype)
    values = torch.randn(pattern.indices.numel(), device="cuda") * 1e-2
    expected = weight.clone()
    scatter_add_reference(expected, pattern.indices.long(), values)
    merged = scatter_add_(weight.clone(), pattern.indices, values, backend="triton")
    assert torch.equal(merged, expected)
    stored = weight.view(-1)[pattern.indices.long()]
    assert torch.equal(scatter_set_(merged, pattern.indices, stored, backend="triton"), weight)


def _layer(strategy):
    torch.manual_seed(0)
    base = torch.nn.Linear(1536, 576, device="cuda").requires_grad_(False)
    layer = SparseDeltaLinear(base, random_pattern((576, 1536), 0.01).indices, forward_strategy=strategy)
    with torch.no_grad():
        layer.values.normal_(0, 1e-2)
    return layer


def _dense_reference(layer, x):
    """Gradients of the same loss through a dense W0 + Δ leaf: (gathered weight gradient, dx)."""
    w0 = layer.state_dict()["base_layer.weight"]  # the weight itself holds W0 + Δ under the merged strategy
    weight = (w0 + layer.delta_weight()).requires_grad_(True)
    x_ref = x.detach().requires_grad_(True)
    F.linear(x_ref, weight, layer.base_layer.bias).square().sum().backward()
    return weight.grad.view(-1)[layer.indices], x_ref.grad


@pytest.mark.parametrize("strategy", ["additive", "merged"])
def test_layer_on_cuda_uses_the_kernels_and_matches_dense_training(strategy):
    layer = _layer(strategy)
    assert pick_grad_path(layer.pattern()) == "triton"
    x = torch.randn(4, 250, 1536, device="cuda", requires_grad=True)
    layer(x).square().sum().backward()
    values_grad, x_grad = _dense_reference(layer, x)
    # fp32 throughout (no TF32 by default); gradients are sums of ~1000 terms of size ~1.
    torch.testing.assert_close(layer.values.grad, values_grad, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(x.grad, x_grad, atol=1e-4, rtol=1e-4)


def test_layer_under_bf16_autocast_feeds_bf16_activations_to_the_kernel():
    layer = _layer("auto")
    x = torch.randn(4, 250, 1536, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    y.float().square().sum().backward()
    assert layer.values.grad.dtype == torch.float32
    values_grad, _ = _dense_reference(layer, x)
    # bf16 activations and outputs (8-bit mantissa): about 1% relative error overall.
    assert (layer.values.grad - values_grad).norm() / values_grad.norm() < 3e-2
