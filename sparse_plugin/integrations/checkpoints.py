"""Trainer checkpoints that hold the adapter instead of a copy of the frozen base, and an exact resume from them.

The Trainer writes every `checkpoint-N` through `model.save_pretrained` (`Trainer._save`, also Axolotl's) and
reloads it in `Trainer._load_from_checkpoint`, which knows only full weights and PEFT adapters. So:

- `save_adapter_instead_of_model` gives a prepared model a `save_pretrained` that writes the adapter, as a
  PEFT model's does; `SparseCallback` installs it when the Trainer is built (unless `save_full_checkpoints=True`),
  so checkpoints, `trainer.save_model()` and Axolotl's final and Ctrl-C saves all write the adapter.
- `install_checkpoint_hooks` (run when `transformers.trainer` is imported, see `hf_registry`) wraps four Trainer
  methods. Loading: a checkpoint
  with an adapter and no model weights is loaded with `load_adapter` (resume and `load_best_model_at_end`), and
  any checkpoint's sparse configuration must match the running one. Under FSDP, where the Trainer saves the
  model itself (a full-state-dict gather in `save_model`, `save_fsdp_model` beside the optimizer), every rank
  gathers the stored base entries and rank 0 writes the adapter instead. Models without sparse layers, and
  full checkpoints, take the Trainer's own path.
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path

import torch

from ..config import SparseConfig
from ..fsdp import is_fsdp_wrapped
from ..io import CONFIG_NAME, AdapterError, load_adapter, quote, read_adapter, save_adapter
from ..model import iter_sparse_layers

# Fields that change how a step is computed or what a saved adapter stores, not what is trained: a resume may
# change them, and the adapters saved afterwards record the new value, which is then the truth. Any other change
# (budget, targets, method, selection schedule, dtype, seed) would leave the checkpoint's indices, values and
# selection statistics describing another run than the one its adapter would claim.
RESUMABLE_CHANGES = ("forward_strategy", "store_base_values")
# What a checkpoint holding the model's own weights contains (transformers' file names, FSDP's folder prefix).
_MODEL_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_FSDP_MODEL_PREFIX = "pytorch_model_fsdp"
TRAINING_ARGS_NAME = "training_args.bin"


def save_adapter_instead_of_model(model) -> None:
    """Make `model.save_pretrained(directory, ...)` write the sparse adapter and nothing else (no copy of the base).

    The Trainer and Axolotl save through this method with extra keyword arguments (`state_dict`,
    `safe_serialization`, ...) that have no meaning for an adapter; only `is_main_process` is honoured.
    """

    def save_pretrained(save_directory, *args, is_main_process: bool = True, **kwargs) -> None:
        if is_main_process:
            save_adapter(model, save_directory)

    model.save_pretrained = save_pretrained


def config_differences(saved: SparseConfig, running: SparseConfig) -> list[str]:
    """`field` saved-value vs running-value for every field that may not change on resume."""
    theirs, ours = saved.to_dict(), running.to_dict()
    return [
        f"`{name}` {quote(theirs[name])} in the checkpoint, {quote(ours[name])} now"
        for name in ours
        if name not in RESUMABLE_CHANGES and theirs.get(name) != ours[name]
    ]


def check_resume_config(checkpoint: str | os.PathLike, running: SparseConfig) -> None:
    """Refuse, in one line naming each differing field with both values, to resume a run whose sparse
    configuration differs from the checkpoint's."""
    differences = config_differences(read_adapter(checkpoint).config, running)
    if differences:
        raise AdapterError(
            f"cannot resume from {checkpoint}: its sparse configuration differs from this run's ({'; '.join(differences)}); "
            "resume with the checkpoint's settings, or start a new run (`load_adapter` takes its adapter as a start)"
        )


def holds_model_weights(checkpoint: str | os.PathLike) -> bool:
    """Whether a checkpoint has the model's own weights (written with `save_full_checkpoints=True`)."""
    path = Path(checkpoint)
    return any((path / name).exists() for name in _MODEL_FILES) or any(path.glob(_FSDP_MODEL_PREFIX + "*"))


