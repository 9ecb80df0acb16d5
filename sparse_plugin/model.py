"""Turning a model into a sparse fine-tune: find targets, share the budget, wrap, and merge in memory."""

from __future__ import annotations

import math
import re
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .config import ALL_LINEAR, ALL_WEIGHTS, SparseConfig
from .layer import SparseDeltaLinear, SparseDeltaTarget
from .parameter import SparseDeltaParameter
from .sizing import allocate_budget


def iter_sparse_layers(model: nn.Module) -> Iterator[tuple[str, SparseDeltaTarget]]:
    """Yield `(weight_key, layer)` for every sparse target (`SparseDeltaLinear`, `SparseDeltaParameter`), where
    `weight_key` is the state-dict key the base weight had before wrapping (`model.layers.0.self_attn.q_proj.weight`,
    `model.layers.0.mlp.experts.gate_up_proj`, also inside FSDP1's wrappers): the adapter's tensor names."""
    for name, module in model.named_modules():
        if isinstance(module, SparseDeltaLinear):
            yield f"{_WRAPPER_SEGMENT.sub('', name)}.weight", module
        elif isinstance(module, SparseDeltaParameter):
            owner = _WRAPPER_SEGMENT.sub("", name).rpartition(".")[0]
            yield f"{owner}.{module.param_name}" if owner else module.param_name, module


# Module names FSDP1 and its activation-checkpoint wrapper insert, which the base's state-dict keys do not have.
_WRAPPER_SEGMENT = re.compile(r"(?:_fsdp_wrapped_module|_checkpoint_wrapped_module)\.")
# `all-linear` on a model whose other weights hold more than this share of the targetable ones warns.
SKIPPED_SHARE_WARNING = 0.1


def _is_linear(module: nn.Module) -> bool:
    # bitsandbytes Linear4bit / Linear8bitLt subclass nn.Linear, so they count.
    return isinstance(module, nn.Linear)


def _is_conv1d(module: nn.Module) -> bool:
    """GPT-2's `Conv1D` (a linear projection stored in × out); no transformers import when none can exist."""
    utils = sys.modules.get("transformers.pytorch_utils")
    return utils is not None and isinstance(module, utils.Conv1D)


@dataclass
class _Weight:
    key: str  # state-dict key (the first, for a tied weight)
    module: str  # name of the owning module
    param: nn.Parameter
    linear: bool  # the weight of an nn.Linear or a Conv1D
    head: bool  # the output head's
    embedding: bool  # an input embedding's


