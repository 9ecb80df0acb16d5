"""Builders shared by test_io, test_merge and test_cli: a trained tiny adapter, plain-torch references, checkpoint
readers, and the hostile adapters (written directly with safetensors / json) that every reader must refuse."""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from conftest import tiny_llama
from sparse_plugin import SparseConfig, iter_sparse_layers, prepare_model, save_adapter
from sparse_plugin.io import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME

# The target the hostile edits touch: 48 x 48 = 2304 entries, 115 trained at density 0.05.
KEY = "model.layers.0.self_attn.q_proj.weight"
KEY_NUMEL = 48 * 48
KEY_COUNT = 115
TOKENS = torch.randint(97, (2, 12), generator=torch.Generator().manual_seed(0))


def target_keys(model: torch.nn.Module) -> list[str]:
    """State-dict keys of every Linear weight except the output head: what `all-linear` trains."""
    return [f"{name}.weight" for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head"]


def base_state(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The state dict of `tiny_llama(seed, dtype)`, rebuilt (it is seeded, so identical to the trained model's base)."""
    return {k: v.clone() for k, v in tiny_llama(seed, dtype).state_dict().items()}


def train_values(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Give every sparse layer random nonzero values, as after training (N(0, 0.05²): larger than the base's 0.02
    init, so a bf16 merge cannot round them away)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in iter_sparse_layers(model):
            layer.values.copy_(torch.randn(layer.values.shape, generator=gen) * 0.05)
    return model


def trained_model(seed: int = 0, dtype: torch.dtype = torch.float32, **config) -> LlamaForCausalLM:
    """`tiny_llama(seed, dtype)` prepared with `SparseConfig(density=0.05, **config)` and trained values."""
    model = tiny_llama(seed, dtype)
    prepare_model(model, SparseConfig(**{"density": 0.05, **config}))
    return train_values(model)


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    return model(input_ids=TOKENS).logits


def dense_reference(base: dict[str, torch.Tensor], adapter_tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Plain torch merge: each target's values added at its flat indices in fp32, rounded once to the base dtype."""
    merged = dict(base)
    for name, indices in adapter_tensors.items():
        if name.endswith(".indices"):
            key = name.removesuffix(".indices")
            weight = base[key].float().flatten().clone()  # clone: for fp32, float() and flatten() are views
            weight[indices.long()] += adapter_tensors[f"{key}.values"].float()
            merged[key] = weight.view(base[key].shape).to(base[key].dtype)
    return merged


def read_checkpoint(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint directory, over all its shards."""
    tensors = {}
    for shard in sorted(Path(directory).glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def model_with_state(state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """A tiny Llama holding `state` (for plain-torch reference logits)."""
    model = tiny_llama(0, dtype)
    model.load_state_dict(state)
    return model


@dataclass
class Saved:
    """A base checkpoint on disk, the trained model over it, and that model's adapter on disk."""

    base: Path
    adapter: Path
    model: LlamaForCausalLM
    base_state: dict[str, torch.Tensor]


def saved_setup(root: Path, *, dtype: torch.dtype = torch.float32, max_shard_size: str | None = None, **config) -> Saved:
    """Save `tiny_llama(0, dtype)` to `root/base` (sharded when `max_shard_size` is given), train a sparse delta
    over it and save the adapter to `root/adapter`."""
    model = tiny_llama(0, dtype)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(root / "base", **kwargs)
    prepare_model(model, SparseConfig(**{"density": 0.05, **config}))
    train_values(model)
    save_adapter(model, root / "adapter", base_model_name_or_path="tiny/base")
    return Saved(root / "base", root / "adapter", model, state)


# --------------------------------------------------------------------------------------------- hostile adapters


def edit_tensors(fn):
    """An edit that rewrites the adapter's safetensors after `fn(tensors)`, keeping its save_id metadata."""

    def edit(directory: Path) -> None:
        path = directory / WEIGHTS_NAME
        with safe_open(path, framework="pt") as fh:
            metadata = fh.metadata()
        tensors = load_file(path)
        fn(tensors)
        save_file(tensors, path, metadata=metadata)

    return edit


def edit_meta(fn):
    """An edit that rewrites `sparse_config.json` after `fn(meta)`."""

    def edit(directory: Path) -> None:
        path = directory / CONFIG_NAME
        meta = json.loads(path.read_text())
        fn(meta)
        path.write_text(json.dumps(meta))

    return edit


def _set(name: str, position: int, value):
    def fn(tensors):
        tensors[name][position] = value

    return fn


def _swap_first_two(tensors):
    indices = tensors[f"{KEY}.indices"]
    indices[[0, 1]] = indices[[1, 0]]


def _duplicate_first(tensors):
    indices = tensors[f"{KEY}.indices"]
    indices[1] = indices[0]


def _truncate(directory: Path) -> None:
    path = directory / WEIGHTS_NAME
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _random_bytes(directory: Path) -> None:
    path = directory / WEIGHTS_NAME
    path.write_bytes(random.Random(0).randbytes(path.stat().st_size))


def _count_minus_one(meta):
    meta["targets"][KEY]["count"] -= 1


_OUTSIDE = rf"`{KEY}.indices` has positions outside \[0, {KEY_NUMEL}\)"
# id -> (edit of a valid adapter directory, regex the one-line refusal must match)
HOSTILE_ADAPTERS = {
    "missing-adapter-dir": (shutil.rmtree, "adapter directory not found"),
    "missing-safetensors": (lambda d: (d / WEIGHTS_NAME).unlink(), f"{WEIGHTS_NAME}: missing"),
    "truncated-safetensors": (_truncate, "not a readable safetensors file"),
    "random-bytes-safetensors": (_random_bytes, "not a readable safetensors file"),
    "invalid-json": (lambda d: (d / CONFIG_NAME).write_text('{"format": 1,'), f"{CONFIG_NAME}: not valid JSON"),
    "format-newer": (edit_meta(lambda m: m.update(format=FORMAT_VERSION + 1)), f"format {FORMAT_VERSION + 1} is newer"),
    "index-out-of-range": (edit_tensors(_set(f"{KEY}.indices", -1, KEY_NUMEL)), _OUTSIDE),
    "negative-index": (edit_tensors(_set(f"{KEY}.indices", 0, -1)), _OUTSIDE),
    "unsorted-indices": (edit_tensors(_swap_first_two), f"`{KEY}.indices` is not sorted and unique"),
    "duplicate-indices": (edit_tensors(_duplicate_first), f"`{KEY}.indices` is not sorted and unique"),
    "nan-values": (edit_tensors(_set(f"{KEY}.values", 3, float("nan"))), f"`{KEY}.values` holds NaN or inf"),
    "inf-values": (edit_tensors(_set(f"{KEY}.values", 3, float("inf"))), f"`{KEY}.values` holds NaN or inf"),
    "nan-base-values": (edit_tensors(_set(f"{KEY}.base_values", 0, float("nan"))), f"`{KEY}.base_values` holds NaN or inf"),
    "count-mismatch": (edit_meta(_count_minus_one), f"`{KEY}.indices` has {KEY_COUNT} entries but the config says {KEY_COUNT - 1}"),
    "save-id-mismatch": (edit_meta(lambda m: m.update(save_id="0" * 32)), "come from different saves"),
}


def hostile_copy(adapter: Path, destination: Path, case: str) -> Path:
    """Copy a valid adapter to `destination` and apply the hostile edit `case` of `HOSTILE_ADAPTERS`."""
    shutil.copytree(adapter, destination)
    HOSTILE_ADAPTERS[case][0](destination)
    return destination
