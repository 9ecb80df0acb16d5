"""Single-process parts of the FSDP support: the delta as its own module, gradient averaging hooks (identity in
one process), the base entries an adapter stores, and clear refusals where the base is sharded. The multi-process
runs are in tests/distributed/."""

import pytest
import torch
from conftest import tiny_llama
from torch import nn

from sparse_plugin import SparseConfig, iter_sparse_layers, prepare_model, read_adapter, save_adapter
from sparse_plugin.distributed import averages_delta_gradients, keep_deltas_replicated
from sparse_plugin.fsdp import gathered_base_values, is_fsdp_wrapped, is_whole
from sparse_plugin.layer import SparseDelta


def _prepared():
    return prepare_model(tiny_llama(), SparseConfig(density=0.05))


def test_the_delta_is_a_module_fsdp_can_ignore_without_the_base():
    model = _prepared()
    _, layer = next(iter_sparse_layers(model))
    assert isinstance(layer.delta, SparseDelta)
    assert [name for name, _ in layer.delta.named_parameters()] == ["values"]
    assert [name for name, _ in layer.delta.named_buffers()] == ["indices"]
    assert layer.values is layer.delta.values and layer.indices is layer.delta.indices


def test_keep_deltas_replicated_is_idempotent_and_changes_nothing_in_one_process():
    model = _prepared()
    deltas = keep_deltas_replicated(model)
    averagers = [d._gradient_averager for d in deltas]
    assert keep_deltas_replicated(model) == deltas and [d._gradient_averager for d in deltas] == averagers
    assert averages_delta_gradients(deltas) and not averages_delta_gradients(
        [layer.delta for _, layer in iter_sparse_layers(_prepared())]
    )
    ids = torch.randint(3, 97, (2, 9))
    model(input_ids=ids, labels=ids).loss.backward()
    twin = _prepared()
    twin(input_ids=ids, labels=ids).loss.backward()
    for (_, a), (_, b) in zip(iter_sparse_layers(model), iter_sparse_layers(twin)):
        assert torch.equal(a.values.grad, b.values.grad)


def test_unwrapped_model_gathers_its_own_base_entries():
    model = _prepared()
    assert not is_fsdp_wrapped(model)
    gathered = gathered_base_values(model)
    for key, layer in iter_sparse_layers(model):
        assert torch.equal(gathered[key], layer.base_layer.weight.detach().view(-1)[layer.indices])


def test_saving_over_a_sharded_base_asks_for_gathered_entries_and_writes_nothing(tmp_path):
    model = _prepared()
    key, layer = next(iter_sparse_layers(model))
    shard = layer.base_layer.weight.detach().view(-1)[:100].clone()  # what FSDP1 leaves outside forward
    layer.base_layer.weight = nn.Parameter(shard, requires_grad=False)
    assert not is_whole(layer.base_layer.weight, layer.shape)
    with pytest.raises(ValueError, match=f"the base weight of `{key}` is sharded \\(FSDP\\): .*gathered_base_values"):
        save_adapter(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_gathered_entries_are_stored_and_must_cover_every_target(tmp_path):
    model = _prepared()
    gathered = gathered_base_values(model)
    marked = {key: value + 1 for key, value in gathered.items()}  # shows which source the file took
    save_adapter(model, tmp_path / "adapter", base_values=marked)
    adapter = read_adapter(tmp_path / "adapter")
    assert all(torch.equal(adapter.targets[key].base_values, marked[key]) for key in marked)
    first = next(iter(gathered))
    with pytest.raises(ValueError, match=f"`base_values` lacks `{first}` \\(1 target\\(s\\) missing\\)"):
        save_adapter(model, tmp_path / "other", base_values={k: v for k, v in gathered.items() if k != first})
    assert not (tmp_path / "other").exists()


def test_fsdp1_wrapper_segments_are_not_part_of_adapter_keys():
    model = _prepared()
    keys = [key for key, _ in iter_sparse_layers(model)]
    holder = nn.Module()
    holder._fsdp_wrapped_module = model  # how FSDP1 nests the modules it wraps
    assert [key for key, _ in iter_sparse_layers(holder)] == keys
