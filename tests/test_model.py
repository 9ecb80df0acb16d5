"""prepare_model: target discovery, budget allocation, random indices, freezing."""

import pytest
import torch

from sparse_plugin import (
    SparseConfig,
    SparseDeltaLinear,
    iter_sparse_layers,
    prepare_model,
    print_trainable_parameters,
)
from sparse_plugin.model import find_targets, random_indices

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_all_linear_excludes_the_output_head(tiny_model):
    names = find_targets(tiny_model, "all-linear")
    assert "lm_head" not in names
    assert len(names) == 2 * len(PROJ)


def test_suffix_list_and_regex(tiny_model):
    assert find_targets(tiny_model, ["q_proj", "v_proj"]) == [
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    ]
    assert find_targets(tiny_model, r"model\.layers\.1\.mlp\..*") == [f"model.layers.1.mlp.{p}" for p in PROJ[4:]]


def test_unknown_target_names_the_entry_and_the_choices(tiny_model):
    with pytest.raises(
        ValueError,
        match="entry 'qkv' matches no module with a weight of LlamaForCausalLM; available suffixes: .*q_proj",
    ):
        find_targets(tiny_model, ["q_proj", "qkv"])
    with pytest.raises(ValueError, match="select no weight"):
        find_targets(tiny_model, "nothing.*")


@pytest.mark.parametrize("numel, count", [(1, 1), (10, 3), (10, 9), (100_003, 4_600), (50, 50)])
def test_random_indices_sorted_unique_in_range_and_seeded(numel, count):
    a = random_indices(numel, count, torch.Generator().manual_seed(1))
    b = random_indices(numel, count, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.dtype == torch.int64 and a.numel() == count
    assert bool((a[1:] > a[:-1]).all()) and int(a.min()) >= 0 and int(a.max()) < numel
    if count < numel // 2:
        assert not torch.equal(a, random_indices(numel, count, torch.Generator().manual_seed(2)))


def test_random_indices_are_uniform():
    hits = torch.zeros(20)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2000):
        hits[random_indices(20, 3, gen)] += 1
    assert hits.min() > 200 and hits.max() < 400  # expected 300 each; ±100 is > 5 standard deviations


def test_prepare_freezes_wraps_and_keeps_outputs(tiny_model):
    ids = torch.randint(0, 97, (2, 9))
    before = tiny_model(ids).logits
    config = SparseConfig(lora_rank_equivalent=2, seed=7)
    model = prepare_model(tiny_model, config)
    layers = dict(iter_sparse_layers(model))
    assert len(layers) == 14 and all(isinstance(m, SparseDeltaLinear) for m in layers.values())
    assert "model.layers.0.self_attn.q_proj.weight" in layers
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == [f"{k.removesuffix('.weight')}.delta.values" for k in layers]
    assert sum(m.values.numel() for m in layers.values()) == sum(
        2 * (m.in_features + m.out_features) for m in layers.values()
    )
    assert model.sparse_config is config
    torch.testing.assert_close(model(ids).logits, before)  # values start at zero


def test_prepare_is_seeded(tiny_model):
    from conftest import tiny_llama

    a = prepare_model(tiny_model, SparseConfig(density=0.05, seed=1))
    b = prepare_model(tiny_llama(), SparseConfig(density=0.05, seed=1))
    for (_, la), (_, lb) in zip(iter_sparse_layers(a), iter_sparse_layers(b)):
        assert torch.equal(la.indices, lb.indices)


def test_prepare_twice_is_refused(tiny_model):
    prepare_model(tiny_model, SparseConfig(density=0.1))
    with pytest.raises(ValueError, match="already has sparse layers"):
        prepare_model(tiny_model, SparseConfig(density=0.1))


def test_values_dtype_and_training_step_moves_only_values(tiny_model):
    model = prepare_model(tiny_model, SparseConfig(density=0.1, values_dtype="bfloat16"))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 97, (2, 9))
    model(ids, labels=ids).loss.backward()
    opt.step()
    layer = next(lay for _, lay in iter_sparse_layers(model))
    assert layer.values.dtype == torch.bfloat16 and layer.values.abs().sum() > 0
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_print_trainable_parameters(tiny_model, capsys):
    prepare_model(tiny_model, SparseConfig(num_params=500))
    print_trainable_parameters(tiny_model)
    total = sum(p.numel() for p in tiny_model.parameters())
    assert (
        capsys.readouterr().out.strip()
        == f"trainable params: 500 || all params: {total:,d} || trainable%: {100 * 500 / total:.4f}"
    )


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, None)])
def test_training_with_merged_weights_matches_the_additive_path(dtype, tol):
    """SpIEL-MA with SM3 for 25 steps (two prune/regrow rounds) on the same batches: the merged strategy (W0 + Δ kept in
    the base weight) and the additive one train the same model. fp32: equal losses up to summation order (1e-5). bf16:
    merged rounds W0 + Δ to bf16 as mixed-precision full fine-tuning does, so only the final loss is compared, within
    2%. In both the state dict still holds W0."""
    from conftest import tiny_llama

    from sparse_plugin import SM3

    data = [torch.randint(3, 97, (4, 12), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    batches = [data[i % 3] for i in range(25)]
    runs = {}
    for strategy in ("additive", "merged"):
        model = prepare_model(
            tiny_llama(dtype=dtype), SparseConfig(density=0.05, reselection_steps=10, forward_strategy=strategy)
        )
        base = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
        optimizer = SM3(model, lr=1e-2, total_steps=25)
        losses = []
        for batch in batches:
            loss = model(batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.float().item())
        state = model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in base.items())  # Δ never leaks into what is saved as the base
        runs[strategy] = (losses, [layer.indices.clone() for _, layer in iter_sparse_layers(model)])
    (additive, add_indices), (merged, merged_indices) = runs["additive"], runs["merged"]
    assert additive[-1] < additive[0] - 0.05  # it learns
    if tol is not None:
        torch.testing.assert_close(torch.tensor(merged), torch.tensor(additive), atol=tol, rtol=tol)
        assert all(torch.equal(a, b) for a, b in zip(add_indices, merged_indices))
    else:
        assert abs(merged[-1] - additive[-1]) < 0.02 * additive[-1]


def test_magnitude_initial_positions_are_each_matrix_largest_entries(tiny_model):
    bases = {n: m.weight.detach().clone() for n, m in tiny_model.named_modules() if n.endswith(PROJ)}
    model = prepare_model(tiny_model, SparseConfig(density=0.05, initial_positions="magnitude"))
    for name, layer in iter_sparse_layers(model):
        flat = bases[name.removesuffix(".weight")].reshape(-1).abs()
        k = layer.indices.numel()
        chosen = flat[layer.indices.long()]
        others = flat[~torch.isin(torch.arange(flat.numel()), layer.indices.long())]
        assert k > 0 and chosen.min() >= others.max()  # reference: no unchosen entry is larger
        assert torch.equal(layer.indices, layer.indices.sort().values)
