"""SIFT: indices equal the top-k of accumulated dense gradients; no lag; accumulation changes nothing."""

import copy

import torch
from conftest import tiny_llama
from torch import nn
from training_utils import train

from sparse_plugin import SparseAdamW, SparseConfig, iter_sparse_layers, prepare_model
from sparse_plugin.layer import SparseDeltaLinear
from sparse_plugin.selection.sift import POOL_FACTOR, PoolGatherer


def _dense_grad_sums(base, micro_batches, scale=1.0):
    """Σ over micro-batches of each target's dense weight gradient, from an unmodified copy."""
    model = copy.deepcopy(base).requires_grad_(False)
    linears = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    for m in linears.values():
        m.weight.requires_grad_(True)
    for micro in micro_batches:
        (model(micro, labels=micro).loss * scale).backward()
    return {key: m.weight.grad.clone() for key, m in linears.items()}


def _sift_model(density, selection_steps):
    base = tiny_llama()
    config = SparseConfig(method="sift", density=density, selection_steps=selection_steps)
    return base, prepare_model(copy.deepcopy(base), config)


def _micro_batches(n, rows=2):
    return [torch.randint(0, 97, (rows, 10), generator=torch.Generator().manual_seed(s)) for s in range(n)]


def test_indices_are_the_top_k_of_accumulated_dense_gradients_and_the_update_has_no_lag():
    density = 1 / POOL_FACTOR  # the pool covers every matrix: the choice is exact
    base, model = _sift_model(density, selection_steps=3)
    opt = SparseAdamW(model, lr=1e-3)
    micro = _micro_batches(4)
    train(model, opt, [micro[0]])
    train(model, opt, [micro[1]])
    assert all(bool((layer.values == 0).all()) for _, layer in iter_sparse_layers(model))  # still choosing
    train(model, opt, [micro[2]])  # the third micro-batch: choose, and update in this same step
    sums = _dense_grad_sums(base, micro[:3])
    last = _dense_grad_sums(base, micro[2:3])
    for key, layer in iter_sparse_layers(model):
        k = layer.indices.numel()
        expected = torch.topk(sums[key].view(-1).abs(), k).indices.sort().values
        assert torch.equal(layer.indices, expected), key
        # AdamW's first step moves each value by lr·sign(g) of *this* step's gradient (no one-step lag).
        g = last[key].view(-1)[layer.indices]
        torch.testing.assert_close(layer.values.detach(), -1e-3 * g / (g.abs() + 1e-8), rtol=1e-4, atol=1e-7)
    assert opt.selector.selected and opt.selector.last_round["sparse/trained_values"] > 0
    assert all(layer.grad_collector is None for _, layer in iter_sparse_layers(model))


def test_same_total_batch_with_and_without_accumulation_gives_the_same_choice_and_update():
    micro = _micro_batches(2)
    results = []
    for accumulation, selection_steps in ((1, 1), (2, 2)):
        _, model = _sift_model(1 / POOL_FACTOR, selection_steps)
        opt = SparseAdamW(model, lr=1e-3)
        train(model, opt, [torch.cat(micro)], accumulation=accumulation)
        results.append(
            [(layer.indices.clone(), layer.values.detach().clone()) for _, layer in iter_sparse_layers(model)]
        )
    for (idx_a, val_a), (idx_b, val_b) in zip(*results):
        assert torch.equal(idx_a, idx_b)
        torch.testing.assert_close(val_a, val_b, rtol=1e-4, atol=1e-6)


def test_selection_ends_inside_a_step_and_its_later_micro_batches_still_count():
    # selection_steps=3 with 2 micro-batches per step: the choice falls on the first micro-batch of step 2;
    # step 2's update uses both of its micro-batches.
    base, model = _sift_model(1 / POOL_FACTOR, selection_steps=3)
    opt = SparseAdamW(model, lr=1e-3)
    micro = _micro_batches(4)
    train(model, opt, [torch.cat(micro[:2]), torch.cat(micro[2:])], accumulation=2)
    step2 = _dense_grad_sums(base, micro[2:], scale=0.5)
    for key, layer in iter_sparse_layers(model):
        g = step2[key].view(-1)[layer.indices]
        torch.testing.assert_close(layer.values.detach(), -1e-3 * g / (g.abs() + 1e-8), rtol=1e-4, atol=1e-7)


def test_pool_is_the_first_micro_batch_top_candidates():
    layer = SparseDeltaLinear(nn.Linear(5, 4).requires_grad_(False), torch.tensor([0, 1]))
    gatherer = PoolGatherer(layer, selection_steps=2)
    first = torch.arange(20, dtype=torch.float32).view(4, 5) * torch.tensor([1.0, -1.0] * 10).view(4, 5)
    assert gatherer(first) is None
    assert gatherer.pool.tolist() == [12, 13, 14, 15, 16, 17, 18, 19][-POOL_FACTOR * 2 :]
    second = torch.zeros(4, 5)
    second.view(-1)[12] = 100.0
    grad = gatherer(second)
    assert layer.indices.tolist() == [12, 19]  # |12 + 100| and |-19| lead the pool
    assert grad.tolist() == [112.0, -19.0]


def test_resumed_optimizer_does_not_choose_again():
    _, model = _sift_model(0.1, selection_steps=1)
    opt = SparseAdamW(model, lr=1e-3)
    train(model, opt, _micro_batches(1))
    state = opt.state_dict()
    fresh = SparseAdamW(model, lr=1e-3)
    assert not fresh.selector.selected
    fresh.load_state_dict(state)
    assert fresh.selector.selected
    assert all(layer.grad_collector is None for _, layer in iter_sparse_layers(model))