def load_checkpoint_adapter(model, checkpoint: str | os.PathLike) -> None:
    """Set the prepared model's indices and values from a checkpoint's adapter, keeping the running config.

    The stored base entries are compared with the model's base (refusing another base), except where FSDP
    shards it: the deltas are whole on every rank, the base is not.
    """
    config = model.sparse_config
    load_adapter(model, checkpoint, check_base=not is_fsdp_wrapped(model))
    model.sparse_config = config


def install_checkpoint_hooks(Trainer: type) -> None:  # noqa: N803 (the class itself)
    """Wrap `Trainer.save_model`, `_save_optimizer_and_scheduler`, `_load_from_checkpoint` and `_load_best_model`
    (see the module docstring). Idempotent."""
    hooks = {
        "save_model": _save_model,
        "_save_optimizer_and_scheduler": _save_optimizer_and_scheduler,
        "_load_from_checkpoint": _load_from_checkpoint,
        "_load_best_model": _load_best_model,
    }
    for name, hook in hooks.items():
        original = getattr(Trainer, name)
        if getattr(original, "sparse_checkpoints", False):
            continue
        wrapped = functools.update_wrapper(_as_method(hook, original), original)
        wrapped.sparse_checkpoints = True
        setattr(Trainer, name, wrapped)


def _as_method(hook, original):
    def method(self, *args, **kwargs):
        return hook(original, self, *args, **kwargs)

    return method


def _has_sparse_layers(model) -> bool:
    return model is not None and any(True for _ in iter_sparse_layers(model))


def _adapter_only(trainer) -> bool:
    """Whether this Trainer's checkpoints hold the adapter: its model has sparse layers and no `SparseCallback`
    among its callbacks asks for full checkpoints."""
    from .hf import SparseCallback  # here: hf imports this module

    return _has_sparse_layers(trainer.model) and not any(
        isinstance(cb, SparseCallback) and cb.save_full_checkpoints for cb in trainer.callback_handler.callbacks
    )


def _save_model(original, self, output_dir=None, _internal_call=False):
    if not (self.is_fsdp_enabled and _adapter_only(self)):
        return original(self, output_dir, _internal_call)  # the model's save_pretrained writes the adapter
    from .hf import save_from_rank_zero

    output_dir = output_dir if output_dir is not None else self.args.output_dir
    save_from_rank_zero(self.model, output_dir, self.args.should_save)
    if self.args.should_save:
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
    if self.args.push_to_hub and not _internal_call:  # as the Trainer's own save_model does
        self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)


def _save_optimizer_and_scheduler(original, self, output_dir):
    if not (self.is_fsdp_enabled and _adapter_only(self)):
        return original(self, output_dir)
    from transformers import trainer as trainer_module

    # The FSDP branch saves the model (a copy of the base) beside the optimizer; save_model wrote the adapter.
    with _replaced(trainer_module, "save_fsdp_model", lambda *args, **kwargs: None):
        return original(self, output_dir)


@contextlib.contextmanager
def _replaced(owner, name, value):
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


def _load_from_checkpoint(original, self, resume_from_checkpoint, model=None):
    if not (_has_sparse_layers(self.model) and (Path(resume_from_checkpoint) / CONFIG_NAME).is_file()):
        return original(self, resume_from_checkpoint, model)
    check_resume_config(resume_from_checkpoint, self.model.sparse_config)
    if holds_model_weights(resume_from_checkpoint):
        return original(self, resume_from_checkpoint, model)
    load_checkpoint_adapter(self.model, resume_from_checkpoint)


def _load_best_model(original, self):
    best = self.state.best_model_checkpoint
    if not _has_sparse_layers(self.model) or holds_model_weights(best) or not (Path(best) / CONFIG_NAME).is_file():
        return original(self)
    load_checkpoint_adapter(self.model, best)
