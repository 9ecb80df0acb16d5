"""SMT: block statistics and the global choice against hand computations and a dense-gradient reference."""

import copy

import pytest
import torch
from conftest import tiny_llama
from torch import nn
from training_utils import train

from sparse_plugin import SM3, SparseAdamW, SparseConfig, iter_sparse_layers, prepare_model
from sparse_plugin.kernels.blocks import BlockPattern, block_grid, block_positions
from sparse_plugin.layer import SparseDeltaLinear
from sparse_plugin.selection.smt import BlockStats, choose_blocks, warmup_length


def test_block_stats_by_hand():
    # 5×7 with block 3: a 2×3 grid whose last row and column of blocks are 2 high / 1 wide.
    layer = SparseDeltaLinear(nn.Linear(7, 5).requires_grad_(False), torch.tensor([0]))
    stats = BlockStats(layer, 3)
    grad = -torch.arange(35, dtype=torch.float32).view(5, 7)
    stats(grad)
    stats(grad)
    expected = torch.tensor(
        [
            [sum(abs(grad[r, c]) for r in rows for c in cols) * 2 for cols in ([0, 1, 2], [3, 4, 5], [6])]
            for rows in ([0, 1, 2], [3, 4])
        ]
    )
    torch.testing.assert_close(stats.sums, expected)
    assert stats.block_areas().tolist() == [[9, 9, 3], [6, 6, 2]]


def test_global_choice_by_hand():
    # Layer 0: four 4-element blocks; layer 1: two 2-element blocks. Budget 10.
    scores = [torch.tensor([[1.0, 9.0], [5.0, 3.0]]), torch.tensor([[7.0, 4.0]])]
    areas = [torch.full((2, 2), 4), torch.tensor([[2, 2]])]
    # Ranked: 9 (L0 #1, 4), 7 (L1 #0, 2), 5 (L0 #2, 4) -> 10; the next would exceed the budget.
    chosen = choose_blocks(scores, areas, budget=10)
    assert [c.tolist() for c in chosen] == [[1, 2], [0]]
    # A budget smaller than any block still trains the best one.
    assert [c.tolist() for c in choose_blocks(scores, areas, budget=1)] == [[1], []]


def test_warmup_defaults_to_a_tenth_of_the_run_capped_at_the_papers_100():
    config = SparseConfig(method="smt", density=0.1)
    assert (
        warmup_length(config, 30) == 3 and warmup_length(config, 5000) == 100 and warmup_length(config, None) is None
    )
    assert warmup_length(SparseConfig(method="smt", density=0.1, warmup_steps=7), None) == 7


