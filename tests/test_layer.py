"""SparseDeltaLinear and its autograd Function against a dense torch reference: outputs, dx, values' grad."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparse_plugin.layer import SparseDeltaLinear, dense_base_weight
from sparse_plugin.model import random_indices

# (dtype of base and input, atol, rtol). fp32: only summation order differs from the reference. bf16/fp16:
# the base matmul itself runs in low precision (8/11 mantissa bits) in both paths but the delta product
# runs in fp32 here, so differences are of the order of one low-precision ulp of the outputs.
DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 3e-2, 2e-2), (torch.float16, 5e-3, 5e-3)]
SHAPES = [(1, 1), (7, 13), (48, 80), (31, 97)]  # (out, in), awkward on purpose
LEADING = [(), (5,), (2, 3), (1, 1, 4)]


def _layer(out_f, in_f, dtype=torch.float32, bias=True, density=0.2, strategy="auto", seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(in_f, out_f, bias=bias).to(dtype)
    count = max(1, int(out_f * in_f * density))
    indices = random_indices(out_f * in_f, count, torch.Generator().manual_seed(seed))
    layer = SparseDeltaLinear(base, indices, forward_strategy=strategy)
    base.requires_grad_(False)
    with torch.no_grad():
        layer.values.normal_(0, 0.05)
    return layer


def _w0(layer):
    """The pretrained weight: what the state dict calls the base (the weight itself may hold W0 + Δ)."""
    return layer.state_dict()["base_layer.weight"]


def _reference(layer, x):
    """Dense W0 + Δ in fp32 as a leaf, so autograd gives the dense weight gradient to gather."""
    weight = (_w0(layer).float() + layer.delta_weight().float()).requires_grad_(True)
    bias = None if layer.base_layer.bias is None else layer.base_layer.bias.float()
    xr = x.detach().float().requires_grad_(True)
    return F.linear(xr, weight, bias), xr, weight


def _check(layer, x, atol, rtol, grad_path="auto"):
    x = x.requires_grad_(True)
    y = layer(x, grad_path=grad_path)
    y_ref, x_ref, weight_ref = _reference(layer, x)
    grad_out = torch.randn_like(y_ref)
    y.backward(grad_out.to(y.dtype))
    y_ref.backward(grad_out)
    assert y.shape == y_ref.shape and y.dtype == x.dtype
    torch.testing.assert_close(y.float(), y_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(x.grad.float(), x_ref.grad, atol=atol, rtol=rtol)
    expected = weight_ref.grad.view(-1)[layer.indices]
    torch.testing.assert_close(layer.values.grad, expected, atol=atol * 10, rtol=rtol)
    assert layer.values.grad.dtype == layer.values.dtype
    assert layer.base_layer.weight.grad is None


@pytest.mark.parametrize("strategy", ["additive", "merged"])
@pytest.mark.parametrize("grad_path", ["dense", "sampled"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("leading", LEADING)
@pytest.mark.parametrize("bias", [True, False])
def test_fp32_matches_dense_reference(strategy, grad_path, shape, leading, bias):
    layer = _layer(*shape, bias=bias, strategy=strategy)
    _check(layer, torch.randn(*leading, shape[1]), 1e-5, 1e-5, grad_path)


@pytest.mark.parametrize("strategy", ["additive", "merged"])
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES[1:])
@pytest.mark.parametrize("grad_path", ["dense", "sampled"])
@pytest.mark.parametrize("shape", SHAPES[1:])
def test_low_precision_base_matches_dense_reference(strategy, dtype, atol, rtol, grad_path, shape):
    # merged: W0 + Δ rounded to the base dtype (what mixed-precision full fine-tuning computes with); within the
    # same one-ulp tolerance, as the base product rounds at the same scale.
    layer = _layer(*shape, dtype=dtype, strategy=strategy)
    _check(layer, torch.randn(4, 3, shape[1]).to(dtype), atol, rtol, grad_path)


def test_values_grad_is_dense_grad_gathered_at_indices_for_a_training_loss():
    layer = _layer(24, 40, density=0.1)
    x, target = torch.randn(16, 40), torch.randn(16, 24)
    F.mse_loss(layer(x), target).backward()
    weight = (_w0(layer) + layer.delta_weight()).requires_grad_(True)
    F.mse_loss(F.linear(x, weight, layer.base_layer.bias), target).backward()
    torch.testing.assert_close(layer.values.grad, weight.grad.view(-1)[layer.indices], atol=1e-6, rtol=1e-5)


def test_fresh_layer_equals_its_base():
    layer = _layer(8, 12)
    with torch.no_grad():
        layer.values.zero_()
    x = torch.randn(3, 12)
    torch.testing.assert_close(layer(x), layer.base_layer(x), atol=1e-6, rtol=0)


def test_cpu_autocast_bf16_runs_delta_in_bf16_and_stays_close():
    layer = _layer(32, 48)
    x = torch.randn(2, 5, 48, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.values.grad is not None and layer.values.grad.dtype == torch.float32
    y_ref, _, _ = _reference(layer, x)
    torch.testing.assert_close(y.float(), y_ref, atol=5e-2, rtol=2e-2)


class _OpaqueLinear(nn.Module):
    """A base the layer knows nothing about beyond `base(x)` and the Linear attributes: like a quantised one."""

    def __init__(self, in_f, out_f):
        super().__init__()
        self.in_features, self.out_features = in_f, out_f
        self.weight = nn.Parameter(torch.randn(out_f, in_f), requires_grad=False)

    def forward(self, x):
        return x @ self.weight.t() * 1.0


def test_opaque_base_uses_additive_path_and_refuses_dense_weight():
    base = _OpaqueLinear(12, 9)
    layer = SparseDeltaLinear(base, torch.tensor([0, 5, 50, 107]))
    with torch.no_grad():
        layer.values.copy_(torch.tensor([0.1, -0.2, 0.3, 0.4]))
    assert layer.strategy() == "additive"
    x = torch.randn(3, 12, requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(layer(x), x @ (base.weight + layer.delta_weight()).t())
    with pytest.raises(TypeError, match="dense floating-point weight"):
        dense_base_weight(base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("density", [0.001, 0.5])
def test_auto_rule_picks_merged_for_every_dense_float_linear(dtype, density):
    assert _layer(64, 64, dtype=dtype, density=density).strategy() == "merged"


def test_auto_rule_keeps_a_trainable_bias_on_the_additive_path():
    layer = _layer(8, 12)
    layer.base_layer.bias.requires_grad_(True)
    assert layer.strategy() == "additive"


def test_pattern_is_rebuilt_when_indices_change_in_place():
    layer = _layer(6, 7, density=0.3)
    first = layer.pattern()
    assert layer.pattern() is first
    with torch.no_grad():
        layer.indices.copy_(torch.arange(layer.indices.numel()))
    assert layer.pattern() is not first
    assert torch.equal(layer.pattern().cols, torch.arange(layer.indices.numel()) % 7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_then_unmerge_restores_base_bit_exactly(dtype):
    layer = _layer(16, 24, dtype=dtype, strategy="additive")
    before = layer.base_layer.weight.detach().clone()
    x = torch.randn(3, 24).to(dtype)
    y_adapter = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(
        layer(x).float(), y_adapter.float(), atol=3e-2 if dtype != torch.float32 else 1e-5, rtol=1e-2
    )
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, before)


# --------------------------------------------------------------------------------------------- merged weights


def _merged_reference(w0, layer):
    """W0 + Δ as `scatter_add_reference` rounds it: one fp32 add per trained entry, one rounding to W0's dtype."""
    flat = w0.clone().view(-1)
    positions = layer.indices.long()
    flat[positions] = (flat[positions].float() + layer.values.detach().float()).to(w0.dtype)
    return flat.view_as(w0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merged_weight_is_rewritten_from_w0_entries_after_each_update_without_drift(dtype):
    layer = _layer(16, 24, dtype=dtype, strategy="merged")
    w0 = layer.base_layer.weight.detach().clone()
    x = torch.randn(3, 24).to(dtype)
    for step in range(30):  # an optimizer would update the values in place between forwards
        with torch.no_grad():
            layer.values.add_(torch.randn_like(layer.values), alpha=1e-3)
        layer(x)
        assert torch.equal(layer.base_layer.weight, _merged_reference(w0, layer)), step
        assert torch.equal(layer.state_dict()["base_layer.weight"], w0)  # never saved with Δ in the base
    layer.unmerge()  # not merged for inference: nothing to undo
    layer.restore_base_weight()
    assert torch.equal(layer.base_layer.weight, w0)


def test_merged_weight_follows_new_indices_and_puts_w0_back_where_they_left():
    layer = _layer(12, 10, strategy="merged")
    w0 = layer.base_layer.weight.detach().clone()
    x = torch.randn(4, 10)
    layer(x)
    new = random_indices(120, 30, torch.Generator().manual_seed(5))
    layer.assign(new, torch.full((30,), 0.25))
    assert torch.equal(layer.base_layer.weight, w0)  # W0 back at once; Δ is written again at the next forward
    torch.testing.assert_close(layer(x), F.linear(x, w0 + layer.delta_weight(), layer.base_layer.bias))
    assert torch.equal(layer.base_layer.weight, _merged_reference(w0, layer))
    layer.set_indices(new[:7])
    layer(x)
    assert torch.equal(layer.base_layer.weight, w0) and torch.equal(layer.values.detach(), torch.zeros(7))


def test_merged_weight_refuses_indices_changed_behind_its_back():
    layer = _layer(6, 7, density=0.3, strategy="merged")
    layer(torch.randn(2, 7))
    with torch.no_grad():
        layer.indices.copy_(torch.arange(layer.indices.numel()))
    with pytest.raises(RuntimeError, match=r"changed in place .*`layer.set_indices\(...\)`"):
        layer(torch.randn(2, 7))


def test_load_state_dict_into_a_merged_layer_starts_from_the_loaded_w0():
    source = _layer(10, 14, strategy="merged", seed=1)
    source(torch.randn(2, 14))
    state = source.state_dict()
    target = _layer(10, 14, strategy="merged", seed=2)
    target(torch.randn(2, 14))
    target.load_state_dict(state)
    assert torch.equal(target.base_layer.weight, state["base_layer.weight"])
    x = torch.randn(5, 14)
    assert torch.equal(target(x), source(x))
    assert torch.equal(target.base_layer.weight, source.base_layer.weight)


def test_inference_merge_of_a_merged_layer_keeps_w0_entries_and_unmerges_bit_exactly():
    layer = _layer(9, 11, dtype=torch.bfloat16, strategy="merged")
    w0 = layer.base_layer.weight.detach().clone()
    layer(torch.randn(2, 11).to(torch.bfloat16))
    layer.merge()
    assert layer.merged and torch.equal(layer.base_layer.weight, _merged_reference(w0, layer))
    assert torch.equal(layer.base_entries(), w0.view(-1)[layer.indices.long()])
    layer.unmerge()
    assert not layer.merged and torch.equal(layer.base_layer.weight, w0)


def test_indices_are_int32_and_int64_state_dicts_still_load():
    layer = _layer(8, 12)
    assert layer.indices.dtype == torch.int32 and layer.pattern().crow.dtype == torch.int32
    state = {k: v.long() if k.endswith("indices") else v for k, v in _layer(8, 12, seed=3).state_dict().items()}
    layer.load_state_dict(state)
    assert layer.indices.dtype == torch.int32 and torch.equal(layer.indices.long(), state["delta.indices"])


def test_moving_or_casting_a_merged_layer_puts_w0_back_first():
    layer = _layer(8, 12, strategy="merged")
    w0 = layer.base_layer.weight.detach().clone()
    x = torch.randn(3, 12)
    layer(x)
    layer.to(torch.float64)
    assert torch.equal(layer.base_layer.weight, w0.double())
    torch.testing.assert_close(
        layer(x.double()), F.linear(x.double(), w0.double() + layer.delta_weight().double(), layer.base_layer.bias)
    )
