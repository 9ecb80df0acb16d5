"""`SparsePlugin`: sparse fine-tuning in Axolotl from `plugins: [sparse_plugin.SparsePlugin]` and `sparse_*` keys.

Hooks, in the order Axolotl calls them, and why each:

- `get_input_args`: the `sparse_*` keys and their checks (`SparseArgs`), merged into Axolotl's config model.
- `get_adapter_capabilities` / `load_adapter`: make `adapter: sparse` a known adapter, which Axolotl requires
  before it loads a quantized base (`load_in_4bit`); the loader has nothing to do for it.
- `post_model_load`: wrap the targets of the fully loaded model (on its device, quantized or not) with
  `prepare_model`; under `axolotl inference`, load the trained adapter from `output_dir` instead.
- `add_callbacks_pre_trainer`: `SparseCallback` (run length for the schedule, `sparse/*` metrics). When the
  Trainer is built it makes `model.save_pretrained` write the adapter, as a PEFT model's does: every
  `checkpoint-N` then holds the adapter and the Trainer's state (optimizer, scheduler, RNG), no copy of the
  base, and `resume_from_checkpoint` loads it; Axolotl's Ctrl-C handler saves the adapter too.
  `sparse_save_full_checkpoints: true` keeps the full model copy in checkpoints instead.
- `post_train`: runs between `trainer.train()` and Axolotl's final `model.save_pretrained(output_dir)`, which
  writes the adapter also where checkpoints hold full copies.
- `post_train_unload`: with `sparse_merge_on_finish`, merge the adapter into the base as `sparse-merge merge`
  does, into `output_dir/merged`, once the trained model has been freed.

The optimizer names `spiel_sm3` / `spiel_adamw` need no hook: Axolotl imports this module (and so
`sparse_plugin`, which registers them) before it validates the YAML, and hands unknown names to
`TrainingArguments.optim`.
"""

from __future__ import annotations

import os
from pathlib import Path

from axolotl.integrations.base import AdapterCapabilities, BasePlugin
from axolotl.utils.logging import get_logger

from ...atomic import Interrupted
from ...cli import rounded_away_warning, run_merge
from ...hub import resolve_adapter, resolve_model
from ...io import AdapterError, load_adapter
from ...model import prepare_model
from ..checkpoints import save_adapter_instead_of_model
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
        return [SparseCallback(save_full_checkpoints=bool(cfg.sparse_save_full_checkpoints))]

    def post_train(self, cfg, model):
        save_adapter_instead_of_model(model)

    def post_train_unload(self, cfg):
        if cfg.sparse_merge_on_finish and os.environ.get("RANK", "0") == "0":
            _merge_into(cfg, Path(cfg.output_dir) / MERGED_DIR)


def _merge_into(cfg, output: Path) -> None:
    """What `sparse-merge merge --base <base_model> --adapter <output_dir> --output <output> --overwrite --quiet`
    does, replacing `output`; a refusal is a RuntimeError naming it.

    A hub id base resolves as sparse-merge resolves any: from the cache Axolotl filled when it loaded the model.
    """
    LOG.info(f"sparse_merge_on_finish: merging {cfg.output_dir} into {cfg.base_model} -> {output}")
    try:
        base = resolve_model(
            str(cfg.base_model), revision=str(cfg.revision_of_model) if cfg.revision_of_model else None
        )
        result = run_merge(base, resolve_adapter(str(cfg.output_dir)), output, overwrite=True, progress=False)
    except (AdapterError, OSError, Interrupted) as err:
        raise RuntimeError(f"sparse_merge_on_finish: {err}") from err
    LOG.info(f"sparse_merge_on_finish: merged {result['values']:,d} values in {result['tensors']} tensors -> {output}")
    if warning := rounded_away_warning(result):
        LOG.warning(f"sparse_merge_on_finish: {warning}")
    for name in result["skipped_files"]:
        LOG.info(
            f"sparse_merge_on_finish: {name} (another weight format) was not copied; it would hold unmerged weights"
        )
