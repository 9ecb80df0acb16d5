"""tools/benchmarks/memory_model.py: the arithmetic on a hand-computed config, the activation term against the tensors
autograd really saves on a tiny Llama, that it imports no torch, the CLI and the bench comparison."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sparse_plugin import SparseConfig
from sparse_plugin.sizing import allocate_budget, share_budget
from tools.benchmarks import memory_model as mm

ROOT = Path(__file__).resolve().parents[2]
# hidden 8, intermediate 12, 2 layers, 2 heads of 4, 1 kv head, vocab 10: q (8,8) k (4,8) v (4,8) o (8,8)
# gate (12,8) up (12,8) down (8,12) per layer.
TOY = mm.Arch("toy", hidden=8, intermediate=12, layers=2, heads=2, kv_heads=1, vocab=10)
SUM_OUT_IN = 2 * (16 + 12 + 12 + 16 + 20 + 20 + 20)  # 232
MATRICES = 14


def test_toy_shapes_and_counts():
    assert TOY.hd == 4 and TOY.d_q == 8 and TOY.d_kv == 4
    assert TOY.layer_shapes() == [(8, 8), (4, 8), (4, 8), (8, 8), (12, 8), (12, 8), (8, 12)]
    assert TOY.linear_params == 2 * (64 + 32 + 32 + 64 + 96 + 96 + 96) == 960
    assert TOY.params == 960 + 2 * 80 + 5 * 8  # untied embedding and head, 2 norms per layer + final
    assert mm.lora_params(TOY, 2) == 2 * SUM_OUT_IN == 464


def test_optimizer_and_index_bytes():
    shapes = TOY.linear_shapes()
    assert mm.sm3_state_bytes(shapes) == 4 * SUM_OUT_IN + 4 * MATRICES  # r (out) + c (in) + a step, fp32
    assert mm.sm3_state_bytes(shapes, k=464, momentum=True) == 4 * SUM_OUT_IN + 4 * MATRICES + 4 * 464
    sum_out_plus_one = 2 * (8 + 4 + 4 + 8 + 12 + 12 + 8) + MATRICES
    assert mm.pattern_bytes(shapes, 464) == 4 * 464 + 4 * sum_out_plus_one  # int32 indices + crow
    assert mm.pattern_bytes(shapes, 464, blocks=True) == 12 * 464 + 4 * sum_out_plus_one  # + SMT's int64 slots
    # + W0's entries kept while the weight holds W0 + Δ: SpIEL-MA's value + position + entry = 12 B on fp32
    assert mm.pattern_bytes(shapes, 464, base_entry=4) == 8 * 464 + 4 * sum_out_plus_one
    assert mm.merged_base_entry_bytes(mm.Setting(base="bf16")) == 2
    assert mm.merged_base_entry_bytes(mm.Setting(base="nf4")) == 0  # quantised: additive, nothing kept
    assert mm.merged_base_entry_bytes(mm.Setting(base="bf16", shards=2)) == 0  # FSDP: additive
    assert mm.NF4_BYTES_PER_PARAM == pytest.approx((4 + 0.125 + 32 / 16384) / 8)  # 0.127 bits/param of scales


def test_budget_is_the_packages():
    """K = LoRA r2's count, split over the matrices exactly as `prepare_model` splits it."""
    sizes = [o * i for o, i in TOY.linear_shapes()]
    counts = share_budget(sizes, mm.lora_params(TOY, 2))
    assert counts == allocate_budget(TOY.linear_shapes(), SparseConfig(lora_rank_equivalent=2))
    assert sum(counts) == 464 and all(abs(k - s * 464 / 960) < 1 for k, s in zip(counts, sizes))


def test_activation_bytes_by_hand():
    fp32 = mm.Setting(batch=1, seq=4, dtype="fp32", device="cpu", lora_rank=2)
    # norms 2·(4h + 4) = 72, q/k/attention out/v 4·(2·8 + 2·4) = 96, lse 4·2 = 8, MLP 3·4·12 = 144,
    # linear inputs 4·(2·8 + 12) = 112
    assert mm.layer_activation_bytes(TOY, fp32, "spiel-ma") == 432
    assert mm.layer_activation_bytes(TOY, fp32, "full") == 432 + 2 * 4 * 8  # trainable norms keep their input
    assert mm.layer_activation_bytes(TOY, fp32, "lora") == 432 + 7 * 4 * 2  # A's output per module
    bf16 = mm.Setting(batch=1, seq=4, dtype="bf16", lora_rank=2)
    assert mm.layer_activation_bytes(TOY, bf16, "spiel-ag") == 72 + 48 + 8 + 72 + 56
    # fp32 adapters under bf16 autocast: each module keeps its own bf16 re-cast input, 2·(5·8 + 8 + 12)
    assert mm.layer_activation_bytes(TOY, bf16, "lora") == 72 + 48 + 8 + 72 + 2 * 60 + 7 * 2 * 2
    # outside: final norm 36 + log-softmax 40 + labels 8, minus the first layer's norm (frozen embeddings)
    assert mm.outside_activation_bytes(TOY, fp32, "sift") == 48
    assert mm.outside_activation_bytes(TOY, fp32, "full") == 36 + 40 + 8 + 2 * 4 * 8 + 8
    per_step = 2 * 4 * 4 * 4 + 4  # cos and sin (seq × head_dim) + nll's total weight
    assert mm.activation_bytes(TOY, fp32, "smt") == 2 * 432 * 4 + 48 * 4 + per_step


