"""`SparsePlugin`: sparse fine-tuning in Axolotl from `plugins: [sparse_plugin.SparsePlugin]` and `sparse_*` keys.

Hooks, in the order Axolotl calls them, and why each:

- `get_input_args`: the `sparse_*` keys and their checks (`SparseArgs`), merged into Axolotl's config model.
- `get_adapter_capabilities` / `load_adapter`: make `adapter: sparse` a known adapter, which Axolotl requires
  before it loads a quantized base (`load_in_4bit`); the loader has nothing to do for it.
- `post_model_load`: wrap the targets of the fully loaded model (on its device, quantized or not) with
  `prepare_model`; under `axolotl inference`, load the trained adapter from `output_dir` instead.
- `add_callbacks_pre_trainer`: `SparseCallback` (run length for the schedule, adapter in every checkpoint and
  in `output_dir`, `sparse/*` metrics).
- `post_train`: runs between `trainer.train()` and Axolotl's final `model.save_pretrained(output_dir)`; from
  then on `save_pretrained` writes the adapter, as a PEFT model's does, not a full copy of the base. The
  checkpoints written while training keep the Trainer's full state, so `resume_from_checkpoint` works.
- `post_train_unload`: with `sparse_merge_on_finish`, run `sparse-merge merge` into `output_dir/merged` once
  the trained model has been freed.

The optimizer names `spiel_sm3` / `spiel_adamw` need no hook: Axolotl imports this module (and so
`sparse_plugin`, which registers them) before it validates the YAML, and hands unknown names to
`TrainingArguments.optim`.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from axolotl.integrations.base import AdapterCapabilities, BasePlugin
from axolotl.utils.logging import get_logger

from ... import cli
from ...io import load_adapter, save_adapter
from ...model import prepare_model
from ..hf import SparseCallback
from .args import ADAPTER, sparse_config_from, yaml_message

# Axolotl's logging setup shows INFO only for loggers under "axolotl", as for its bundled integrations.
LOG = get_logger("axolotl.integrations.sparse_plugin")
MERGED_DIR = "merged"


class SparsePlugin(BasePlugin):
    """Axolotl plugin: trains a sparse delta of the frozen base and saves it as a sparse_plugin adapter.

    Example:
        ```yaml
        plugins:
          - sparse_plugin.SparsePlugin
        sparse_method: spiel
        sparse_regrow: ma
        sparse_lora_rank_equivalent: 16
        optimizer: spiel_sm3
        ```
    """

    def get_input_args(self) -> str:
        return "sparse_plugin.integrations.axolotl.args.SparseArgs"

    def get_adapter_capabilities(self) -> list[AdapterCapabilities]:
        return [AdapterCapabilities(name=ADAPTER)]

    def load_adapter(self, model, cfg, inference=False, config_only=False):
        if cfg.adapter != ADAPTER:
            return None
        return model, None  # post_model_load wraps the model, with or without `adapter: sparse`

    def post_model_load(self, cfg, model):
        if cfg.inference:
            load_adapter(model, cfg.output_dir)
            LOG.info(f"Loaded the sparse adapter from {cfg.output_dir}")
            return
        try:
            prepare_model(model, sparse_config_from(cfg))
        except ValueError as err:
            raise ValueError(yaml_message(err)) from None

    def add_callbacks_pre_trainer(self, cfg, model):
        return [SparseCallback()]

    def post_train(self, cfg, model):
        model.save_pretrained = functools.partial(_save_adapter_only, model)

    def post_train_unload(self, cfg):
        if cfg.sparse_merge_on_finish and os.environ.get("RANK", "0") == "0":
            _merge_into(cfg, Path(cfg.output_dir) / MERGED_DIR)


def _save_adapter_only(model, save_directory, *args, **kwargs) -> None:
    """`save_pretrained` of a trained sparse model: the adapter files (Axolotl saves config and tokenizer)."""
    save_adapter(model, save_directory)


def _merge_into(cfg, output: Path) -> None:
    """`sparse-merge merge --base <base_model> --adapter <output_dir> --output <output>`, replacing `output`.

    A hub id base resolves as sparse-merge resolves any: from the cache Axolotl filled when it loaded the model.
    """
    argv = ["merge", "--base", str(cfg.base_model), "--adapter", str(cfg.output_dir), "--output", str(output), "--overwrite", "--quiet"]
    if cfg.revision_of_model:
        argv += ["--base-revision", str(cfg.revision_of_model)]
    LOG.info("sparse_merge_on_finish: sparse-merge " + " ".join(argv))
    if cli.main(argv) != 0:
        raise RuntimeError(f"sparse_merge_on_finish: `sparse-merge {' '.join(argv)}` failed (its error is printed above)")
