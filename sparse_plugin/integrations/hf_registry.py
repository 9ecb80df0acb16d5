"""The `spiel_sm3` / `spiel_adamw` optimizer names in transformers, and the Trainer's quantized-base check.

Transformers has no public way to add an optimizer name: `TrainingArguments` converts `optim` to the enum
`OptimizerNames` (in `transformers.training_args`) and `Trainer` looks the member up in
`transformers.trainer_optimizer._OPTIMIZER_HANDLERS`. `import sparse_plugin` adds our members and handlers to each
module as soon as it is imported (see `import_hooks`), and lets `Trainer` (`transformers.trainer`) accept a quantized
base that carries sparse layers (QSpIEL), which it would refuse as "purely quantized", and write and resume
adapter-only checkpoints. Importing transformers'
Trainer stack ourselves would cost seconds and pull in peft and bitsandbytes for every user, `sparse-merge` included.
"""

from __future__ import annotations

from types import ModuleType

from ..distributed import averages_delta_gradients
from ..model import iter_sparse_layers
from ..optim import SM3, SparseAdamW

SPARSE_OPTIMIZERS = {"spiel_sm3": SM3, "spiel_adamw": SparseAdamW}
# optim_args keys each optimizer accepts, with their types (everything else comes from TrainingArguments).
_OPTIM_ARGS = {
    SM3: {"momentum": float, "beta": float, "eps": float},
    SparseAdamW: {"eps": float, "regrown_start": str},
}


def _parse_optim_args(cls, optim_args: dict[str, str]) -> dict:
    allowed = _OPTIM_ARGS[cls]
    parsed = {}
    for key, text in optim_args.items():
        if key not in allowed:
            raise ValueError(
                f"`optim_args` key {key!r} is not understood by {cls.__name__}; allowed: {sorted(allowed)}."
            )
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
        if fsdp_plugin() is not None and not averages_delta_gradients(
            [layer.delta for _, layer in iter_sparse_layers(model)]
        ):
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
        kwargs["sparse_config"] = getattr(model, "sparse_config", None)  # set by prepare_model / load_adapter
        kwargs["total_steps"] = ctx.args.max_steps if ctx.args.max_steps > 0 else None
        return cls, kwargs

    return build


def add_optimizer_names(training_args: ModuleType) -> None:
    """Add our members to `training_args.OptimizerNames`, a str-Enum, through its value and name maps (what lookups
    use). Idempotent."""
    names = training_args.OptimizerNames
    for name in SPARSE_OPTIMIZERS:
        if name not in names._value2member_map_:
            member = str.__new__(names, name)
            member._name_, member._value_ = name.upper(), name
            names._value2member_map_[name] = member
            names._member_map_[name.upper()] = member
            names._member_names_.append(name.upper())


def add_optimizer_handlers(trainer_optimizer: ModuleType) -> None:
    """Map our members to their builders in the Trainer's handler table. The module imports `OptimizerNames` from
    `transformers.training_args` first, so `add_optimizer_names` has run by then. Idempotent."""
    for name, cls in SPARSE_OPTIMIZERS.items():
        trainer_optimizer._OPTIMIZER_HANDLERS[trainer_optimizer.OptimizerNames(name)] = _handler(cls)


def accept_quantized_bases(trainer: ModuleType) -> None:
    """Let `Trainer` train sparse deltas over a quantized base (bitsandbytes 4/8-bit).

    `Trainer.__init__` calls `transformers.trainer.validate_quantization_for_training`, which refuses a quantized
    model unless a PEFT adapter is attached. Our sparse layers are the adapter here, so the check is skipped for a
    model that has them and whose quantization method supports training; anything else is checked as before.
    Idempotent.
    """
    original = trainer.validate_quantization_for_training
    if getattr(original, "accepts_sparse_layers", False):
        return

    def validate(model):
        quantizer = getattr(model, "hf_quantizer", None)
        if not (quantizer is not None and quantizer.is_trainable and any(True for _ in iter_sparse_layers(model))):
            original(model)

    validate.accepts_sparse_layers = True
    trainer.validate_quantization_for_training = validate


def patch_trainer(trainer: ModuleType) -> None:
    """What `transformers.trainer` needs: accept quantized bases with sparse layers, and adapter-only checkpoints
    (`checkpoints.install_checkpoint_hooks`). Idempotent."""
    from .checkpoints import install_checkpoint_hooks

    accept_quantized_bases(trainer)
    install_checkpoint_hooks(trainer.Trainer)


def register_optimizers() -> None:
    """Make `TrainingArguments(optim="spiel_sm3" | "spiel_adamw")` valid and buildable by `Trainer` now.

    `import sparse_plugin` already arranges this for when transformers' modules load; call it to import them and
    apply everything at once. Idempotent.
    """
    from transformers import trainer, trainer_optimizer, training_args

    add_optimizer_names(training_args)
    add_optimizer_handlers(trainer_optimizer)
    patch_trainer(trainer)


def fsdp_plugin():
    """The FSDP plugin of the Trainer's accelerator, or None where it will not shard (no FSDP configured, or a
    platform accelerate runs `fsdp=True` on as plain DDP, such as CPU)."""
    from accelerate.state import AcceleratorState, is_initialized

    # `AcceleratorState()` is a view of the state an `Accelerator` set up; where none has, it would start building
    # one (and then refuse), so look before constructing. Without FSDP the state has no `fsdp_plugin` attribute.
    if not is_initialized():
        return None
    return getattr(AcceleratorState(), "fsdp_plugin", None)
