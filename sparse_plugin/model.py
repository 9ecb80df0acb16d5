"""Turning a model into a sparse fine-tune: find targets, share the budget, wrap, and merge in memory."""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch
from torch import nn

from .config import ALL_LINEAR, SparseConfig
from .layer import SparseDeltaLinear
from .sizing import allocate_budget


def iter_sparse_layers(model: nn.Module) -> Iterator[tuple[str, SparseDeltaLinear]]:
    """Yield `(weight_key, layer)` for every `SparseDeltaLinear`, where `weight_key` is the state-dict key the
    base weight had before wrapping (`model.layers.0.self_attn.q_proj.weight`, also inside FSDP1's wrappers):
    the adapter's tensor names."""
    for name, module in model.named_modules():
        if isinstance(module, SparseDeltaLinear):
            yield f"{_WRAPPER_SEGMENT.sub('', name)}.weight", module


# Module names FSDP1 and its activation-checkpoint wrapper insert, which the base's state-dict keys do not have.
_WRAPPER_SEGMENT = re.compile(r"(?:_fsdp_wrapped_module|_checkpoint_wrapped_module)\.")


def _is_linear(module: nn.Module) -> bool:
    # bitsandbytes Linear4bit / Linear8bitLt subclass nn.Linear, so they count.
    return isinstance(module, nn.Linear)


def find_targets(model: nn.Module, target_modules: str | list[str]) -> list[str]:
    """Names of the Linear modules `target_modules` selects (see `SparseConfig`), in model order.

    Raises `ValueError` for a list entry that matches no Linear, naming it and the names available.
    """
    linear = [name for name, module in model.named_modules() if _is_linear(module)]
    if target_modules == ALL_LINEAR:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        head_names = {name for name, module in model.named_modules() if head is not None and module is head}
        chosen = [name for name in linear if name not in head_names]
    elif isinstance(target_modules, str):
        chosen = [name for name in linear if re.fullmatch(target_modules, name)]
    else:
        for suffix in target_modules:
            if not any(_matches_suffix(name, suffix) for name in linear):
                available = sorted({name.rsplit(".", 1)[-1] for name in linear})
                raise ValueError(
                    f"`target_modules` entry {suffix!r} matches no Linear layer of {type(model).__name__}; "
                    f"available suffixes: {available}."
                )
        chosen = [name for name in linear if any(_matches_suffix(name, s) for s in target_modules)]
    if not chosen:
        raise ValueError(f"`target_modules`={target_modules!r} selects no Linear layer of {type(model).__name__}.")
    return chosen


def _matches_suffix(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def random_indices(numel: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` sorted unique positions in [0, numel), drawn uniformly without replacement.

    Draws a few more random integers than needed and deduplicates, so memory stays O(count) rather than
    the O(numel) of `randperm` (which we use only when most positions are wanted).
    """
    if count * 2 >= numel:
        return torch.randperm(numel, generator=generator)[:count].sort().values
    chosen = torch.empty(0, dtype=torch.int64)
    while chosen.numel() < count:
        draw = torch.randint(numel, (int((count - chosen.numel()) * 1.1) + 16,), generator=generator)
        chosen = torch.cat([chosen, draw]).unique()
    keep = torch.randperm(chosen.numel(), generator=generator)[:count]
    return chosen[keep].sort().values


def prepare_model(model: nn.Module, config: SparseConfig) -> nn.Module:
    """Freeze `model` and wrap each target Linear in a `SparseDeltaLinear` at its initial indices (random, or
    the largest-magnitude entries with `initial_positions="magnitude"`).

    Args:
        model (`nn.Module`): any torch model, usually a transformers `PreTrainedModel`.
        config (`SparseConfig`): targets, budget, dtype and seed.

    Returns:
        The same model, modified in place, with `model.sparse_config` set.

    Example:
        ```python
        >>> model = prepare_model(model, SparseConfig(lora_rank_equivalent=16))
        >>> print_trainable_parameters(model)
        ```
    """
    if any(True for _ in iter_sparse_layers(model)):
        raise ValueError("This model already has sparse layers; `prepare_model` must be called once per model.")
    names = find_targets(model, config.target_modules)
    modules = dict(model.named_modules())
    counts = allocate_budget([(modules[n].out_features, modules[n].in_features) for n in names], config)
    if config.initial_positions == "magnitude":
        indices = {n: magnitude_indices(modules[n], k) for n, k in zip(names, counts)}
    else:
        generator = torch.Generator().manual_seed(config.seed)
        indices = {n: random_indices(modules[n].weight.numel(), k, generator) for n, k in zip(names, counts)}
    return wrap_targets(model, indices, config)


@torch.no_grad()
def magnitude_indices(linear: nn.Module, count: int) -> torch.Tensor:
    """The sorted flat positions of the `count` largest |W0| entries (ties: the lower position), from the
    dequantised weight where the base is 4-bit: the entries a pretrained matrix already relies on most."""
    weight = linear.weight
    if getattr(weight, "quant_state", None) is not None:
        import bitsandbytes.functional as bnb_functional

        weight = bnb_functional.dequantize_4bit(weight.data, weight.quant_state)
    scores = weight.detach().reshape(-1).float().abs()
    return torch.topk(scores.cpu(), count, sorted=False).indices.sort().values


def wrap_targets(model: nn.Module, indices: dict[str, torch.Tensor], config: SparseConfig) -> nn.Module:
    """Freeze `model` and wrap the named Linear modules with the given indices (used by `load_adapter`)."""
    model.requires_grad_(False)
    values_dtype = getattr(torch, config.values_dtype)
    block_size = config.block_size if config.method == "smt" else None
    for name, idx in indices.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = SparseDeltaLinear(getattr(parent, child), idx, values_dtype, config.forward_strategy, block_size)
        setattr(parent, child, layer)
    model.sparse_config = config
    return model


def merge_adapter(model: nn.Module) -> nn.Module:
    """Fold every sparse delta into its base weight in place (inference without the extra product)."""
    for _, layer in require_sparse_layers(model):
        layer.merge()
    return model


def unmerge_adapter(model: nn.Module) -> nn.Module:
    """Undo `merge_adapter` exactly: the base entries are restored from the copies taken at merge time."""
    for _, layer in require_sparse_layers(model):
        layer.unmerge()
    return model


def require_sparse_layers(model: nn.Module) -> list[tuple[str, SparseDeltaLinear]]:
    layers = list(iter_sparse_layers(model))
    if not layers:
        raise ValueError("The model has no sparse layers; call `sparse_plugin.prepare_model(model, config)` first.")
    return layers


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts; a 4-bit packed weight counts as its unpacked size, as in PEFT."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if param.__class__.__name__ == "Params4bit":
            n *= 2
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """Print `trainable params: … || all params: … || trainable%: …` like PEFT's method of that name."""
    trainable, total = trainable_parameters(model)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")
