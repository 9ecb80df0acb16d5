"""Hugging Face Trainer integration: `SparseCallback`. The `spiel_sm3` / `spiel_adamw` optimizer names are
registered by `hf_registry`."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import TrainerCallback

from ..distributed import keep_deltas_replicated
from ..fsdp import gathered_base_values, is_fsdp_wrapped
from ..io import save_adapter
from ..model import iter_sparse_layers, require_sparse_layers
from ..optim import SM3, SparseAdamW
from .hf_registry import fsdp_plugin


def _sparse_optimizer(optimizer):
    """Our optimizer behind accelerate's wrapper, or None."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return inner if isinstance(inner, (SM3, SparseAdamW)) else None


class SparseCallback(TrainerCallback):
    """Trainer hooks for sparse fine-tuning: schedule length, adapter files, and selection metrics in the logs.

    The optimizer runs prune/regrow itself; this callback gives it the run's length at train begin (from
    `state.max_steps`, also under epoch-based training), makes every `checkpoint-N` hold the adapter instead of a
    copy of the model (and `trainer.save_model()` write the adapter), writes the adapter into `output_dir` at the
    end (rank 0 only), and adds `sparse/*` metrics to the Trainer's logs. `resume_from_checkpoint` then loads the
    adapter into the prepared model, and refuses a checkpoint trained with another sparse configuration. Under FSDP
    it keeps the sparse deltas out of FSDP's shards (added to the plugin's `ignored_modules`, gradients averaged
    over ranks, see `keep_deltas_replicated`) and gathers the base entries the adapter stores from the shards.

    Args:
        save_full_checkpoints (`bool`, defaults to `False`): also keep the Trainer's full copy of the model in
            every checkpoint (and in `trainer.save_model()`), beside the adapter, as without this package.

    Example:
        ```python
        >>> trainer = Trainer(model, TrainingArguments("out", optim="spiel_sm3"), train_dataset=ds,
        ...                   callbacks=[SparseCallback()])
        ```
    """

    def __init__(self, save_full_checkpoints: bool = False):
        if not isinstance(save_full_checkpoints, bool):
            raise TypeError(f"`save_full_checkpoints` must be true or false, got {save_full_checkpoints!r}.")
        self.save_full_checkpoints = save_full_checkpoints

    def on_init_end(self, args, state, control, model=None, **kwargs):
        plugin = fsdp_plugin()
        if plugin is not None and model is not None:
            _keep_deltas_out_of_fsdp(model, plugin)
        if not self.save_full_checkpoints and model is not None:
            from .checkpoints import save_adapter_instead_of_model  # here: it imports this module

            save_adapter_instead_of_model(model)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        require_sparse_layers(model)
        sparse = _sparse_optimizer(optimizer)
        if sparse is not None and sparse.selector is not None:
            sparse.selector.set_total_steps(state.max_steps)

    def on_save(self, args, state, control, model=None, **kwargs):
        if self.save_full_checkpoints:  # else the checkpoint's model save was the adapter
            save_from_rank_zero(
                model, Path(args.output_dir) / f"checkpoint-{state.global_step}", state.is_world_process_zero
            )

    def on_train_end(self, args, state, control, model=None, **kwargs):
        save_from_rank_zero(model, args.output_dir, state.is_world_process_zero)

    def on_log(self, args, state, control, logs=None, model=None, optimizer=None, **kwargs):
        if logs is None or model is None or "loss" not in logs:
            return
        metrics = {"sparse/mean_abs_delta": _mean_abs_delta(model)}
        sparse = _sparse_optimizer(optimizer)
        if sparse is not None and sparse.selector is not None:
            metrics.update(sparse.selector.pop_metrics())
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)


def _keep_deltas_out_of_fsdp(model, plugin) -> None:
    """Add the modules `keep_deltas_replicated` returns to the FSDP plugin's `ignored_modules` (a user's regex or list is kept)
    before the Trainer wraps the model; accelerate passes them to FSDP1 as modules and to FSDP2 as parameters."""
    keep = keep_deltas_replicated(model)
    ignored = plugin.ignored_modules
    if isinstance(ignored, str):
        pattern = re.compile(ignored)
        ignored = [module for name, module in model.named_modules() if pattern.fullmatch(name)]
    ignored = list(ignored or [])
    plugin.ignored_modules = ignored + [m for m in keep if not any(m is other for other in ignored)]


def save_from_rank_zero(model, directory, is_main_process: bool) -> None:
    """Rank 0 writes the adapter; under FSDP every rank must call this, to gather the base entries (stored, or only
    hashed into the adapter's base check when `store_base_values=False`)."""
    config = getattr(model, "sparse_config", None)
    sharded = config is not None and is_fsdp_wrapped(model)
    base_values = gathered_base_values(model) if sharded else None
    if is_main_process:
        save_adapter(model, directory, base_values=base_values)


@torch.no_grad()
def _mean_abs_delta(model) -> float:
    total = count = 0.0
    for _, layer in iter_sparse_layers(model):
        total += float(layer.values.float().abs().sum())
        count += layer.values.numel()
    return total / max(count, 1)