def _weights(model: nn.Module) -> list[_Weight]:
    """Every weight of two or more dimensions, in model order, a tied one once (under its first key)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    special = {id(m.weight): m for m in (head, embeddings) if m is not None and isinstance(m.weight, torch.Tensor)}
    modules = dict(model.named_modules())
    found = []
    for key, param in model.named_parameters():
        if param.dim() < 2:
            continue
        module_name, _, name = key.rpartition(".")
        module = modules[module_name]
        owner = special.get(id(param))
        found.append(
            _Weight(
                key,
                module_name,
                param,
                linear=name == "weight" and (_is_linear(module) or _is_conv1d(module)),
                head=owner is not None and owner is head,
                embedding=isinstance(module, nn.Embedding) or (owner is not None and owner is embeddings),
            )
        )
    return found


def find_target_weights(
    model: nn.Module, target_modules: str | list[str] | None, target_parameters: str | list[str] | None = None
) -> list[str]:
    """State-dict keys of the weights the two options select (see `SparseConfig`), in model order.

    Raises `ValueError` for a list entry that matches nothing, naming it and the names available, and when the
    options select nothing.
    """
    weights = _weights(model)
    chosen: set[str] = set()
    if target_modules == ALL_LINEAR:
        chosen |= {w.key for w in weights if w.linear and not w.head}
        _warn_if_all_linear_skips(model, weights)
    elif target_modules == ALL_WEIGHTS:
        chosen |= {w.key for w in weights if not w.head and not w.embedding}
    elif target_modules is not None:
        chosen |= _match(model, weights, target_modules, lambda w: w.module, "target_modules", "module")
    if target_parameters is not None:
        chosen |= _match(model, weights, target_parameters, lambda w: w.key, "target_parameters", "parameter")
    if not chosen:
        raise ValueError(
            f"`target_modules`={target_modules!r}, `target_parameters`={target_parameters!r} select no weight of "
            f"{type(model).__name__}."
        )
    return [w.key for w in weights if w.key in chosen]


def _match(model, weights: list[_Weight], targets: str | list[str], name_of, option: str, kind: str) -> set[str]:
    names = [name_of(w) for w in weights]
    if isinstance(targets, str):
        return {w.key for w, name in zip(weights, names) if re.fullmatch(targets, name)}
    for suffix in targets:
        if not any(_matches_suffix(name, suffix) for name in names):
            available = sorted({name.rsplit(".", 1)[-1] if kind == "module" else _short(name) for name in names})
            raise ValueError(
                f"`{option}` entry {suffix!r} matches no {'module with a weight' if kind == 'module' else 'weight'} of "
                f"{type(model).__name__}; "
                f"available suffixes: {available}."
            )
    return {w.key for w, name in zip(weights, names) if any(_matches_suffix(name, s) for s in targets)}


def _short(key: str) -> str:
    """The last two segments of a parameter key (`experts.down_proj`): a suffix that names it in every layer."""
    return ".".join(key.rsplit(".", 2)[-2:])


def _warn_if_all_linear_skips(model: nn.Module, weights: list[_Weight]) -> None:
    """`all-linear` leaves out fused MoE experts (3-D parameters, not `nn.Linear`s): say so when they hold a large
    share of the weights, with the option that covers them."""
    targetable = [w for w in weights if not w.head and not w.embedding]
    skipped = [w for w in targetable if not w.linear]
    total = sum(w.param.numel() for w in targetable)
    share = sum(w.param.numel() for w in skipped) / total if total else 0.0
    if share > SKIPPED_SHARE_WARNING:
        examples = sorted({_short(w.key) for w in skipped})[:3]
        warnings.warn(
            f"target_modules='all-linear' leaves out {share:.0%} of {type(model).__name__}'s weights (not nn.Linear: "
            f"{', '.join(examples)}); set target_modules='all-weights' to train them too.",
            UserWarning,
            stacklevel=4,
        )


def find_targets(model: nn.Module, target_modules: str | list[str]) -> list[str]:
    """Names of the `nn.Linear`/`Conv1D` modules whose weight `target_modules` selects, in model order (the
    module-level view of `find_target_weights`)."""
    linear = {w.key for w in _weights(model) if w.linear}
    return [key.removesuffix(".weight") for key in find_target_weights(model, target_modules) if key in linear]


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
    """Freeze `model` and give each target weight a sparse delta at its initial indices (random, or the
    largest-magnitude entries with `initial_positions="magnitude"`): a target `nn.Linear` is wrapped in a
    `SparseDeltaLinear`, any other weight (fused MoE experts, `Conv1D`, embeddings) gets a `SparseDeltaParameter`
    beside it.

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
    shapes = target_shapes(model, config)
    counts = allocate_budget(list(shapes.values()), config)
    if config.initial_positions == "magnitude":
        params = dict(model.named_parameters())
        indices = {key: magnitude_indices(params[key], k) for key, k in zip(shapes, counts)}
    else:
        generator = torch.Generator().manual_seed(config.seed)
        indices = {
            key: random_indices(math.prod(shape), k, generator) for (key, shape), k in zip(shapes.items(), counts)
        }
    return wrap_targets(model, indices, config)


@torch.no_grad()
def magnitude_indices(weight: torch.Tensor, count: int) -> torch.Tensor:
    """The sorted flat positions of the `count` largest |W0| entries, from the dequantised weight where the base
    is 4-bit: the entries a pretrained matrix already relies on most."""
    if getattr(weight, "quant_state", None) is not None:
        import bitsandbytes.functional as bnb_functional

        weight = bnb_functional.dequantize_4bit(weight.data, weight.quant_state)
    scores = weight.detach().reshape(-1).float().abs()
    return torch.topk(scores.cpu(), count, sorted=False).indices.sort().values


def target_shapes(model: nn.Module, config: SparseConfig) -> dict[str, tuple[int, ...]]:
    """Shape of each weight the config targets, by state-dict key, in model order (a Linear's as (out, in))."""
    params = dict(model.named_parameters())
    return {
        key: tuple(params[key].shape)
        for key in find_target_weights(model, config.target_modules, config.target_parameters)
    }


def wrap_targets(model: nn.Module, indices: dict[str, torch.Tensor], config: SparseConfig) -> nn.Module:
    """Freeze `model` and give the weights named by state-dict key their sparse deltas with the given indices (used
    by `load_adapter`)."""
    model.requires_grad_(False)
    values_dtype = getattr(torch, config.values_dtype)
    block_size = config.block_size if config.method == "smt" else None
    for key, idx in indices.items():
        module_name, _, name = key.rpartition(".")
        owner = model.get_submodule(module_name)
        if _is_linear(owner) and name == "weight":
            parent_name, _, child = module_name.rpartition(".")
            layer = SparseDeltaLinear(owner, idx, values_dtype, config.forward_strategy, block_size)
            setattr(model.get_submodule(parent_name), child, layer)
            continue
        if config.forward_strategy == "additive":
            raise ValueError(
                f"forward_strategy='additive' applies to nn.Linear targets only, and `{key}` is a "
                f"{type(owner).__name__} weight, which is trained merged (W0 + Δ held in the weight); use 'auto'."
            )
        param = owner._parameters[name]
        owners = [owner] + [m for m in model.modules() if m is not owner and m._parameters.get(name) is param]
        owner.add_module(f"sparse_{name}", SparseDeltaParameter(owner, name, idx, values_dtype, owners))
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


def require_sparse_layers(model: nn.Module) -> list[tuple[str, SparseDeltaTarget]]:
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
