"""sparse_plugin: sparse fine-tuning (SpIEL, SMT, SIFT) for Hugging Face Trainer, TRL and Axolotl.

Importing the package registers `optim="spiel_sm3"` and `"spiel_adamw"` with transformers and imports nothing
heavy: the names below load on first use, so `sparse-merge` starts without torch's training stack, and a user
who never quantizes never waits for bitsandbytes.

Example:
    ```python
    >>> import sparse_plugin
    >>> model = sparse_plugin.prepare_model(model, sparse_plugin.SparseConfig(lora_rank_equivalent=16))
    >>> sparse_plugin.save_adapter(model, "out/adapter")
    ```
"""

import importlib as _importlib

from .integrations.import_hooks import when_imported as _when_imported

# Public name -> the submodule defining it, imported on first access (PEP 562). `SparsePlugin`, the Axolotl plugin,
# is here too, as Axolotl loads `plugins:` entries as `module.Class`; it is kept out of `__all__` so that
# `from sparse_plugin import *` works without axolotl.
_LAZY = {
    "SM3": ".optim",
    "AdapterError": ".io",
    "SparseAdamW": ".optim",
    "SparseCallback": ".integrations.hf",
    "SparseConfig": ".config",
    "SparseDeltaLinear": ".layer",
    "SparsePlugin": ".integrations.axolotl",
    "iter_sparse_layers": ".model",
    "keep_deltas_replicated": ".distributed",
    "load_adapter": ".io",
    "merge_adapter": ".model",
    "prepare_model": ".model",
    "print_trainable_parameters": ".model",
    "push_adapter_to_hub": ".hub",
    "read_adapter": ".io",
    "register_optimizers": ".integrations.hf_registry",
    "save_adapter": ".io",
    "unmerge_adapter": ".model",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def _hf_registry():
    """`hf_registry`, imported when a hook first fires: it imports torch and our optimizers, which is cheap by then
    (transformers has loaded torch already)."""
    from .integrations import hf_registry

    return hf_registry


# TrainingArguments(optim="spiel_sm3" | "spiel_adamw"), Trainer builds our optimizers, accepts a quantized base with
# sparse layers and keeps adapter-only checkpoints: each change goes into the transformers module it concerns when
# that module is imported.
_when_imported("transformers.training_args", lambda module: _hf_registry().add_optimizer_names(module))
_when_imported("transformers.trainer_optimizer", lambda module: _hf_registry().add_optimizer_handlers(module))
_when_imported("transformers.trainer", lambda module: _hf_registry().patch_trainer(module))

__all__ = [
    "SM3",
    "AdapterError",
    "SparseAdamW",
    "SparseCallback",
    "SparseConfig",
    "SparseDeltaLinear",
    "iter_sparse_layers",
    "keep_deltas_replicated",
    "load_adapter",
    "merge_adapter",
    "prepare_model",
    "print_trainable_parameters",
    "push_adapter_to_hub",
    "read_adapter",
    "register_optimizers",
    "save_adapter",
    "unmerge_adapter",
]
