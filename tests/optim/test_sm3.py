"""SM3 over sparse deltas against a plain per-position reference, and its state-dict round trip."""

import copy

import pytest
import torch
from torch import nn

from sparse_plugin import SM3, SparseConfig, prepare_model
from sparse_plugin.layer import SparseDeltaLinear


def _layer(out_f=6, in_f=5, positions=(0, 3, 4, 7, 12, 13, 21, 29), seed=0):
    torch.manual_seed(seed)
    layer = SparseDeltaLinear(nn.Linear(in_f, out_f).requires_grad_(False), torch.tensor(positions))
    return layer


def _reference_sm3(values, grads, positions, shape, lr, momentum=0.0, beta=0.0, eps=1e-30, weight_decay=0.0):
    """SM3 written position by position, straight from the paper's update (arXiv:1901.11150); returns values
    after each step."""
    out_f, in_f = shape
    r, c = [0.0] * out_f, [0.0] * in_f
    m = [0.0] * len(positions)
    values = list(values)
    history = []
    for g in grads:
        nu = []
        for p, pos in enumerate(positions):
            i, j = divmod(pos, in_f)
            base = min(r[i], c[j])
            nu.append(beta * base + (1 - beta) * g[p] ** 2 if beta > 0 else base + g[p] ** 2)
        for pos in positions:  # rows/columns with trained positions take the max of their ν
            i, j = divmod(pos, in_f)
            r[i] = max(nu[q] for q, other in enumerate(positions) if other // in_f == i)
            c[j] = max(nu[q] for q, other in enumerate(positions) if other % in_f == j)
        for p in range(len(positions)):
            corrected = nu[p] / (1 - beta ** (len(history) + 1)) if beta > 0 else nu[p]  # bias-corrected EMA
            u = g[p] / (corrected + eps) ** 0.5
            if momentum > 0:
                m[p] = momentum * m[p] + (1 - momentum) * u
                u = m[p]
            values[p] = values[p] * (1 - lr * weight_decay) - lr * u
        history.append(list(values))
    return history, r, c


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"momentum": 0.9},
        {"beta": 0.9},
        {"weight_decay": 0.1},
        {"momentum": 0.5, "beta": 0.5, "weight_decay": 0.01},
    ],
)
def test_sm3_matches_position_by_position_reference(kwargs):
    layer = _layer()
    positions = layer.indices.tolist()
    with torch.no_grad():
        layer.values.copy_(torch.linspace(-0.3, 0.3, len(positions)))
    start = layer.values.detach().double().tolist()
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(len(positions), generator=gen) for _ in range(4)]
    opt = SM3([layer.values], lr=0.1, model=layer, **kwargs)
    for g in grads:
        layer.values.grad = g.clone()
        opt.step()
    history, r, c = _reference_sm3(start, [g.double().tolist() for g in grads], positions, (6, 5), lr=0.1, **kwargs)
    torch.testing.assert_close(
        layer.values.detach().double(), torch.tensor(history[-1], dtype=torch.float64), atol=1e-6, rtol=1e-5
    )
    row, col = opt.row_col_accumulators(layer.values)
    torch.testing.assert_close(row.double(), torch.tensor(r, dtype=torch.float64), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(col.double(), torch.tensor(c, dtype=torch.float64), atol=1e-6, rtol=1e-5)


def test_state_is_o_of_rows_plus_columns():
    layer = _layer(out_f=40, in_f=30, positions=tuple(range(0, 1200, 7)))
    opt = SM3(layer, lr=0.1)
    layer.values.grad = torch.randn(layer.values.numel())
    opt.step()
    state = opt.state[layer.values]
    assert sorted(state) == ["col_acc", "row_acc", "step"]
    assert state["row_acc"].numel() + state["col_acc"].numel() == 70


def test_bf16_values_are_updated_in_fp32_and_copied_back():
    layer = SparseDeltaLinear(
        nn.Linear(5, 6).requires_grad_(False), torch.tensor([1, 2, 3]), values_dtype=torch.bfloat16
    )
    opt = SM3(layer, lr=0.1)
    layer.values.grad = torch.tensor([1.0, -2.0, 0.5], dtype=torch.bfloat16)
    opt.step()
    assert layer.values.dtype == torch.bfloat16
    torch.testing.assert_close(layer.values.float(), torch.tensor([-0.1, 0.1, -0.1]), atol=1e-3, rtol=0)


def test_state_dict_round_trip_continues_identically(tiny_model):

    config = SparseConfig(density=0.05, reselection_steps=3, selection_accumulation_steps=1)
    model = prepare_model(tiny_model, config)
    twin = copy.deepcopy(model)
    opt = SM3(model, lr=1e-2, momentum=0.9, total_steps=20)
    ids = torch.randint(0, 97, (2, 10))
    for _ in range(4):  # crosses a regrow at step 3
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    twin.load_state_dict(model.state_dict())
    fresh = SM3(twin, lr=1e-2, momentum=0.9, total_steps=20)
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
    for _ in range(3):  # crosses the next regrow at step 6
        for m, o in ((model, opt), (twin, fresh)):
            m(ids, labels=ids).loss.backward()
            o.step()
            o.zero_grad()
    for (name, a), (_, b) in zip(model.named_buffers(), twin.named_buffers()):
        assert torch.equal(a, b), name
    for (name, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lr": -1}, "`lr` must be >= 0"),
        ({"momentum": 1.0}, "`momentum` must be \\[0, 1\\)"),
        ({"beta": -0.1}, "`beta`"),
    ],
)
def test_invalid_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SM3(_layer(), **kwargs)


