"""Sparse deltas over bitsandbytes 4-bit (NF4, double quant, bf16 compute) and 8-bit bases, on CPU.

The delta stays in the values' dtype, the quantised weight is never touched, and the adapter merges into the
unquantised checkpoint. bitsandbytes' CPU kernels want dims that are multiples of 64.
"""

import pytest
import torch
from conftest import tiny_llama
from torch import nn

from sparse_plugin import SM3, SparseConfig, iter_sparse_layers, load_adapter, prepare_model, save_adapter
from sparse_plugin.cli import main

bnb = pytest.importorskip("bitsandbytes")
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

NF4 = BitsAndBytesConfig(
    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16
)
INT8 = BitsAndBytesConfig(load_in_8bit=True)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("quantized") / "base"
    tiny_llama(hidden_size=64, intermediate_size=128).save_pretrained(path)
    return path


def _dequantized(layer) -> torch.Tensor:
    weight = layer.base_layer.weight
    if type(weight).__name__ == "Params4bit":
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    return weight.data.float() * weight.SCB.float()[:, None] / 127


@pytest.mark.parametrize("quantization", [NF4, INT8], ids=["nf4", "int8"])
def test_layer_over_a_quantized_base_matches_the_dequantized_reference(base_dir, quantization):
    model = prepare_model(
        AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=quantization), SparseConfig(density=0.05)
    )
    key, layer = next(iter(iter_sparse_layers(model)))
    assert type(layer.base_layer).__name__ in ("Linear4bit", "Linear8bitLt") and layer.strategy() == "additive"
    layer.values.data.normal_(0, 0.05)
    weight = _dequantized(layer) + layer.delta_weight()  # before the first forward, which may re-layout the storage
    x = torch.randn(3, 5, layer.in_features, requires_grad=True)
    out = layer(x)
    reference = x.detach() @ weight.t()
    torch.testing.assert_close(
        out.float(), reference, atol=0.1, rtol=0.05
    )  # the base runs its own low-precision matmul
    dy = torch.randn_like(out)
    out.backward(dy)
    expected = (dy.reshape(-1, dy.shape[-1]).t().float() @ x.detach().reshape(-1, x.shape[-1])).view(-1)[layer.indices]
    torch.testing.assert_close(layer.values.grad, expected, atol=1e-4, rtol=1e-4)  # the delta's gradient is exact fp32


@pytest.mark.parametrize("quantization", [NF4, INT8], ids=["nf4", "int8"])
def test_training_keeps_the_quantized_weight_and_merges_into_the_full_checkpoint(base_dir, tmp_path, quantization):
    model = prepare_model(
        AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=quantization),
        SparseConfig(density=0.05, reselection_steps=2),
    )
    layers = [layer for _, layer in iter_sparse_layers(model)]
    ids = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        model(ids)  # bitsandbytes' CPU backend repacks 4-bit storage once, on the first forward
    packed = [layer.base_layer.weight.data.clone() for layer in layers]
    opt = SM3(model, lr=1e-2, total_steps=4)
    for _ in range(4):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(p, layer.base_layer.weight.data) for p, layer in zip(packed, layers))  # never re-quantised
    assert all(layer.values.dtype == torch.float32 and bool(layer.values.abs().sum() > 0) for layer in layers)
    save_adapter(model, tmp_path / "adapter")
    # The unquantised fp32 checkpoint is the base to merge into: no --force, no base values (nothing exact to restore).
    assert (
        main(
            [
                "merge",
                "--base",
                str(base_dir),
                "--adapter",
                str(tmp_path / "adapter"),
                "--output",
                str(tmp_path / "merged"),
            ]
        )
        == 0
    )
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    full = load_adapter(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "adapter")
    torch.testing.assert_close(merged(ids).logits, full(ids).logits, atol=1e-5, rtol=1e-5)
    assert not any(isinstance(m, nn.Linear) and type(m).__name__ != "Linear" for m in merged.modules())


def test_moe_over_a_4bit_base_trains_its_bf16_experts_and_merges_into_the_full_checkpoint(tmp_path):
    """bitsandbytes quantises a Qwen3-MoE's `nn.Linear` layers (attention) and leaves the fused 3-D experts in the
    compute dtype: `all-weights` puts additive deltas over the 4-bit attention and merged-resident deltas on the
    experts, and the adapter merges into the unquantised checkpoint."""
    from test_targets import tiny_qwen3_moe

    base = tmp_path / "base"
    tiny_qwen3_moe(hidden_size=64, moe_intermediate_size=64, head_dim=16, intermediate_size=128).save_pretrained(base)
    model = prepare_model(
        AutoModelForCausalLM.from_pretrained(base, quantization_config=NF4),
        SparseConfig(density=0.05, target_modules="all-weights", reselection_steps=2),
    )
    layers = dict(iter_sparse_layers(model))
    experts = {k: layer for k, layer in layers.items() if "experts" in k}
    quantized = {k: layer for k, layer in layers.items() if hasattr(layer, "base_layer")}
    assert experts and quantized
    assert all(type(layer.base_layer).__name__ == "Linear4bit" for layer in quantized.values())
    ids = torch.randint(0, 61, (2, 8))
    with torch.no_grad():
        model(ids)  # bitsandbytes' CPU backend repacks 4-bit storage once, on the first forward
    packed = [layer.base_layer.weight.data.clone() for layer in quantized.values()]
    opt = SM3(model, lr=1e-2, total_steps=4)
    for _ in range(4):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(p, layer.base_layer.weight.data) for p, layer in zip(packed, quantized.values()))
    assert all(bool(layer.values.abs().sum() > 0) for layer in layers.values())
    save_adapter(model, tmp_path / "adapter")
    argv = ["merge", "--base", str(base), "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "m")]
    assert main(argv) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    full = load_adapter(AutoModelForCausalLM.from_pretrained(base).eval(), tmp_path / "adapter")
    torch.testing.assert_close(merged(ids).logits, full(ids).logits, atol=1e-5, rtol=1e-5)