def test_estimates_add_up():
    setting = mm.Setting(batch=1, seq=4, dtype="bf16", lora_rank=2)
    for method in mm.MODELLED_METHODS:
        est = mm.estimate(TOY, method, setting)
        assert sum(est.components.values()) == est.peak_bytes == max(est.moments.values())
        assert est.moments[est.peak_at] == est.peak_bytes
    ma = mm.estimate(TOY, "spiel-ma", setting)
    assert ma.components["optimizer"] == 4 * SUM_OUT_IN + 4 * MATRICES
    assert ma.components["trained"] == 4 * 464
    assert ma.components["indices"] == mm.pattern_bytes(TOY.linear_shapes(), 464, base_entry=2)
    ag = mm.estimate(TOY, "spiel-ag", setting)
    assert ag.components["optimizer"] == 10 * 464  # two fp32 moments and the int16 age
    gather = ag.moments["loss backward (gather)"] - ag.moments["loss backward"]
    assert gather == 8 * 464  # candidates (int32) + sums (fp32)
    full = mm.estimate(TOY, "full", setting)
    step = full.moments["optimizer step"]
    expected = 16 * TOY.params + 4 * (9 * 2 + 3)  # ZeRO mixed precision, + a step per tensor
    assert step - mm.optimizer_step_transient(TOY, setting, "full", []) == expected
    qlora = mm.estimate(TOY, "lora", mm.Setting(batch=1, seq=4, dtype="bf16", base="nf4", lora_rank=2))
    assert qlora.components["weights"] == round(960 * mm.NF4_BYTES_PER_PARAM) + 2 * (160 + 40)
    with pytest.raises(ValueError, match="4-bit"):
        mm.estimate(TOY, "full", mm.Setting(base="nf4"))
    with pytest.raises(ValueError, match="autocast"):
        mm.estimate(TOY, "spiel-ma", mm.Setting(base="fp32", dtype="bf16"))


def test_sift_selection_pool_and_checkpointing():
    setting = mm.Setting(batch=2, seq=8, dtype="bf16", lora_rank=2, sift_selection_steps=4)
    sift = mm.estimate(TOY, "sift", setting)
    counts = share_budget([o * i for o, i in TOY.linear_shapes()], 464)
    pool = sum(12 * min(o * i, 4 * k) for (o, i), k in zip(TOY.linear_shapes(), counts))
    # the selection phase adds the pool; the optimizer state is there in both (allocated at construction)
    assert sift.moments["loss backward (selection)"] - sift.moments["loss backward"] == pool
    plain = mm.estimate(TOY, "spiel-ma", setting)
    ckpt = mm.estimate(TOY, "spiel-ma", mm.Setting(**{**setting.__dict__, "checkpointing": True}))
    saved_plain = plain.moments["loss backward"] - ckpt.moments["loss backward"]
    per_layer = mm.layer_activation_bytes(TOY, setting, "spiel-ma") - 2 * 8  # a layer keeps only its input a·h
    assert saved_plain == 2 * per_layer * 16


def test_imports_no_torch():
    """The model runs where torch is not installed: the package facts it imports come from a torch-free module."""
    code = "import sys, tools.benchmarks.memory_model; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_real_configs():
    assert mm.ARCHS["llama-2-7b"].params == pytest.approx(6.74e9, rel=0.002)
    assert mm.ARCHS["llama-2-13b"].params == pytest.approx(13.02e9, rel=0.002)
    assert mm.ARCHS["llama-3-8b"].params == pytest.approx(8.03e9, rel=0.002)
    assert mm.ARCHS["llama-3-70b"].params == pytest.approx(70.55e9, rel=0.002)
    assert mm.ARCHS["smollm2"].params == 134_515_008  # bench_step.py's full fine-tuning count


