"""SpIEL prune/regrow: invariants, exact choices against hand-computed scores, schedule, AG/MA statistics."""

import pytest
import torch
from torch import nn
from training_utils import train

import sparse_plugin.selection.spiel as spiel
from sparse_plugin import SM3, SparseAdamW, SparseConfig, iter_sparse_layers, prepare_model
from sparse_plugin.layer import SparseDeltaLinear
from sparse_plugin.selection.schedule import is_gathering_step, is_reselection_step, reselection_rate
from sparse_plugin.selection.spiel import GradientGatherer, prune_regrow, top_outer_scores


def _fixed_candidates(positions, scores):
    positions, scores = torch.tensor(positions), torch.tensor(scores, dtype=torch.float32)

    def fn(remaining, count):
        outside = ~torch.isin(positions, remaining)
        return positions[outside], scores[outside]

    return fn


def test_prune_smallest_and_regrow_top_scores_by_hand():
    indices = torch.tensor([2, 5, 8, 11, 14])
    values = torch.tensor([0.5, -0.01, 0.3, 0.02, -0.9])
    # prune 2: positions 5 (|0.01|) and 11 (|0.02|). Candidates: 3 (score 9), 11 (8, pruned now), 2 (7, remains:
    # excluded), 7 (5), 0 (1). Top 2 outside the remaining set: 3 and 11; 11 comes straight back and stays.
    result = prune_regrow(indices, values, 2, _fixed_candidates([3, 11, 2, 7, 0], [9.0, 8.0, 7.0, 5.0, 1.0]))
    assert result.indices.tolist() == [2, 3, 8, 11, 14]
    assert result.source.tolist() == [0, -1, 2, 3, 4]  # 11 keeps its slot (value and optimizer state)
    assert result.regrown == 1


@pytest.mark.parametrize("seed", range(5))
def test_invariants_on_random_rounds(seed):
    gen = torch.Generator().manual_seed(seed)
    numel, k, n = 500, 60, 17
    indices = torch.randperm(numel, generator=gen)[:k].sort().values
    values = torch.randn(k, generator=gen)
    scores = torch.rand(numel, generator=gen)
    result = prune_regrow(
        indices,
        values,
        n,
        lambda remaining, count: (
            torch.arange(numel)[~torch.isin(torch.arange(numel), remaining)],
            scores[~torch.isin(torch.arange(numel), remaining)],
        ),
    )
    new = result.indices
    assert new.numel() == k and bool((new[1:] > new[:-1]).all())
    kept = result.source >= 0
    assert torch.equal(new[kept], indices[result.source[kept]])  # survivors keep their position
    pruned = indices[torch.topk(values.abs(), n, largest=False).indices]
    remaining = indices[~torch.isin(indices, pruned)]
    assert torch.isin(remaining, new).all()  # nothing outside the pruned set leaves
    outside = torch.arange(numel)[~torch.isin(torch.arange(numel), remaining)]
    expected_top = outside[torch.topk(scores[outside], n).indices]
    assert set(new.tolist()) == set(remaining.tolist()) | set(expected_top.tolist())
    assert result.regrown == int((~kept).sum()) == int((~torch.isin(expected_top, pruned)).sum())


def test_fewer_candidates_than_pruned_keeps_the_count():
    indices, values = torch.tensor([1, 2, 3, 4]), torch.tensor([0.1, 0.2, 0.3, 0.4])
    result = prune_regrow(indices, values, 3, _fixed_candidates([9], [1.0]))
    assert result.indices.tolist() == [2, 3, 4, 9]  # only the smallest |Δ| makes room for the one candidate


def test_top_outer_scores_matches_dense_outer_product(monkeypatch):
    monkeypatch.setattr(spiel, "SCORE_CHUNK", 17)  # several row chunks, one not full
    gen = torch.Generator().manual_seed(0)
    row, col = torch.rand(13, generator=gen), torch.rand(7, generator=gen)
    exclude = torch.randperm(91, generator=gen)[:30].sort().values
    dense = torch.outer(row, col).view(-1)
    dense[exclude] = -torch.inf
    expected = torch.topk(dense, 10)
    positions, scores = top_outer_scores(row, col, exclude, 10)
    assert set(positions.tolist()) == set(expected.indices.tolist())
    torch.testing.assert_close(scores.sort().values, expected.values.sort().values)
    assert top_outer_scores(row, col, torch.arange(91), 5)[0].numel() == 0  # nothing left to regrow


def test_schedule_counts_optimizer_steps():
    config = SparseConfig(
        density=0.1, reselection_steps=20, selection_accumulation_steps=5, initial_reselection_rate=0.2
    )
    assert [s for s in range(1, 46) if is_gathering_step(s, config)] == [16, 17, 18, 19, 20, 36, 37, 38, 39, 40]
    assert [s for s in range(1, 101) if is_reselection_step(s, config, 100)] == [20, 40, 60, 80]
    assert reselection_rate(25, config, 100) == pytest.approx(0.15)
    cosine = SparseConfig(density=0.1, reselection_schedule="cosine")
    assert reselection_rate(50, cosine, 100) == pytest.approx(0.1)
    assert reselection_rate(100, cosine, 100) == pytest.approx(0.0)


