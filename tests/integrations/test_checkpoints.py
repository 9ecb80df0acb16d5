"""Trainer checkpoints hold the adapter, not the model; resuming loads it, and refuses another sparse configuration.

The SIGKILL-and-resume runs for every method are in tests/reliability/; these run in process."""

import pytest
import torch
from conftest import tiny_llama
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from sparse_plugin import SparseCallback, SparseConfig, iter_sparse_layers, load_adapter, prepare_model, read_adapter
from sparse_plugin.io import CONFIG_NAME, WEIGHTS_NAME, AdapterError
from sparse_plugin.model_card import CARD_NAME

TRAINER_STATE = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin"}
BASE = {"density": 0.05, "reselection_steps": 2, "selection_accumulation_steps": 1}


def _trainer(directory, config=None, callback=None, model=None, **overrides):
    model = model if model is not None else prepare_model(tiny_llama(), SparseConfig(**(config or BASE)))
    ids = torch.randint(3, 97, (24, 12), generator=torch.Generator().manual_seed(0)).tolist()
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    args = {
        "output_dir": str(directory),
        "per_device_train_batch_size": 4,
        "max_steps": 4,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": 2,
        "report_to": [],
        "use_cpu": True,
        "seed": 0,
        "data_seed": 0,
        "disable_tqdm": True,
        "optim": "spiel_sm3",
    }
    return Trainer(
        model=model,
        args=TrainingArguments(**(args | overrides)),
        train_dataset=data,
        eval_dataset=data,
        callbacks=[callback or SparseCallback()],
    )


def _losses(trainer):
    return {row["step"]: row["loss"] for row in trainer.state.log_history if "loss" in row}


def _layers(model):
    return {key: (layer.indices.clone(), layer.values.detach().clone()) for key, layer in iter_sparse_layers(model)}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """checkpoint-2 of a SpIEL-MA run, and that run's losses."""
    directory = tmp_path_factory.mktemp("run")
    trainer = _trainer(directory)
    trainer.train()
    return directory / "checkpoint-2", _losses(trainer)


def test_checkpoints_and_save_model_hold_the_adapter_and_trainer_state_only(tmp_path, checkpoint):
    path, _ = checkpoint
    assert {p.name for p in path.iterdir()} == {CONFIG_NAME, WEIGHTS_NAME, CARD_NAME} | TRAINER_STATE
    trainer = _trainer(tmp_path, max_steps=1, save_strategy="no")
    trainer.train()
    trainer.save_model(tmp_path / "saved")
    assert {p.name for p in (tmp_path / "saved").iterdir()} == {
        CONFIG_NAME,
        WEIGHTS_NAME,
        CARD_NAME,
        "training_args.bin",
    }
    assert all(
        torch.equal(read_adapter(tmp_path / "saved").targets[key].values, values)
        for key, (_, values) in _layers(trainer.model).items()
    )


def test_full_checkpoints_on_request_keep_the_model_beside_the_adapter_and_resume_exactly(tmp_path):
    full = _trainer(tmp_path / "a", callback=SparseCallback(save_full_checkpoints=True))
    full.train()
    files = {p.name for p in (tmp_path / "a" / "checkpoint-2").iterdir()}
    assert {"model.safetensors", CONFIG_NAME, WEIGHTS_NAME} | TRAINER_STATE <= files
    resumed = _trainer(tmp_path / "b", callback=SparseCallback(save_full_checkpoints=True))
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert _losses(resumed)[3] == _losses(full)[3]
    assert all(torch.equal(a[1], b[1]) for a, b in zip(_layers(full.model).values(), _layers(resumed.model).values()))


def test_save_full_checkpoints_must_be_a_bool():
    with pytest.raises(TypeError, match="`save_full_checkpoints` must be true or false, got 'yes'"):
        SparseCallback(save_full_checkpoints="yes")


