"""Hugging Face Trainer integration: the `spiel_sm3` / `spiel_adamw` optimizer names and `SparseCallback`.

Transformers has no public way to add an optimizer name: `TrainingArguments` converts `optim` to the enum
`OptimizerNames` and `Trainer` looks the member up in `transformers.trainer_optimizer._OPTIMIZER_HANDLERS`.
`register_optimizers` adds our two members and handlers there, once, on `import sparse_plugin`; it also lets
`Trainer` accept a quantized base that carries sparse layers (QSpIEL), which it would refuse as "purely quantized".
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import TrainerCallback

from ..distributed import averages_delta_gradients, keep_deltas_replicated
from ..fsdp import gathered_base_values, is_fsdp_wrapped
from ..io import save_adapter
from ..model import iter_sparse_layers, require_sparse_layers
from ..optim import SM3, SparseAdamW

SPARSE_OPTIMIZERS = {"spiel_sm3": SM3, "spiel_adamw": SparseAdamW}
# optim_args keys each optimizer accepts, with their types (everything else comes from TrainingArguments).
_OPTIM_ARGS = {
    SM3: {"momentum": float, "beta": float, "eps": float},
    SparseAdamW: {"eps": float},
}


def _parse_optim_args(cls, optim_args: dict[str, str]) -> dict:
    allowed = _OPTIM_ARGS[cls]
    parsed = {}
    for key, text in optim_args.items():
        if key not in allowed:
            raise ValueError(f"`optim_args` key {key!r} is not understood by {cls.__name__}; allowed: {sorted(allowed)}.")
        try:
            parsed[key] = allowed[key](text)
        except ValueError:
            raise ValueError(f"`optim_args` {key}={text!r} is not a valid {allowed[key].__name__}.") from None
    return parsed


def _handler(cls):
    def build(ctx):
        model = ctx.model
        if model is None or not any(True for _ in iter_sparse_layers(model)):
            raise ValueError(
                f"optim={ctx.args.optim.value!r} trains sparse deltas, but the model has none: call "
                "`model = sparse_plugin.prepare_model(model, SparseConfig(...))` before building the Trainer."
            )
        if ctx.args.deepspeed:
            raise ValueError(
                f"optim={ctx.args.optim.value!r} cannot run under DeepSpeed: ZeRO replaces the optimizer's view of the "
                "values with flat fp32 partitions, while prune/regrow and SM3 need each layer's whole values vector; "
                "train with FSDP (fsdp=True, with SparseCallback) or DDP."
            )
        if _fsdp_plugin() is not None and not averages_delta_gradients([layer.delta for _, layer in iter_sparse_layers(model)]):
            raise ValueError(
                f"optim={ctx.args.optim.value!r} under FSDP needs the sparse deltas kept out of FSDP's shards: pass "
                "callbacks=[SparseCallback()] to the Trainer (it sets this up before the model is wrapped)."
            )
        kwargs = dict(ctx.optimizer_kwargs)
        if cls is SparseAdamW:
            kwargs.update(ctx.adam_kwargs)
        kwargs.update(_parse_optim_args(cls, ctx.optim_args))
        kwargs["weight_decay"] = ctx.args.weight_decay
        # Trainer passes a `model` kwarg as the params argument (its LOMO convention): our optimizers take the
        # prepared model there and train its sparse values, all of which get weight decay (there is no bias
        # or norm among them).
        kwargs["model"] = model
        kwargs["total_steps"] = ctx.args.max_steps if ctx.args.max_steps > 0 else None
        return cls, kwargs

    return build


def register_optimizers() -> None:
    """Make `TrainingArguments(optim="spiel_sm3" | "spiel_adamw")` valid and buildable by `Trainer`.

    Adds members to the `OptimizerNames` str-Enum (to its value and name maps, which is what lookups use)
    and a handler per name to the Trainer's handler table, lets `Trainer` take a quantized base with
    sparse layers, and teaches it adapter-only checkpoints (`checkpoints.install_checkpoint_hooks`). Idempotent.
    """
    from transformers import trainer_optimizer
    from transformers.training_args import OptimizerNames

    for name, cls in SPARSE_OPTIMIZERS.items():
        member = OptimizerNames._value2member_map_.get(name)
        if member is None:
            member = str.__new__(OptimizerNames, name)
            member._name_, member._value_ = name.upper(), name
            OptimizerNames._value2member_map_[name] = member
            OptimizerNames._member_map_[name.upper()] = member
            OptimizerNames._member_names_.append(name.upper())
        trainer_optimizer._OPTIMIZER_HANDLERS[member] = _handler(cls)
    _accept_quantized_bases()
    from .checkpoints import install_checkpoint_hooks  # here: it imports this module

    install_checkpoint_hooks()


def _accept_quantized_bases() -> None:
    """Let `Trainer` train sparse deltas over a quantized base (bitsandbytes 4/8-bit).

    `Trainer.__init__` calls `transformers.trainer.validate_quantization_for_training`, which refuses a quantized
    model unless a PEFT adapter is attached. Our sparse layers are the adapter here, so the check is skipped for a
    model that has them and whose quantization method supports training; anything else is checked as before.
    """
    from transformers import trainer

    original = trainer.validate_quantization_for_training
    if getattr(original, "accepts_sparse_layers", False):
        return

    def validate(model):
        quantizer = getattr(model, "hf_quantizer", None)
        if not (quantizer is not None and quantizer.is_trainable and any(True for _ in iter_sparse_layers(model))):
            original(model)

    validate.accepts_sparse_layers = True
    trainer.validate_quantization_for_training = validate


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
        plugin = _fsdp_plugin()
        if plugin is not None and model is not None:
            _keep_deltas_out_of_fsdp(model, plugin)
        if not self.save_full_checkpoints and model is not None:
            from .checkpoints import save_adapter_instead_of_model  # here: it imports this module

            save_adapter_instead_of_model(model)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        require_sparse_layers(model)
        sparse = _sparse_optimizer(optimizer)
        if sparse is not None and sparse.selector is not None:
            sparse.selector.total_steps = state.max_steps
            sparse.selector.prepare_next_step()

    def on_save(self, args, state, control, model=None, **kwargs):
        if self.save_full_checkpoints:  # else the checkpoint's model save was the adapter
            save_from_rank_zero(model, Path(args.output_dir) / f"checkpoint-{state.global_step}", state.is_world_process_zero)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        save_from_rank_zero(model, args.output_dir, state.is_world_process_zero)

    def on_log(self, args, state, control, logs=None, model=None, optimizer=None, **kwargs):
        if logs is None or model is None or "loss" not in logs:
            return
        metrics = {"sparse/mean_abs_delta": _mean_abs_delta(model)}
        sparse = _sparse_optimizer(optimizer)
        if sparse is not None and sparse.selector is not None and sparse.selector.last_round:
            metrics.update(sparse.selector.last_round)
            sparse.selector.last_round = {}
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)


def _fsdp_plugin():
    """The FSDP plugin of the Trainer's accelerator, or None where it will not shard (no FSDP configured, or a
    platform accelerate runs `fsdp=True` on as plain DDP, such as CPU)."""
    from accelerate.state import AcceleratorState

    return AcceleratorState._shared_state.get("fsdp_plugin")


def _keep_deltas_out_of_fsdp(model, plugin) -> None:
    """Add the model's `SparseDelta` modules to the FSDP plugin's `ignored_modules` (a user's regex or list is kept)
    before the Trainer wraps the model; accelerate passes them to FSDP1 as modules and to FSDP2 as parameters."""
    deltas = keep_deltas_replicated(model)
    ignored = plugin.ignored_modules
    if isinstance(ignored, str):
        pattern = re.compile(ignored)
        ignored = [module for name, module in model.named_modules() if pattern.fullmatch(name)]
    ignored = list(ignored or [])
    plugin.ignored_modules = ignored + [d for d in deltas if not any(d is m for m in ignored)]


def save_from_rank_zero(model, directory, is_main_process: bool) -> None:
    """Rank 0 writes the adapter; under FSDP every rank must call this, to gather the stored base entries."""
    config = getattr(model, "sparse_config", None)
    sharded = config is not None and config.store_base_values and is_fsdp_wrapped(model)
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
