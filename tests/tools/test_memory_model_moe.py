"""tools/benchmarks/memory_model_moe.py: the MoE arithmetic by hand, the activation term against the tensors autograd
saves on two tiny Qwen3-MoE models (ours and PEFT's LoRA on the fused experts, fp32 and bf16 autocast), the whole
estimate against a measured CPU peak, the CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sparse_plugin.sizing import share_budget
from tools.benchmarks import memory_model_moe as mmm
from tools.benchmarks.memory_model import Setting

ROOT = Path(__file__).resolve().parents[2]
# hidden 8, 2 layers, 2 heads of 4, 1 kv head, vocab 10, 4 experts of intermediate 6, top-2
TOY = mmm.MoEArch(
    "toy", hidden=8, layers=2, heads=2, kv_heads=1, head_dim=4, vocab=10, experts=4, moe_intermediate=6, top_k=2
)


def test_toy_targets_budget_and_state():
    assert TOY.expert_shapes() == [(4, 12, 8), (4, 8, 6)]
    assert TOY.layer_targets() == [(1, 8, 8), (1, 4, 8), (1, 4, 8), (1, 8, 8), (1, 4, 8), (4, 12, 8), (4, 8, 6)]
    # one LoRA pair per expert: r·E·(in + out) per fused tensor, r·(in + out) per matrix
    per_layer = 16 + 12 + 12 + 16 + 12 + 4 * 20 + 4 * 14
    assert mmm.lora_params(TOY, 2) == 2 * 2 * per_layer
    # SM3: per (expert, row) and (expert, column), + a step per tensor
    assert mmm.sm3_state_bytes(TOY) == 2 * 4 * (per_layer + 7)
    k = mmm.lora_params(TOY, 2)
    counts = share_budget(mmm.target_sizes(TOY), k)
    rows = 2 * (8 + 4 + 4 + 8 + 4 + 48 + 32 + 7)
    attention = sum(counts[n] for n in range(14) if n % 7 < 4)
    # bf16: W0's entry at every position (merged-resident); NF4: none for attention (additive), bf16 for the rest
    assert mmm.sparse_index_bytes(TOY, Setting(dtype="bf16"), k) == 6 * k + 4 * rows
    assert mmm.sparse_index_bytes(TOY, Setting(dtype="bf16", base="nf4"), k) == 6 * k - 2 * attention + 4 * rows


def test_nf4_reaches_only_the_attention():
    bf16, nf4 = Setting(dtype="bf16"), Setting(dtype="bf16", base="nf4")
    assert mmm.weight_bytes(TOY, bf16) == 2 * TOY.params
    assert mmm.weight_bytes(TOY, nf4) == round(TOY.attention_params * mmm.NF4_BYTES_PER_PARAM) + 2 * TOY.other_params
    qwen = mmm.ARCHS["qwen3-30b-a3b"]
    assert qwen.params == pytest.approx(30.53e9, rel=0.005)  # the model card's 30.5B, 3.3B activated
    assert qwen.active_params == pytest.approx(3.35e9, rel=0.03)
    assert qwen.attention_params / qwen.params < 0.04  # bitsandbytes quantises under 4% of it


def test_estimates_add_up_and_lora_keeps_a_dense_expert_copy_per_layer():
    setting = Setting(batch=1, seq=8, dtype="bf16", lora_rank=2)
    for method in mmm.MOE_METHODS:
        est = mmm.estimate(TOY, method, setting)
        assert sum(est.components.values()) == est.peak_bytes == max(est.moments.values())
    ours = mmm.activation_bytes(TOY, setting, "spiel-ma")
    lora = mmm.activation_bytes(TOY, setting, "lora")
    experts = sum(e * o * i for e, o, i in TOY.expert_shapes())
    assert lora - ours > TOY.layers * 2 * experts  # W + ΔW of both expert tensors, every layer
    with pytest.raises(ValueError, match="refused under FSDP"):
        mmm.estimate(TOY, "spiel-ma", Setting(shards=2))


def test_imports_no_torch():
    code = "import sys, tools.benchmarks.memory_model_moe; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_cli_prints_qwen3_30b_rows(capsys):
    assert mmm.main(["--json"]) == 0
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [(r["method"], r["setting"]["base"]) for r in rows] == [
        ("spiel-ma", None),
        ("spiel-ag", None),
        ("lora", None),
        ("spiel-ma", "nf4"),
        ("lora", "nf4"),
    ]
    assert "| Qwen3-30B-A3B | SpIEL-MA (SM3) | bf16 |" in out and "NF4 attention" in out
    with pytest.raises(SystemExit):
        mmm.main(["--methods", "sift"])
    assert "unknown --methods ['sift']" in capsys.readouterr().err


# ---------------------------------------------------------------- against torch


def _tiny(**overrides):
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    fields = {
        "vocab_size": 61,
        "hidden_size": 32,
        "intermediate_size": 40,
        "moe_intermediate_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 32,
        "tie_word_embeddings": False,
    }
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**(fields | overrides))).train()
    model.set_experts_implementation("grouped_mm")
    c = model.config
    sizes = (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
    )
    experts = ("num_experts", "moe_intermediate_size", "num_experts_per_tok")
    arch = mmm.MoEArch("tiny", *(getattr(c, name) for name in sizes + experts))
    return model, arch


# The second: 3 layers, 3 heads of 8 over 1 kv head, 6 experts, top-3 (bf16 grouped_mm needs 16-byte strides).
TINY = {
    "a": {},
    "b": {
        "hidden_size": 48,
        "moe_intermediate_size": 24,
        "num_experts": 6,
        "num_experts_per_tok": 3,
        "num_attention_heads": 3,
        "num_key_value_heads": 1,
        "vocab_size": 50,
        "num_hidden_layers": 3,
    },
}


@pytest.mark.parametrize("tiny", sorted(TINY))
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("method", ["spiel-ma", "lora"])
def test_activation_term_matches_autograd(tiny, dtype, method):
    """Saved bytes of a tiny Qwen3-MoE (q/k norms, GQA, SDPA, top-k router, grouped_mm experts) equal the formula:
    ours with `all-weights` (the experts' alias shares the weight's storage), PEFT's LoRA on the same targets (its
    W + ΔW of each expert tensor is new storage grouped_mm saves)."""
    import torch
    from test_memory_model import _saved_bytes

    import sparse_plugin

    model, arch = _tiny(**TINY[tiny])
    model = model.to(torch.float32 if dtype == "fp32" else torch.bfloat16)
    if method == "spiel-ma":
        model = sparse_plugin.prepare_model(
            model, sparse_plugin.SparseConfig(density=0.1, target_modules="all-weights")
        )
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=2,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                target_parameters=["gate.weight", "experts.gate_up_proj", "experts.down_proj"],
            ),
        )
    ids = torch.randint(arch.vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    measured = _saved_bytes(model, ids, autocast=None if dtype == "fp32" else torch.bfloat16)
    assert measured == mmm.activation_bytes(arch, Setting(batch=2, seq=16, dtype=dtype, lora_rank=2), method)


@pytest.mark.parametrize("method", mmm.MOE_METHODS)
def test_estimate_matches_a_measured_cpu_peak(method):
    """Peak RSS over the loaded fp32 base, 2 steps with a reselection round, in a fresh process: within 6% of the
    estimate. Many wide experts and few tokens put the peak where MoE memory differs from dense: an MA round's
    scores, SpIEL-AG's gathering over both expert tensors' dense gradients, LoRA's dense W + ΔW per layer."""
    arch = mmm.ARCHS["wide-experts"]
    measured = mmm.measure_peak(arch, method, rank=4, batch=1, seq=128)
    predicted, est = mmm.predicted_over_weights(arch, method, rank=4, batch=1, seq=128)
    assert predicted == pytest.approx(measured, rel=0.06), (est.peak_at, est.components)