# Each row changes one thing the checkpoint's indices, values or statistics depend on; the error names each field
# that differs, with both values.
CHANGES = [
    ({"density": 0.1}, ["`density` 0.05 in the checkpoint, 0.1 now"]),
    (
        {"target_modules": ["q_proj", "v_proj"]},
        ["`target_modules` 'all-linear' in the checkpoint, ['q_proj', 'v_proj'] now"],
    ),
    (
        {"density": None, "num_params": 2000},
        ["`density` 0.05 in the checkpoint, None now", "`num_params` None in the checkpoint, 2000 now"],
    ),
    (
        {"method": "smt", "block_size": 16, "target_modules": "all-linear"},
        ["`method` 'spiel' in the checkpoint, 'smt' now", "`block_size` 256 in the checkpoint, 16 now"],
    ),
    ({"regrow": "ag"}, ["`regrow` 'ma' in the checkpoint, 'ag' now"]),
    ({"values_dtype": "bfloat16"}, ["`values_dtype` 'float32' in the checkpoint, 'bfloat16' now"]),
    ({"seed": 1}, ["`seed` 0 in the checkpoint, 1 now"]),
    ({"reselection_steps": 3}, ["`reselection_steps` 2 in the checkpoint, 3 now"]),
]


@pytest.mark.parametrize("change, named", CHANGES, ids=lambda v: "-".join(v) if isinstance(v, dict) else None)
def test_resume_with_another_sparse_configuration_is_refused_naming_each_field(tmp_path, checkpoint, change, named):
    path, _ = checkpoint
    config = {k: v for k, v in (BASE | change).items() if v is not None}
    trainer = _trainer(tmp_path, config=config)
    before = _layers(trainer.model)
    with pytest.raises(AdapterError) as caught:
        trainer.train(resume_from_checkpoint=str(path))
    message = str(caught.value)
    assert "\n" not in message and f"cannot resume from {path}: its sparse configuration differs" in message
    assert message.count(" in the checkpoint, ") == len(named) and all(text in message for text in named)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(before.values(), _layers(trainer.model).values()))


def test_resume_from_a_full_checkpoint_with_another_density_is_refused_too(tmp_path):
    _trainer(tmp_path / "a", callback=SparseCallback(save_full_checkpoints=True), max_steps=2).train()
    trainer = _trainer(tmp_path / "b", config=BASE | {"density": 0.1})
    with pytest.raises(AdapterError, match="`density` 0.05 in the checkpoint, 0.1 now"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))


def test_resume_may_change_the_forward_strategy_and_the_saved_adapter_records_it(tmp_path, checkpoint):
    path, losses = checkpoint
    trainer = _trainer(tmp_path, config=BASE | {"forward_strategy": "additive"}, max_steps=3)
    trainer.train(resume_from_checkpoint=str(path))
    assert read_adapter(tmp_path / "checkpoint-3").config.forward_strategy == "additive"
    assert _losses(trainer)[3] == pytest.approx(losses[3], rel=1e-5)  # the same step, computed another way


def test_resume_onto_another_base_is_refused(tmp_path, checkpoint):
    path, _ = checkpoint
    trainer = _trainer(tmp_path, model=prepare_model(tiny_llama(seed=1), SparseConfig(**BASE)))
    with pytest.raises(AdapterError, match="differs from the base the adapter was trained on"):
        trainer.train(resume_from_checkpoint=str(path))


def test_load_best_model_at_end_loads_the_best_checkpoints_adapter(tmp_path):
    # greater_is_better=True on the eval loss picks the worst checkpoint, the first: not what the model holds
    # after the last step, so the test sees whether it was loaded.
    trainer = _trainer(
        tmp_path,
        max_steps=6,
        eval_strategy="steps",
        eval_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        greater_is_better=True,
    )
    trainer.train()
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-2")
    best = load_adapter(prepare_model(tiny_llama(), SparseConfig(**BASE)), tmp_path / "checkpoint-2")
    last = read_adapter(tmp_path / "checkpoint-6")
    layers = _layers(trainer.model)
    assert any(not torch.equal(last.targets[key].values, values) for key, (_, values) in layers.items())
    assert all(torch.equal(a[1], b[1]) for a, b in zip(_layers(best).values(), layers.values()))
