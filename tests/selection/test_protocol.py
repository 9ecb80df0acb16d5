"""The selection contract (`selection.protocol`): a fourth method written only against it trains through the
optimizers and the Trainer callback; `set_total_steps` and `pop_metrics` of the built-in selectors."""

import copy

import pytest
import torch
from conftest import tiny_llama
from datasets import Dataset
from training_utils import train
from transformers import Trainer, TrainingArguments

from sparse_plugin import (
    SM3,
    SparseAdamW,
    SparseCallback,
    SparseConfig,
    config,
    iter_sparse_layers,
    model_card,
    prepare_model,
)
from sparse_plugin.selection import SELECTORS


class FirstPositionsSelector:
    """A minimal one-shot method, no `Selector` base: no update on step 1, then each matrix trains its first k
    flat positions. It touches the optimizer only through `SelectionHost`."""

    def __init__(self, model, config, host, total_steps=None):
        self.layers = list(iter_sparse_layers(model))
        self.host, self.total_steps, self.metrics = host, total_steps, {}
        host.set_selection_done(False)

    def updates_allowed(self):
        return self.host.selection_done

    def after_step(self):
        if not self.host.selection_done:
            for _, layer in self.layers:
                k = layer.indices.numel()
                layer.set_indices(torch.arange(k, dtype=layer.indices.dtype, device=layer.indices.device))
                self.host.reset_state(layer.values)
            self.host.set_selection_done(True)
            self.metrics = {"sparse/chosen_after": self.host.completed_steps}

    def prepare_next_step(self):
        pass  # no gradient statistics

    def set_total_steps(self, total_steps):
        self.total_steps = total_steps

    def pop_metrics(self):
        metrics, self.metrics = self.metrics, {}
        return metrics

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        assert state == {}


@pytest.fixture
def first_method(monkeypatch):
    """Register `method="first"` as a fourth method would be (docs/extending.md): a `SELECTORS` entry, a config
    choice, and its name, settings and citation for the adapter's model card."""
    monkeypatch.setitem(SELECTORS, "first", FirstPositionsSelector)
    monkeypatch.setattr(config, "SELECTION_METHODS", (*config.SELECTION_METHODS, "first"))
    monkeypatch.setitem(model_card._METHOD_NAMES, "first", "First-k")
    monkeypatch.setitem(model_card._METHOD_SETTINGS, "first", ())
    monkeypatch.setitem(model_card._CITATIONS, "first", ("A test method", "0000.00000", "@misc{first}"))
    return prepare_model(tiny_llama(), SparseConfig(method="first", density=0.05))


def _batches(n):
    return [torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(s)) for s in range(n)]


def test_a_selector_written_against_the_protocol_trains_through_the_optimizer(first_method):
    model = first_method
    opt = SparseAdamW(model, lr=1e-3)
    assert isinstance(opt.selector, FirstPositionsSelector)
    train(model, opt, _batches(1))
    layers = list(iter_sparse_layers(model))
    assert opt.selection_done and opt.selector.pop_metrics() == {"sparse/chosen_after": 1}
    assert opt.selector.pop_metrics() == {}
    for _, layer in layers:  # step 1 updated nothing; the choice then moved every layer
        assert torch.equal(layer.indices, torch.arange(layer.indices.numel(), dtype=layer.indices.dtype))
        assert bool((layer.values == 0).all())
    train(model, opt, _batches(2)[1:])
    for key, layer in layers:  # AdamW's first update of the fresh state: every chosen position moves, by at most lr
        assert bool((layer.values != 0).all()) and float(layer.values.detach().abs().max()) <= 1e-3 * (1 + 1e-5), key
        assert opt.state[layer.values]["exp_avg"].numel() == layer.indices.numel(), key
    twin = copy.deepcopy(model)
    resumed = SparseAdamW(twin, lr=1e-3)
    assert not resumed.selection_done
    resumed.load_state_dict(opt.state_dict())
    assert resumed.selection_done and resumed.selector.updates_allowed()  # saved with the state: no second choice


def test_a_selector_written_against_the_protocol_runs_under_the_trainer_callback(first_method, tmp_path):
    ids = torch.randint(3, 97, (12, 10), generator=torch.Generator().manual_seed(0)).tolist()
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        num_train_epochs=1,  # run length unknown to the optimizer's builder: the callback gives it
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        optim="spiel_adamw",
    )
    dataset = Dataset.from_dict({"input_ids": ids, "labels": ids})
    trainer = Trainer(model=first_method, args=args, train_dataset=dataset, callbacks=[SparseCallback()])
    trainer.train()
    assert trainer.optimizer.optimizer.selector.total_steps == 3  # set_total_steps from the callback
    logged = [entry.get("sparse/chosen_after") for entry in trainer.state.log_history if "loss" in entry]
    assert logged == [1, None, None]  # pop_metrics: the choice's metrics in the first log only


def test_explicit_sparse_config_wins_over_the_models():
    model = prepare_model(tiny_llama(), SparseConfig(density=0.05, regrow="ma"))
    other = SparseConfig(density=0.05, regrow="ag", reselection_steps=30)
    assert SM3(model, sparse_config=other).selector.config is other
    assert SM3(model).selector.config is model.sparse_config


def test_set_total_steps_prepares_the_coming_step_again():
    """SpIEL-AG gathers while the run length is unknown; learning that the run ends before the round stops it."""
    model = prepare_model(
        tiny_llama(), SparseConfig(density=0.05, regrow="ag", reselection_steps=1, selection_accumulation_steps=1)
    )
    opt = SparseAdamW(model, lr=1e-2)
    layers = [layer for _, layer in iter_sparse_layers(model)]
    assert all(layer.grad_collector is not None for layer in layers)
    opt.selector.set_total_steps(1)  # step 1 is the last: no round after it, nothing to gather for
    assert opt.selector.total_steps == 1 and all(layer.grad_collector is None for layer in layers)
    opt.selector.set_total_steps(5)
    assert all(layer.grad_collector is not None for layer in layers)


def test_pop_metrics_hands_out_a_rounds_metrics_once():
    model = prepare_model(tiny_llama(), SparseConfig(density=0.05, regrow="ma", reselection_steps=2))
    opt = SM3(model, lr=1e-2, total_steps=10)
    assert opt.selector.pop_metrics() == {}
    train(model, opt, _batches(1))
    assert opt.selector.pop_metrics() == {}  # no round after step 1
    train(model, opt, _batches(2)[1:])
    metrics = opt.selector.pop_metrics()
    assert set(metrics) == {"sparse/reselection_rate", "sparse/regrown"} and metrics["sparse/regrown"] > 0
    assert opt.selector.pop_metrics() == {}