def test_cli_json_and_table(capsys):
    assert mm.main(["--model", "llama-2-7b", "--methods", "spiel-ma,lora", "--json"]) == 0
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["label"] for r in rows] == ["SpIEL-MA", "LoRA r16", "QSpIEL-MA", "QLoRA r16"]
    assert "| Llama-2-7B | QLoRA r16 |" in out
    assert mm.main(["--model", "smollm2", "--batch", "4", "--seq", "128", "--dtype", "fp32", "--methods", "full"]) == 0
    assert "SmolLM2-135M | full FT" in capsys.readouterr().out


def test_fsdp_shards_the_base_and_keeps_the_sparse_state_whole(capsys):
    one = mm.Setting(batch=1, seq=4, dtype="bf16", lora_rank=2)
    eight = mm.Setting(batch=1, seq=4, dtype="bf16", lora_rank=2, shards=8)
    # Unsharded during a forward/backward: the root (embedding, head, final norm) and two decoder layers, bf16.
    layer = 2 * (960 // 2 + 2 * 8)
    assert mm.fsdp_gathered_bytes(TOY, one, "spiel-ma") == 2 * (2 * 80 + 8) + 2 * layer
    for method in mm.MODELLED_METHODS:
        whole, sharded = mm.estimate(TOY, method, one), mm.estimate(TOY, method, eight)
        assert sharded.components["weights"] == -(-whole.components["weights"] // 8), method
        if method in mm.SPARSE:  # whole on every rank; a sharded base keeps no W0 entries (additive path)
            assert sharded.components["trained"] == whole.components["trained"], method
            assert sharded.components["indices"] == whole.components["indices"] - 2 * 464, method
        if method not in mm.SPARSE:
            assert sharded.components["trained"] == -(-whole.components["trained"] // 8), method
        assert sharded.peak_bytes < whole.peak_bytes + mm.fsdp_gathered_bytes(TOY, one, method) + 8 * 464
    assert mm.main(["--model", "llama-3-70b", "--shards", "8", "--totals"]) == 0
    assert "per GPU with FSDP over 8 GPUs" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        mm.main(["--shards", "0"])
    assert "--shards must be at least 1" in capsys.readouterr().err


def test_compare_with_bench_rows(tmp_path, capsys):
    bench = tmp_path / "bench.jsonl"
    rows = [{"method": "spiel-ma", "peak_mem_mb": 1000.0}, {"method": "floor", "peak_mem_mb": 900.0}]
    bench.write_text("\n".join(json.dumps(r) for r in rows) + "\n| table |\n")
    table, out = mm.compare(str(bench), {"sparse": 100.0})
    assert [r["method"] for r in out] == ["spiel-ma"]
    est = mm.estimate("smollm2", "spiel-ma", mm.BENCH_SETTING)
    predicted = (est.peak_bytes - est.components["weights"]) / mm.MIB + 100.0  # over the loaded weights
    assert out[0]["predicted_mb"] == pytest.approx(predicted, abs=0.1)
    assert out[0]["error"] == pytest.approx((predicted - 1000) / 1000, abs=1e-4)


# ---------------------------------------------------------------- the activation term vs autograd


def _saved_bytes(model, ids, autocast=None) -> int:
    """Bytes of the distinct storages autograd saves in a forward (parameters and buffers excluded)."""
    import torch

    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    with hooks, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast is not None):
        model(input_ids=ids, labels=ids)
    return sum(seen.values())


@pytest.mark.parametrize(
    "method,dtype",
    [
        ("spiel-ma", "fp32"),
        ("lora", "fp32"),
        ("full", "fp32"),
        ("spiel-ma", "bf16"),
        ("lora", "bf16"),
        ("full", "bf16"),
    ],
)
def test_activation_term_matches_autograd(method, dtype):
    """The saved-activation bytes of a tiny Llama (GQA, SDPA) equal the formula, for sparse, LoRA (fp32 adapters,
    bf16 autocast) and full fine-tuning."""
    import torch
    from conftest import tiny_llama

    import sparse_plugin

    batch, seq = 2, 16
    torch_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
    model = tiny_llama(dtype=torch_dtype).train()
    cfg = model.config
    arch = mm.Arch(
        "tiny",
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_hidden_layers,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.vocab_size,
    )
    if method == "spiel-ma":
        model = sparse_plugin.prepare_model(model, sparse_plugin.SparseConfig(lora_rank_equivalent=4))
    elif method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
        )
    else:
        model.requires_grad_(True)
    ids = torch.randint(cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    measured = _saved_bytes(model, ids, autocast=None if dtype == "fp32" else torch.bfloat16)
    setting = mm.Setting(batch=batch, seq=seq, dtype=dtype, lora_rank=4, device="cpu")
    assert measured == mm.activation_bytes(arch, setting, method)
