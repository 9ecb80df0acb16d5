"""Weights that are not an nn.Linear's: fused MoE experts (Qwen3-MoE, Mixtral), GPT-2's Conv1D, embeddings (tied
heads). Targets, outputs and every gradient against a dense W0 + Δ reference, training, adapters and merges."""

import copy
import json
import re

import pytest
import torch
from conftest import tiny_llama
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from sparse_plugin import SM3, SparseAdamW, SparseConfig, iter_sparse_layers, load_adapter, prepare_model, save_adapter
from sparse_plugin.cli import main, summarize
from sparse_plugin.kernels.blocks import tiles_whole_blocks
from sparse_plugin.merge import merge_checkpoint
from sparse_plugin.model import find_target_weights
from sparse_plugin.parameter import SparseDeltaParameter
from sparse_plugin.selection.spiel import top_outer_scores

EXPERTS = ("eager", "grouped_mm", "batched_mm")


def tiny_qwen3_moe(experts="grouped_mm", seed=0, **overrides):
    torch.manual_seed(seed)
    config = Qwen3MoeConfig(
        **{
            "vocab_size": 61,
            "hidden_size": 24,
            "intermediate_size": 40,
            "moe_intermediate_size": 20,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "max_position_embeddings": 32,
            "tie_word_embeddings": False,
            **overrides,
        }
    )
    model = Qwen3MoeForCausalLM(config).eval()
    model.set_experts_implementation(experts)
    return model


def tiny_mixtral(experts="grouped_mm", seed=0):
    torch.manual_seed(seed)
    config = MixtralConfig(
        vocab_size=61,
        hidden_size=24,
        intermediate_size=20,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=32,
    )
    model = MixtralForCausalLM(config).eval()
    model.set_experts_implementation(experts)
    return model


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=61, n_embd=24, n_layer=2, n_head=4, n_positions=32, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0
    )
    return GPT2LMHeadModel(config).eval()


def _ids(seed=0, vocab=61):
    return torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(seed))


