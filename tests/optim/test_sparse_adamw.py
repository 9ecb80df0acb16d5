"""SparseAdamW against torch.optim.AdamW, masked dense parameters, state remapping and round trip."""

import copy

import pytest
import torch
from torch import nn

from sparse_plugin import SparseAdamW, SparseConfig, prepare_model
from sparse_plugin.layer import SparseDeltaLinear
from sparse_plugin.optim.sparse_adamw import age_cap


def _grads(n, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=gen) for _ in range(steps)]


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_equals_torch_adamw_when_indices_do_not_change(weight_decay):
    layer = SparseDeltaLinear(nn.Linear(7, 5).requires_grad_(False), torch.tensor([0, 4, 9, 20, 33]))
    with torch.no_grad():
        layer.values.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0, 0.5]))
    reference = nn.Parameter(layer.values.detach().clone())
    ours = SparseAdamW(layer, lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=weight_decay)
    torch_opt = torch.optim.AdamW([reference], lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=weight_decay)
    for g in _grads(5, 6):
        layer.values.grad, reference.grad = g.clone(), g.clone()
        ours.step()
        torch_opt.step()
    # Same formulas in fp32; the bias correction is computed per position rather than per tensor.
    torch.testing.assert_close(layer.values.detach(), reference.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours.state[layer.values]["exp_avg"], torch_opt.state[reference]["exp_avg"])


@pytest.mark.parametrize("as_indices", [False, True])
def test_masked_dense_parameter_moves_only_masked_entries(as_indices):
    weight = nn.Parameter(torch.randn(4, 6))
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[0, 1] = mask[2, 5] = mask[3, 0] = True
    before = weight.detach().clone()
    sub = nn.Parameter(before[mask].clone())
    opt = SparseAdamW(
        [{"params": [weight], "mask": mask.view(-1).nonzero().squeeze(1) if as_indices else mask}], lr=0.1
    )
    torch_opt = torch.optim.AdamW([sub], lr=0.1, weight_decay=0.0)
    for g in _grads(24, 3):
        weight.grad = g.view(4, 6).clone()
        sub.grad = g.view(4, 6)[mask].clone()
        opt.step()
        torch_opt.step()
    assert torch.equal(weight.detach()[~mask], before[~mask])
    # lr 0.1 steps; torch orders the bias-correction arithmetic differently: a few fp32 ulps of 0.1.
    torch.testing.assert_close(weight.detach()[mask], sub.detach(), atol=1e-5, rtol=1e-5)
    assert opt.state[weight]["exp_avg"].numel() == 3  # state for the masked entries only


@pytest.mark.parametrize(
    "mask, match",
    [
        (torch.zeros(3, 3, dtype=torch.bool), "shape"),
        (torch.tensor([0, 99]), "indices must lie"),
        (torch.tensor([0.5]), "must be a bool"),
    ],
)
def test_bad_masks_are_refused(mask, match):
    with pytest.raises(ValueError, match=match):
        SparseAdamW([{"params": [nn.Parameter(torch.zeros(4, 6))], "mask": mask}])


def test_remap_keeps_survivors_and_zeroes_new_positions():
    layer = SparseDeltaLinear(nn.Linear(7, 5).requires_grad_(False), torch.tensor([0, 4, 9, 20]))
    opt = SparseAdamW(layer, lr=1e-2)
    for g in _grads(4, 2):
        layer.values.grad = g
        opt.step()
    state = {k: v.clone() for k, v in opt.state[layer.values].items()}
    opt.remap_state(layer.values, torch.tensor([1, -1, 3, 0]))
    for key in ("exp_avg", "exp_avg_sq", "age"):
        new = opt.state[layer.values][key]
        assert torch.equal(new[[0, 2, 3]], state[key][[1, 3, 0]]) and new[1] == 0


