"""Numerical guards: a non-finite gradient moves nothing (values, optimizer state, indices, statistics)."""

import copy

import pytest
import torch
from conftest import tiny_llama
from torch import nn

from sparse_plugin import SM3, SparseConfig, iter_sparse_layers, prepare_model
from sparse_plugin.layer import SparseDeltaLinear
from sparse_plugin.selection.sift import PoolGatherer
from sparse_plugin.selection.spiel import GradientGatherer


def _backward(model, ids):
    model(ids, labels=ids).loss.backward()


def _snapshot(model, opt):
    layers = [(layer.indices.clone(), layer.values.detach().clone()) for _, layer in iter_sparse_layers(model)]
    return layers, copy.deepcopy(opt.state_dict())


def test_non_finite_gradient_skips_the_update_and_the_round_due():
    model = prepare_model(tiny_llama(), SparseConfig(density=0.05, regrow="ma", reselection_steps=2))
    opt = SM3(model, lr=1e-2, total_steps=10)
    ids = torch.randint(0, 97, (2, 8))
    _backward(model, ids)
    opt.step()
    opt.zero_grad()
    before = _snapshot(model, opt)
    _backward(model, ids)
    next(iter_sparse_layers(model))[1].values.grad[0] = float("nan")
    with pytest.warns(
        RuntimeWarning, match="non-finite gradient at step 2; this update and any selection due now are skipped"
    ):
        opt.step()  # step 2 is a reselection step
    opt.zero_grad()
    after = _snapshot(model, opt)
    for (i0, v0), (i1, v1) in zip(before[0], after[0]):
        assert torch.equal(i0, i1) and torch.equal(v0, v1)
    for key, state in before[1]["state"].items():
        for name, tensor in state.items():
            assert torch.equal(tensor, after[1]["state"][key][name]), name
    assert opt.completed_steps == 2 and opt.selector.last_round == {}
    for _ in range(2):  # training goes on; the next round (step 4) happens
        _backward(model, ids)
        opt.step()
        opt.zero_grad()
    assert opt.selector.last_round["sparse/regrown"] > 0
    assert all(bool(torch.isfinite(layer.values).all()) for _, layer in iter_sparse_layers(model))


@pytest.mark.parametrize(
    "make", [GradientGatherer, lambda layer: PoolGatherer(layer, selection_steps=1)], ids=["ag", "sift"]
)
def test_non_finite_dense_gradient_stays_out_of_the_statistics(make):
    layer = SparseDeltaLinear(nn.Linear(6, 4).requires_grad_(False), torch.tensor([1, 7, 20]))
    collector = make(layer)
    layer.grad_collector = collector
    x = torch.randn(3, 6)
    x[0, 2] = float("inf")
    layer(x).sum().backward()
    assert not bool(torch.isfinite(layer.values.grad).all())  # the optimizer will see it and skip the step
    assert collector.state_dict() == make(layer).state_dict()  # nothing gathered
    assert layer.indices.tolist() == [1, 7, 20]
