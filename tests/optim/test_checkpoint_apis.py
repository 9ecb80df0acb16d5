"""The optimizers' state dicts through torch.distributed.checkpoint's optimizer APIs (what FSDP checkpoints use):
no zero-gradient step that would advance the schedule, and the selection statistics kept per parameter."""

import torch
from conftest import tiny_llama
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from sparse_plugin import SparseAdamW, SparseConfig, iter_sparse_layers, prepare_model

SMT = SparseConfig(method="smt", density=0.2, block_size=16, warmup_steps=3, target_modules="all-linear")


def _smt():
    model = prepare_model(tiny_llama(), SMT)
    return model, SparseAdamW(model, lr=1e-2, total_steps=8)


def _step(model, opt, seed):
    ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(seed))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()


def test_every_parameter_has_zeroed_state_before_its_first_update():
    model, opt = _smt()
    assert set(opt.state) == {layer.values for _, layer in iter_sparse_layers(model)}
    for _, layer in iter_sparse_layers(model):
        state = opt.state[layer.values]
        assert set(state) == {"exp_avg", "exp_avg_sq", "age"}
        assert all(t.shape == layer.values.shape and not t.count_nonzero() for t in state.values())


def test_checkpoint_round_trip_in_the_warm_up_keeps_the_schedule_and_block_statistics():
    model, opt = _smt()
    _step(model, opt, 0)  # one of three warm-up steps: no update, block statistics gathered
    saved = get_optimizer_state_dict(model, opt)
    assert opt.completed_steps == 1  # no zero-gradient step() was run to create state
    assert "selection" not in saved
    stored = [k for entry in saved["state"].values() for k in entry if k.startswith("selection.")]
    assert "selection.sums" in stored

    twin, twin_opt = _smt()
    set_optimizer_state_dict(twin, twin_opt, saved)
    assert twin_opt.completed_steps == 1
    for key, collector in opt.selector.collectors.items():
        assert torch.equal(twin_opt.selector.collectors[key].sums, collector.sums), key
    for seed in (1, 2, 3):  # through the choice of blocks: both choose and train alike
        _step(model, opt, seed)
        _step(twin, twin_opt, seed)
    for (key, a), (_, b) in zip(iter_sparse_layers(model), iter_sparse_layers(twin)):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.values, b.values), key
    assert any(layer.values.count_nonzero() for _, layer in iter_sparse_layers(twin))