def test_regrown_position_gets_fresh_bias_correction():
    layer = SparseDeltaLinear(nn.Linear(3, 2).requires_grad_(False), torch.tensor([0, 1]))
    opt = SparseAdamW(layer, lr=0.1)
    for _ in range(5):
        layer.values.grad = torch.ones(2)
        opt.step()
    opt.remap_state(layer.values, torch.tensor([0, -1]))
    with torch.no_grad():
        layer.values[1] = 0.0
    layer.values.grad = torch.ones(2)
    opt.step()
    # A first Adam step with bias correction moves by lr·g/|g| = lr exactly, whatever the global step.
    torch.testing.assert_close(layer.values[1].detach(), torch.tensor(-0.1), atol=1e-6, rtol=0)


def test_ramp_shortens_only_a_regrown_positions_first_steps():
    layer = SparseDeltaLinear(nn.Linear(3, 2).requires_grad_(False), torch.tensor([0, 1, 4]))
    opt = SparseAdamW(layer, lr=0.1, regrown_start="ramp")
    for _ in range(3):
        layer.values.grad = torch.ones(3)
        opt.step()
    # Static positions (all of the oldest age) are not ramped: three full Adam steps of lr on a constant gradient.
    torch.testing.assert_close(layer.values.detach(), torch.full((3,), -0.3), atol=1e-5, rtol=0)
    opt.remap_state(layer.values, torch.tensor([0, -1, 2]))
    with torch.no_grad():
        layer.values[1] = 0.0
    for expected in (-0.01, -0.03):  # ages 1 and 2: 0.1 and 0.2 of a full (bias-corrected, lr-sized) step
        layer.values.grad = torch.ones(3)
        opt.step()
        torch.testing.assert_close(layer.values[1].detach(), torch.tensor(expected), atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.values[0].detach(), torch.tensor(-0.5), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="regrown_start"):
        SparseAdamW(layer, regrown_start="hot")


def test_state_dict_round_trip_through_a_regrow(tiny_model):
    config = SparseConfig(density=0.05, regrow="ag", reselection_steps=3, selection_accumulation_steps=2)
    model = prepare_model(tiny_model, config)
    twin = copy.deepcopy(model)
    opt = SparseAdamW(model, lr=1e-2, total_steps=30)
    ids = torch.randint(0, 97, (2, 10))

    def train(m, o, steps):
        for _ in range(steps):
            m(ids, labels=ids).loss.backward()
            o.step()
            o.zero_grad()

    train(model, opt, 4)
    twin.load_state_dict(model.state_dict())
    fresh = SparseAdamW(twin, lr=1e-2, total_steps=30)
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert fresh.completed_steps == 4
    train(model, opt, 3)
    train(twin, fresh, 3)
    for (name, a), (_, b) in zip(
        list(model.named_parameters()) + list(model.named_buffers()),
        list(twin.named_parameters()) + list(twin.named_buffers()),
    ):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("betas, dtype", [((0.9, 0.999), torch.int16), ((0.9, 0.99999), torch.int32)])
def test_ages_are_narrow_and_stop_where_the_bias_correction_is_exactly_one(betas, dtype):
    layer = SparseDeltaLinear(nn.Linear(3, 2).requires_grad_(False), torch.tensor([0, 1, 4]))
    opt = SparseAdamW(layer, lr=1e-3, betas=betas)
    layer.values.grad = torch.ones(3)
    opt.step()
    state = opt.state[layer.values]
    assert state["age"].dtype == dtype
    cap = age_cap(betas)
    assert all(1 - torch.tensor(b) ** torch.tensor(float(cap)) == 1 for b in betas)  # fp32: exactly 1 from here
    assert 1 - torch.tensor(betas[1]) ** torch.tensor(float(int(0.9 * cap))) < 1  # and not long before
    # Past the cap the step equals the fp32-aged reference (age cap + 5 counted in float).
    state["age"].fill_(cap)
    before = {k: v.clone() for k, v in state.items()}
    values = layer.values.detach().clone()
    opt.step()
    m = before["exp_avg"].lerp(torch.ones(3), 1 - betas[0])
    v = before["exp_avg_sq"] * betas[1] + (1 - betas[1])
    age = torch.full((3,), cap + 5.0)
    expected = values - 1e-3 * (m / (1 - betas[0] ** age)) / ((v / (1 - betas[1] ** age)).sqrt() + 1e-8)
    assert torch.equal(layer.values.detach(), expected)
    assert torch.equal(state["age"], torch.full((3,), cap, dtype=dtype))