def _randomize(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in iter_sparse_layers(model):
            layer.values.copy_(torch.randn(layer.values.shape, generator=gen) * 0.05)


def _dense_reference(base, model):
    """A copy of the unprepared `base` whose targeted weights are W0 + Δ, trainable: the plain torch reference."""
    reference = copy.deepcopy(base)
    params = dict(reference.named_parameters())
    reference.requires_grad_(False)
    for key, layer in iter_sparse_layers(model):
        with torch.no_grad():
            params[key].add_(layer.delta_weight().to(params[key].dtype))
        params[key].requires_grad_(True)
    return reference, params


CASES = {
    **{f"qwen3-moe-{e}": (lambda e=e: tiny_qwen3_moe(e), {"target_modules": "all-weights"}) for e in EXPERTS},
    "mixtral-eager": (lambda: tiny_mixtral("eager"), {"target_modules": ["experts"]}),
    "mixtral-grouped": (lambda: tiny_mixtral("grouped_mm"), {"target_parameters": ["experts.gate_up_proj"]}),
    "gpt2-all-linear": (tiny_gpt2, {"target_modules": "all-linear"}),
    "llama-tied-embedding": (
        lambda: tiny_llama(vocab_size=61, tie_word_embeddings=True),
        {"target_modules": ["q_proj"], "target_parameters": ["embed_tokens.weight"]},
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("checkpointing", [None, "non-reentrant", "reentrant"])
def test_outputs_and_every_gradient_match_a_dense_reference(case, checkpointing):
    build, targets = CASES[case]
    base = build()
    model = prepare_model(copy.deepcopy(base), SparseConfig(density=0.2, **targets))
    assert any(isinstance(layer, SparseDeltaParameter) for _, layer in iter_sparse_layers(model))
    _randomize(model)
    reference, params = _dense_reference(base, model)
    if checkpointing:  # the decoder layers' forward runs again inside backward
        for m in (model, reference):
            m.activation_checkpointing_enable({"use_reentrant": checkpointing == "reentrant"})
            m.train()
    ids = _ids()
    out = model(ids, labels=ids)
    expected = reference(ids, labels=ids)
    torch.testing.assert_close(out.logits, expected.logits, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    expected.loss.backward()
    for key, layer in iter_sparse_layers(model):
        dense = params[key].grad.reshape(-1)[layer.indices.long()]
        assert layer.values.grad is not None and dense.abs().sum() > 0, key
        torch.testing.assert_close(layer.values.grad, dense, rtol=1e-5, atol=1e-6, msg=key)
    # nothing dense is left behind: the base weights have no gradient, the forward restored the parameters
    assert all(p.grad is None for n, p in model.named_parameters() if not n.endswith("delta.values"))
    assert all(type(p) is torch.nn.Parameter for p in model.parameters())


def test_tied_head_sees_the_embedding_delta():
    model = prepare_model(
        tiny_llama(vocab_size=61, tie_word_embeddings=True),
        SparseConfig(density=0.1, target_parameters=["embed_tokens.weight"]),
    )
    _randomize(model)
    model(_ids())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied, holding W0 + Δ
    (key, layer), *_ = iter_sparse_layers(model)
    assert key == "model.embed_tokens.weight"
    state = model.state_dict()
    for name in ("model.embed_tokens.weight", "lm_head.weight"):  # both keys yield W0
        assert torch.equal(state[name].view(-1)[layer.indices], layer.base_entries())


def test_target_discovery_on_a_moe_model():
    model = tiny_qwen3_moe()
    with pytest.warns(UserWarning, match=r"'all-linear' leaves out \d+% .*experts\.gate_up_proj.*'all-weights'"):
        linear = find_target_weights(model, "all-linear")
    assert all(k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")) for k in linear)
    weights = find_target_weights(model, "all-weights")
    assert "model.layers.0.mlp.experts.gate_up_proj" in weights and "model.layers.1.mlp.gate.weight" in weights
    assert "model.embed_tokens.weight" not in weights and "lm_head.weight" not in weights
    experts = [f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj")]
    assert find_target_weights(model, ["experts"]) == experts
    assert find_target_weights(model, None, ["experts.gate_up_proj", "experts.down_proj"]) == experts
    assert find_target_weights(model, None, r".*\.experts\.down_proj") == experts[1::2]
    with pytest.raises(
        ValueError, match=r"`target_parameters` entry 'experts\.up_proj' matches no weight of Qwen3MoeForCausalLM"
    ):
        find_target_weights(model, None, ["experts.up_proj"])


def test_gpt2_all_linear_is_its_conv1d_projections():
    keys = find_target_weights(tiny_gpt2(), "all-linear")
    assert len(keys) == 8 and all(k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) for k in keys)


def test_lora_rank_equivalent_counts_one_pair_per_expert():
    model = prepare_model(tiny_qwen3_moe(), SparseConfig(lora_rank_equivalent=2, target_modules=["experts"]))
    shapes = [layer.weight_shape for _, layer in iter_sparse_layers(model)]
    trained = sum(layer.values.numel() for _, layer in iter_sparse_layers(model))
    assert trained == sum(2 * e * (o + i) for e, o, i in shapes)  # PEFT's LoRA on the same experts: r·E·(in+out)


def test_top_outer_scores_pairs_each_expert_with_its_own_columns():
    gen = torch.Generator().manual_seed(0)
    experts, rows, cols = 3, 4, 5
    row, col = torch.rand(experts * rows, generator=gen), torch.rand(experts * cols, generator=gen)
    dense = (row.view(experts, rows, 1) * col.view(experts, 1, cols)).reshape(-1)
    exclude = torch.tensor([0, 7, 33])
    dense[exclude] = -1
    positions, scores = top_outer_scores(row, col, exclude, 6, matrices=experts)
    assert torch.equal(positions.sort().values, torch.topk(dense, 6).indices.sort().values)


def test_sm3_accumulators_are_per_expert_row_and_column():
    model = prepare_model(tiny_qwen3_moe(), SparseConfig(density=0.2, target_parameters=["experts.down_proj"]))
    optimizer = SM3(model, lr=1e-2, total_steps=10)
    ids = _ids()
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    _, layer = next(iter_sparse_layers(model))
    row, col = optimizer.row_col_accumulators(layer.values)
    experts, out_features, in_features = layer.weight_shape
    assert row.shape == (experts * out_features,) and col.shape == (experts * in_features,)
    # each accumulator is the max of ν over its (expert, row) / (expert, column) positions: the first step's ν = g²
    grad_sq = torch.zeros(layer.weight_shape).view(-1)
    grad_sq[layer.indices.long()] = layer.values.grad.float() ** 2
    grad_sq = grad_sq.view(layer.weight_shape)
    torch.testing.assert_close(row, grad_sq.amax(dim=2).reshape(-1))
    torch.testing.assert_close(col, grad_sq.amax(dim=1).reshape(-1))


def _train(model, optimizer, steps=6):
    for step in range(steps):
        ids = _ids(seed=step)
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def _per_expert(layer):
    experts, rows, cols = layer.weight_shape
    return torch.bincount(layer.indices.long() // (rows * cols), minlength=experts)


@pytest.mark.parametrize("experts", ["eager", "grouped_mm"])
def test_spiel_ma_moves_budget_between_experts(experts):
    config = SparseConfig(density=0.1, target_modules=["experts"], reselection_steps=2, initial_reselection_rate=0.5)
    model = prepare_model(tiny_qwen3_moe(experts), config)
    before = {key: (_per_expert(layer), layer.indices.clone()) for key, layer in iter_sparse_layers(model)}
    base = {k: v.clone() for k, v in model.state_dict().items() if "experts" in k and "sparse" not in k}
    _train(model, SM3(model, lr=1e-2, total_steps=8), steps=6)
    moved = 0
    for key, layer in iter_sparse_layers(model):
        counts, indices = before[key]
        assert layer.indices.numel() == indices.numel() and bool((layer.indices[1:] > layer.indices[:-1]).all())
        moved += int((_per_expert(layer) != counts).any())
        assert not torch.equal(layer.indices, indices) and layer.values.abs().sum() > 0
    assert moved > 0  # one flat budget per tensor: prune/regrow shifted positions from one expert to another
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base.items())  # the state dict still yields W0


@pytest.mark.parametrize("method", ["sift", "smt"])
def test_sift_and_smt_choose_positions_in_fused_experts(method):
    config = SparseConfig(
        method=method,
        density=0.25,
        target_modules=["experts"],
        selection_steps=2,
        warmup_steps=2,
        block_size=4,
    )
    model = prepare_model(tiny_qwen3_moe(), config)
    _train(model, SparseAdamW(model, lr=1e-2, total_steps=6), steps=5)
    for _, layer in iter_sparse_layers(model):
        assert layer.values.abs().sum() > 0
        if method == "smt":  # whole 4×4 blocks, each inside one expert (4 divides every expert's rows)
            assert tiles_whole_blocks(layer.indices, layer.shape, (4, 4))


def _trained(build, targets, seed=3):
    model = prepare_model(build(), SparseConfig(density=0.1, **targets))
    _randomize(model, seed)
    return model


@pytest.mark.parametrize(
    "build, targets",
    [
        (tiny_qwen3_moe, {"target_modules": "all-weights"}),
        (tiny_mixtral, {"target_modules": ["experts"]}),
        (tiny_gpt2, {"target_modules": "all-linear"}),
        (
            lambda: tiny_llama(vocab_size=61, tie_word_embeddings=True),
            {"target_parameters": ["embed_tokens.weight"]},
        ),
    ],
    ids=["qwen3-moe", "mixtral", "gpt2", "llama-tied-embedding"],
)
def test_save_merge_equals_the_adapter_model_and_unmerge_is_exact(tmp_path, build, targets):
    base = build()
    base.save_pretrained(tmp_path / "base")
    model = _trained(build, targets)
    save_adapter(model, tmp_path / "adapter")
    meta = json.loads((tmp_path / "adapter" / "sparse_config.json").read_text())
    recorded = {key: target["shape"] for key, target in meta["targets"].items()}
    assert recorded == {key: list(layer.weight_shape) for key, layer in iter_sparse_layers(model)}
    merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged", progress=False)
    merged = type(base).from_pretrained(tmp_path / "merged").eval()
    if hasattr(base, "set_experts_implementation"):
        merged.set_experts_implementation(base.config._experts_implementation)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    merge_checkpoint(tmp_path / "merged", tmp_path / "adapter", tmp_path / "unmerged", unmerge=True, progress=False)
    from safetensors.torch import load_file

    original, restored = (
        load_file(tmp_path / "base" / "model.safetensors"),
        load_file(tmp_path / "unmerged" / "model.safetensors"),
    )
    assert original.keys() == restored.keys() and all(torch.equal(original[k], restored[k]) for k in original)
    # and the adapter loads into a fresh base: same logits
    loaded = load_adapter(build(), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_inspect_shows_per_expert_counts(tmp_path, capsys):
    model = _trained(tiny_qwen3_moe, {"target_parameters": ["experts.down_proj"]})
    save_adapter(model, tmp_path)
    summary = summarize(str(tmp_path))
    for target, (key, layer) in zip(summary["targets"], iter_sparse_layers(model)):
        assert target["name"] == key and target["shape"] == [4, 24, 20]
        assert target["per_matrix_counts"] == _per_expert(layer).tolist()
    assert main(["inspect", str(tmp_path)]) == 0
    assert "per expert: " in capsys.readouterr().out


@pytest.mark.parametrize(
    "method, optim, config",
    [
        ("spiel", "spiel_sm3", {"reselection_steps": 2, "target_modules": "all-weights"}),
        ("sift", "spiel_adamw", {"selection_steps": 2, "target_modules": "all-weights"}),
        # SMT ranks blocks over all targets at once: on all-weights the attention's win every block here
        ("smt", "spiel_adamw", {"warmup_steps": 2, "block_size": 4, "target_modules": ["experts"]}),
    ],
)
def test_trainer_trains_fused_experts(tmp_path, method, optim, config):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from sparse_plugin import SparseCallback

    model = prepare_model(tiny_qwen3_moe(), SparseConfig(method=method, density=0.1, **config))
    model.activation_checkpointing_enable({"use_reentrant": False})
    base = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("experts.gate_up_proj")}
    ids = torch.randint(3, 61, (16, 10), generator=torch.Generator().manual_seed(0)).tolist()
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=6,
        learning_rate=1e-2,
        save_strategy="steps",
        save_steps=3,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        optim=optim,
    )
    dataset = Dataset.from_dict({"input_ids": ids, "labels": ids})
    Trainer(model=model, args=args, train_dataset=dataset, callbacks=[SparseCallback()]).train()
    experts = [layer for key, layer in iter_sparse_layers(model) if ".experts." in key]
    assert experts and all(layer.values.abs().sum() > 0 for layer in experts)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in base.items())  # checkpoints hold W0
    saved = json.loads((tmp_path / "out" / "checkpoint-3" / "sparse_config.json").read_text())
    assert saved["targets"]["model.layers.0.mlp.experts.gate_up_proj"]["shape"] == [4, 40, 24]
    loaded = load_adapter(tiny_qwen3_moe(), tmp_path / "out")
    ids = _ids()
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_a_tied_weight_reaches_the_collector_once_with_both_uses_summed():
    base = tiny_llama(vocab_size=61, tie_word_embeddings=True)
    model = prepare_model(copy.deepcopy(base), SparseConfig(density=0.1, target_parameters=["embed_tokens.weight"]))
    _randomize(model)
    reference, params = _dense_reference(base, model)
    (key, layer), *_ = iter_sparse_layers(model)
    seen = []
    layer.grad_collector = lambda dense: seen.append(dense.clone()) or dense.view(-1)[layer.indices.long()]
    ids = _ids()
    model(ids, labels=ids).loss.backward()
    reference(ids, labels=ids).loss.backward()
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], params[key].grad, rtol=1e-5, atol=1e-6)


def test_trainable_count_equals_peft_lora_with_target_parameters():
    from peft import LoraConfig, get_peft_model

    targets = ["experts.gate_up_proj", "experts.down_proj"]
    lora = get_peft_model(tiny_qwen3_moe(), LoraConfig(r=2, target_modules=[], target_parameters=targets))
    lora_count = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    sparse = prepare_model(tiny_qwen3_moe(), SparseConfig(lora_rank_equivalent=2, target_parameters=targets))
    assert sum(p.numel() for p in sparse.parameters() if p.requires_grad) == lora_count


@pytest.mark.parametrize("build", [tiny_qwen3_moe, tiny_mixtral], ids=["qwen3-moe", "mixtral"])
def test_merge_checks_the_fused_digest_of_targets_stored_per_expert(tmp_path, capsys, build):
    """Without stored base values, a fused target stored per expert is checked against its recorded sha256 on its
    pieces' entries re-assembled in the fused order: the right base merges and unmerges back, a wrong base (or a
    wrong merged model) is refused in one line and nothing is written; --force skips the check."""
    from cli_utils import assert_refused, merge_argv, run, unmerge_argv

    build().save_pretrained(tmp_path / "base")
    build(seed=1).save_pretrained(tmp_path / "other")
    model = prepare_model(build(), SparseConfig(density=0.1, target_modules=["experts"], store_base_values=False))
    _randomize(model, 3)
    save_adapter(model, tmp_path / "adapter")
    meta = json.loads((tmp_path / "adapter" / "sparse_config.json").read_text())
    assert all(t["base_sha256"] for t in meta["targets"].values()) and any("experts." in k for k in meta["targets"])
    expert = next(k for k in meta["targets"] if "experts" in k)
    for wrong, argv in (
        ("other", merge_argv(tmp_path / "other", tmp_path / "adapter", tmp_path / "bad")),
        ("base", unmerge_argv(tmp_path / "base", tmp_path / "adapter", tmp_path / "bad")),
    ):
        why = "differs from the base" if wrong == "other" else "is not this adapter merged into its base"
        assert_refused(*run(capsys, *argv), rf"`{re.escape(expert)}` \(and \d+ more\) {why}.*sha256.*--force")
        assert not (tmp_path / "bad").exists()
    assert run(capsys, *merge_argv(tmp_path / "other", tmp_path / "adapter", tmp_path / "forced", "--force"))[0] == 0
    assert run(capsys, *merge_argv(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"))[0] == 0
    assert run(capsys, *unmerge_argv(tmp_path / "merged", tmp_path / "adapter", tmp_path / "unmerged"))[0] == 0
    from safetensors.torch import load_file

    original, restored = (load_file(tmp_path / d / "model.safetensors") for d in ("base", "unmerged"))
    assert all(torch.allclose(original[k], restored[k], atol=1e-6) for k in original)