def test_gatherer_sums_gradients_at_first_batch_candidates():
    layer = SparseDeltaLinear(nn.Linear(4, 3).requires_grad_(False), torch.tensor([0, 5, 7]))
    gatherer = GradientGatherer(layer)
    g1 = torch.tensor([[0.1, -5.0, 0.2, 0.0], [3.0, 0.0, 0.0, 0.1], [0.0, 0.0, -4.0, 0.3]])
    g2 = torch.ones(3, 4)
    gatherer(g1)
    gatherer(g2)
    assert gatherer.candidates.tolist() == [1, 4, 10]  # top-3 |g1|
    assert gatherer.sums.tolist() == pytest.approx([-4.0, 4.0, -3.0])
    assert gatherer.active_sq == pytest.approx((0.1**2 + 0.0**2 + 0.1**2) + 3.0)  # positions 0, 5, 7
    assert gatherer.total_sq == pytest.approx(float(g1.square().sum() + g2.square().sum()))


def _record_gathering_steps(monkeypatch, opt) -> list[int]:
    """The optimizer step (1-based) of every GradientGatherer call, one entry per layer and micro-batch."""
    seen = []
    original = GradientGatherer.__call__
    monkeypatch.setattr(
        GradientGatherer,
        "__call__",
        lambda self, grad: (seen.append(opt.completed_steps + 1), original(self, grad))[1],
    )
    return seen


def test_dense_gradient_only_on_gathering_steps(tiny_model, monkeypatch):
    config = SparseConfig(density=0.05, regrow="ag", reselection_steps=4, selection_accumulation_steps=2)
    model = prepare_model(tiny_model, config)
    opt = SparseAdamW(model, lr=1e-2, total_steps=7)
    seen = _record_gathering_steps(monkeypatch, opt)
    train(model, opt, [torch.randint(0, 97, (2, 8))] * 7)
    assert sorted(set(seen)) == [3, 4]  # the round after step 8 is past the end, so steps 7-8 gather nothing
    assert all(layer.grad_collector is None for _, layer in iter_sparse_layers(model))


def test_gradient_accumulation_gives_the_same_ma_selection():
    from conftest import tiny_llama

    config = SparseConfig(density=0.05, regrow="ma", reselection_steps=3, selection_accumulation_steps=2)
    batches = [torch.randint(0, 97, (4, 8), generator=torch.Generator().manual_seed(s)) for s in range(4)]
    results = []
    for accumulation in (1, 2):
        model = prepare_model(tiny_llama(), config)
        opt = SM3(model, lr=1e-2, total_steps=10)
        train(model, opt, batches, accumulation)
        results.append([layer.indices.clone() for _, layer in iter_sparse_layers(model)])
    # Equal-length micro-batches: the summed gradient differs only by summation order, far below score gaps.
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_ag_gathers_every_micro_batch_of_gathering_steps(tiny_model, monkeypatch):
    config = SparseConfig(density=0.05, regrow="ag", reselection_steps=3, selection_accumulation_steps=2)
    model = prepare_model(tiny_model, config)
    opt = SparseAdamW(model, lr=1e-2, total_steps=10)
    seen = _record_gathering_steps(monkeypatch, opt)
    batches = [torch.randint(0, 97, (6, 8)) for _ in range(3)]
    train(model, opt, batches, accumulation=3)
    layers = len(list(iter_sparse_layers(model)))
    assert seen == [2] * 3 * layers + [3] * 3 * layers  # steps 2-3 gather, 3 micro-batches each, every layer


def test_round_keeps_survivors_values_and_moments(tiny_model):
    config = SparseConfig(density=0.05, regrow="ma", reselection_steps=100)
    model = prepare_model(tiny_model, config)
    opt = SM3(model, lr=1e-2, momentum=0.9, total_steps=1000)
    train(model, opt, [torch.randint(0, 97, (2, 8))] * 2)
    layers = dict(iter_sparse_layers(model))
    before = {
        k: (lay.indices.clone(), lay.values.detach().clone(), opt.state[lay.values]["momentum_buffer"].clone())
        for k, lay in layers.items()
    }
    metrics = opt.selector.reselect(0.3)
    regrown = 0
    for key, layer in layers.items():
        old_indices, old_values, old_momentum = before[key]
        assert layer.indices.numel() == old_indices.numel() and bool((layer.indices[1:] > layer.indices[:-1]).all())
        survivors = torch.isin(layer.indices, old_indices)
        slots = torch.searchsorted(old_indices, layer.indices[survivors])
        assert torch.equal(layer.values.detach()[survivors], old_values[slots])
        assert torch.equal(opt.state[layer.values]["momentum_buffer"][survivors], old_momentum[slots])
        assert (layer.values.detach()[~survivors] == 0).all()
        assert (opt.state[layer.values]["momentum_buffer"][~survivors] == 0).all()
        regrown += int((~survivors).sum())
    assert metrics["sparse/regrown"] == regrown > 0


def test_ma_needs_sm3():
    model = prepare_model(nn.Sequential(nn.Linear(4, 4)), SparseConfig(density=0.5, regrow="ma"))
    with pytest.raises(ValueError, match="regrow='ma'.*use optim='spiel_sm3'"):
        SparseAdamW(model)


def test_missing_total_steps_is_a_clear_error():
    model = prepare_model(nn.Sequential(nn.Linear(4, 4)), SparseConfig(density=0.5))
    opt = SM3(model)
    model(torch.randn(2, 4)).sum().backward()
    with pytest.raises(RuntimeError, match="pass `total_steps=`.*SparseCallback"):
        opt.step()