def test_plain_parameters_and_unprepared_models_are_refused():
    with pytest.raises(ValueError, match="SM3 here trains sparse deltas only"):
        SM3([nn.Parameter(torch.zeros(3))], model=_layer())
    with pytest.raises(ValueError, match="call `sparse_plugin.prepare_model"):
        SM3(nn.Linear(3, 3))


def _scatter_sm3_accumulators(row, col, rows, cols, grads):
    """The former update of r and c: gathers at int64 row/column ids and two `scatter_reduce` amax."""
    row, col = row.clone(), col.clone()
    for g in grads:
        nu = torch.minimum(row[rows], col[cols]).addcmul_(g, g)
        row.scatter_reduce_(0, rows, nu, "amax", include_self=False)
        col.scatter_reduce_(0, cols, nu, "amax", include_self=False)
    return row, col


@pytest.mark.parametrize("out_f, in_f, density", [(1, 1, 1.0), (7, 13, 0.1), (48, 80, 0.02), (31, 97, 0.3)])
def test_segment_reduced_row_maxima_equal_the_scatter_reduce_result(out_f, in_f, density):
    """Rows are segments of the sorted positions; rows without positions (many at 2%) keep their accumulator."""
    from sparse_plugin.model import random_indices

    count = max(1, int(out_f * in_f * density))
    positions = random_indices(out_f * in_f, count, torch.Generator().manual_seed(out_f))
    layer = SparseDeltaLinear(nn.Linear(in_f, out_f).requires_grad_(False), positions)
    assert layer.indices.dtype == torch.int32
    opt = SM3(layer, lr=0.01)
    gen = torch.Generator().manual_seed(2)
    grads = [torch.randn(count, generator=gen) for _ in range(5)]
    for g in grads:
        layer.values.grad = g.clone()
        opt.step()
    rows, cols = positions // in_f, positions % in_f
    zeros = torch.zeros(out_f), torch.zeros(in_f)
    expected_row, expected_col = _scatter_sm3_accumulators(*zeros, rows, cols, grads)
    row, col = opt.row_col_accumulators(layer.values)
    assert torch.equal(row, expected_row) and torch.equal(col, expected_col)
