"""sparse_plugin: sparse fine-tuning (SpIEL, SMT, SIFT) for Hugging Face Trainer, TRL and Axolotl.

Example:
    ```python
    >>> import sparse_plugin
    >>> model = sparse_plugin.prepare_model(model, sparse_plugin.SparseConfig(lora_rank_equivalent=16))
    >>> sparse_plugin.save_adapter(model, "out/adapter")
    ```
"""

from .config import SparseConfig
from .distributed import keep_deltas_replicated
from .hub import push_adapter_to_hub
from .integrations.hf import SparseCallback, register_optimizers
from .io import AdapterError, load_adapter, read_adapter, save_adapter
from .layer import SparseDeltaLinear
from .model import iter_sparse_layers, merge_adapter, prepare_model, print_trainable_parameters, unmerge_adapter
from .optim import SM3, SparseAdamW

register_optimizers()  # TrainingArguments(optim="spiel_sm3" | "spiel_adamw")


def __getattr__(name: str):
    """`sparse_plugin.SparsePlugin`, the Axolotl plugin, imported on first use: Axolotl loads `plugins:` entries
    as `module.Class`, and only its users should need (and wait for) axolotl. Kept out of `__all__` so that
    `from sparse_plugin import *` works without axolotl."""
    if name == "SparsePlugin":
        from .integrations.axolotl import SparsePlugin

        return SparsePlugin
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