def _reference_block_means(base, batches, block_size, accumulation=1, scale=True):
    """Mean |g| per block from the dense weight gradients of an unmodified copy, summed over micro-batches."""
    model = copy.deepcopy(base).requires_grad_(False)
    linears = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    for m in linears.values():
        m.weight.requires_grad_(True)
    sums = {}
    for batch in batches:
        for micro in batch.chunk(accumulation):
            loss = model(micro, labels=micro).loss
            (loss / accumulation if scale else loss).backward()
            for key, m in linears.items():
                bh, bw = block_grid(tuple(m.weight.shape), block_size)
                g = m.weight.grad.abs()
                gr, gc = -(-g.shape[0] // bh), -(-g.shape[1] // bw)
                table = torch.zeros(gr, gc)
                for i in range(gr):
                    for j in range(gc):
                        block = g[i * bh : (i + 1) * bh, j * bw : (j + 1) * bw]
                        table[i, j] = block.sum() / block.numel()
                sums[key] = sums.get(key, 0) + table
                m.weight.grad = None
    return sums


def _smt_model(**overrides):
    base = tiny_llama()
    options = {
        "method": "smt",
        "density": 0.3,
        "block_size": 32,
        "warmup_steps": 2,
        "target_modules": "all-linear",
    } | overrides
    config = SparseConfig(**options)
    return base, prepare_model(copy.deepcopy(base), config)


def test_selection_equals_reference_and_warmup_updates_nothing():
    base, model = _smt_model()
    budget = sum(layer.indices.numel() for _, layer in iter_sparse_layers(model))
    opt = SparseAdamW(model, lr=1e-2)
    batches = [torch.randint(0, 97, (4, 10), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    train(model, opt, batches[:1])
    assert all(bool((layer.values == 0).all()) for _, layer in iter_sparse_layers(model))  # warm-up: no update
    train(model, opt, batches[1:2])
    layers = list(iter_sparse_layers(model))
    reference = _reference_block_means(base, batches[:2], 32)
    keys = [key for key, _ in layers]
    expected = choose_blocks(
        [reference[k] for k in keys], [BlockStats(layer, 32).block_areas() for _, layer in layers], budget
    )
    for (key, layer), blocks in zip(layers, expected):
        assert torch.equal(layer.indices, block_positions(blocks, layer.shape, block_grid(layer.shape, 32))), key
    trained = sum(layer.indices.numel() for _, layer in layers)
    assert 0 < trained <= budget
    assert opt.selector.last_round == {
        "sparse/selected_blocks": sum(b.numel() for b in expected),
        "sparse/trained_values": trained,
    }
    # The chosen layers now train whole blocks with block GEMMs; the step after the warm-up updates them.
    train(model, opt, batches[2:])
    for _, layer in layers:
        if layer.indices.numel():
            assert isinstance(layer.pattern(), BlockPattern) and bool((layer.values != 0).any())
            torch.testing.assert_close(layer.base_layer.weight, base.get_submodule(_name(layer, model)).weight)


def _name(layer, model):
    return next(n for n, m in model.named_modules() if m is layer)


def test_statistics_sum_over_micro_batches_whatever_the_step_split():
    # The same four micro-batches as 2 steps × 2 (accumulation) or 4 steps × 1 give the same blocks.
    micro = [torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(s)) for s in range(4)]
    picks = []
    for accumulation in (1, 2):
        _, model = _smt_model(warmup_steps=4 // accumulation)
        opt = SM3(model, lr=1e-2)
        steps = [torch.cat(micro[i : i + accumulation]) for i in range(0, 4, accumulation)]
        train(model, opt, steps, accumulation=accumulation, scale=False)
        picks.append([layer.indices.clone() for _, layer in iter_sparse_layers(model)])
    assert all(torch.equal(a, b) for a, b in zip(*picks))


def test_smt_defaults_to_the_papers_qkv_targets():
    model = prepare_model(tiny_llama(), SparseConfig(method="smt", density=0.1))
    assert sorted({key.split(".")[-2] for key, _ in iter_sparse_layers(model)}) == ["k_proj", "q_proj", "v_proj"]


def test_block_layer_gradients_equal_the_dense_reference():
    torch.manual_seed(0)
    base = nn.Linear(29, 13).requires_grad_(False)
    indices = block_positions(torch.tensor([0, 3, 5]), (13, 29), (8, 8))
    for strategy in ("additive", "merged"):
        layer = SparseDeltaLinear(copy.deepcopy(base), indices, forward_strategy=strategy, block_size=8)
        layer.values.data.normal_()
        dense = copy.deepcopy(base)
        dense.weight.data += layer.delta_weight()
        dense.weight.requires_grad_(True)
        x = torch.randn(3, 5, 29, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_(True)
        layer(x).square().sum().backward()
        dense(x_ref).square().sum().backward()
        assert isinstance(layer.pattern(), BlockPattern)
        torch.testing.assert_close(x.grad, x_ref.grad)
        torch.testing.assert_close(layer.values.grad, dense.weight.grad.view(-1)[indices])


def test_plain_loop_without_run_length_asks_for_it():
    _, model = _smt_model(warmup_steps=None)
    opt = SparseAdamW(model, lr=1e-2)
    with pytest.raises(RuntimeError, match="SMT needs the training length"):
        train(model, opt, [torch.randint(0, 97, (2, 6))])


def test_training_goes_on_when_the_counts_change_under_a_live_graph():
    # `train` keeps the last step's loss (and so its graph) alive into the next forward: the values' new size
    # must still be accepted by the next backward.
    _, model = _smt_model(warmup_steps=1, density=0.05, block_size=16)
    opt = SparseAdamW(model, lr=1e-2)
    train(model, opt, [torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(s)) for s in range(3)])
    counts = [layer.indices.numel() for _, layer in iter_sparse_layers(model)]
    assert 0 in counts and any(c % 256 == 0 and c for c in counts)  # some layers lose all, others gain blocks
    assert all(bool((layer.values != 0).all()) for _, layer in iter_sparse_layers(model) if layer.indices.numel())
