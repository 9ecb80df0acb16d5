"""The adapter on disk: `sparse_config.json` + `sparse_adapter.safetensors`, and their validation.

Tensors are named by the base model's state-dict key of each targeted weight:
`<key>.indices` (int32 when the matrix has < 2^31 entries, else int64), `<key>.values` and, by default,
`<key>.base_values` (the base weight's entries at the indices, for a bit-exact unmerge). Every reader goes
through `read_adapter`, which refuses anything inconsistent with one line naming the file, the tensor and
the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import uuid
from importlib.metadata import version as package_version
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .config import SparseConfig
from .layer import SparseDeltaLinear, dense_base_weight
from .model import require_sparse_layers, iter_sparse_layers, wrap_targets

FORMAT_VERSION = 1
CONFIG_NAME = "sparse_config.json"
WEIGHTS_NAME = "sparse_adapter.safetensors"
_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}
_INT32_LIMIT = 2**31


class AdapterError(ValueError):
    """An adapter directory, or the base it is applied to, is missing, corrupt or inconsistent."""


@dataclass
class TargetDelta:
    """The sparse delta of one base weight."""

    key: str
    shape: tuple[int, int]
    base_dtype: str
    indices: torch.Tensor  # int64, sorted, unique
    values: torch.Tensor
    base_values: torch.Tensor | None


@dataclass
class Adapter:
    """A validated adapter: its json metadata, config and per-target deltas."""

    path: Path
    meta: dict
    config: SparseConfig
    targets: dict[str, TargetDelta]

    @property
    def has_base_values(self) -> bool:
        return bool(self.meta["has_base_values"])

    @property
    def base_model(self) -> str | None:
        return self.meta.get("base_model")


def dtype_code(dtype: torch.dtype) -> str:
    """safetensors' name of a dtype (`F32`, `BF16`, …), the spelling checkpoint headers use."""
    return _ST_DTYPES.get(dtype, str(dtype).removeprefix("torch."))


def fingerprint(entries: dict[str, tuple[tuple[int, ...], str]]) -> str:
    """sha256 of the sorted (name, shape, dtype) of the targeted base tensors."""
    rows = sorted((key, list(shape), dtype) for key, (shape, dtype) in entries.items())
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


# --------------------------------------------------------------------------------------------- writing


def _base_values(layer: SparseDeltaLinear) -> torch.Tensor | None:
    if layer.merged:
        return layer._merged_base_values
    try:
        return dense_base_weight(layer.base_layer).detach().view(-1)[layer.indices]
    except TypeError:  # a quantised base has no exact entries to restore
        return None


def save_adapter(model: nn.Module, save_directory: str | os.PathLike, base_model_name_or_path: str | None = None) -> None:
    """Write the model's sparse deltas to `save_directory` (created if needed).

    Each file is written to a temporary name and renamed, so a crash leaves the previous adapter (or none),
    never half a file; a `save_id` shared by both files exposes a json/safetensors pair from two saves.

    Args:
        model (`nn.Module`): a model prepared with `prepare_model` or `load_adapter`.
        save_directory (`str` or `PathLike`): target directory; other files in it are left alone.
        base_model_name_or_path (`str`, *optional*): recorded as the base; defaults to the model config's
            `_name_or_path`.

    Example:
        ```python
        >>> save_adapter(model, "out/adapter")
        ```
    """
    layers = require_sparse_layers(model)
    config: SparseConfig = model.sparse_config
    tensors, targets = {}, {}
    for key, layer in layers:
        base_weight = layer.base_layer.weight
        targets[key] = {"shape": list(layer.shape), "count": layer.indices.numel(), "dtype": dtype_code(base_weight.dtype)}
        index_dtype = torch.int32 if layer.out_features * layer.in_features < _INT32_LIMIT else torch.int64
        tensors[f"{key}.indices"] = layer.indices.to(index_dtype)
        tensors[f"{key}.values"] = layer.values.detach()
        base_values = _base_values(layer) if config.store_base_values else None
        if base_values is not None:
            tensors[f"{key}.base_values"] = base_values
    has_base_values = all(f"{key}.base_values" in tensors for key in targets)
    if not has_base_values:  # all or nothing, so readers need no per-tensor case
        tensors = {k: v for k, v in tensors.items() if not k.endswith(".base_values")}
    trained = sum(t["count"] for t in targets.values())
    size = sum(t["shape"][0] * t["shape"][1] for t in targets.values())
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    save_id = uuid.uuid4().hex
    meta = {
        "format": FORMAT_VERSION,
        "sparse_plugin_version": package_version("sparse-plugin"),
        "save_id": save_id,
        "method": config.method,
        "density": trained / size,
        "num_params": trained,
        "base_model": base_model_name_or_path,
        "base_fingerprint": fingerprint({k: (tuple(t["shape"]), t["dtype"]) for k, t in targets.items()}),
        "has_base_values": has_base_values,
        "config": config.to_dict(),
        "targets": targets,
    }
    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt", "save_id": save_id}))
    _atomic_write(directory / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(meta, indent=2, sort_keys=True)))


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------- reading


def _fail(where: Path | str, message: str) -> AdapterError:
    return AdapterError(f"{where}: {message}")


def _read_meta(directory: Path) -> dict:
    path = directory / CONFIG_NAME
    if not directory.is_dir():
        raise _fail(directory, "adapter directory not found; pass the directory that save_adapter wrote")
    if not path.is_file():
        raise _fail(path, f"missing; an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise _fail(path, f"not valid JSON ({err}); the adapter is corrupt, save it again") from None
    if not isinstance(meta, dict):
        raise _fail(path, "not a JSON object; the adapter is corrupt, save it again")
    version = meta.get("format")
    if not isinstance(version, int) or isinstance(version, bool):
        raise _fail(path, f"`format` is {version!r}, not an integer; the adapter is corrupt, save it again")
    if version > FORMAT_VERSION:
        raise _fail(path, f"format {version} is newer than this sparse_plugin reads ({FORMAT_VERSION}); upgrade sparse-plugin")
    for field, kind in (("targets", dict), ("config", dict), ("has_base_values", bool), ("save_id", str)):
        if not isinstance(meta.get(field), kind):
            raise _fail(path, f"`{field}` is missing or not a {kind.__name__}; the adapter is corrupt, save it again")
    return meta


def _read_tensors(directory: Path, save_id: str) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise _fail(path, f"missing; an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        tensors = load_file(path)
        with safe_open(path, framework="pt") as fh:
            file_id = (fh.metadata() or {}).get("save_id")
    except Exception as err:  # safetensors raises several types for malformed headers and data
        raise _fail(path, f"not a readable safetensors file ({type(err).__name__}: {err}); the adapter is corrupt, save it again") from None
    if file_id != save_id:
        raise _fail(path, f"save_id {file_id!r} differs from {CONFIG_NAME}'s {save_id!r}: the two files come from different saves")
    return tensors


def _target_entry(path: Path, key: str, entry) -> tuple[tuple[int, int], int, str]:
    try:
        shape = tuple(int(d) for d in entry["shape"])
        count = int(entry["count"])
        dtype = str(entry["dtype"])
    except (TypeError, KeyError, ValueError):
        raise _fail(path, f"target `{key}` needs `shape`, `count` and `dtype`; the adapter is corrupt, save it again") from None
    if len(shape) != 2 or min(shape) < 1 or not 0 <= count <= shape[0] * shape[1]:
        raise _fail(path, f"target `{key}` has shape {list(shape)} and count {count}, which do not fit; save it again")
    return shape, count, dtype


def validate_delta(where: Path | str, key: str, shape: tuple[int, int], count: int, indices, values, base_values) -> torch.Tensor:
    """Check one target's tensors against its recorded shape and count; return the indices as int64."""
    fix = "the adapter is corrupt or was edited; save it again"
    if indices.dtype not in (torch.int32, torch.int64) or indices.dim() != 1:
        raise _fail(where, f"tensor `{key}.indices` must be 1-D int32/int64, got {indices.dtype} {list(indices.shape)}; {fix}")
    if not values.is_floating_point() or values.dim() != 1:
        raise _fail(where, f"tensor `{key}.values` must be a 1-D float tensor, got {values.dtype} {list(values.shape)}; {fix}")
    for name, tensor in (("indices", indices), ("values", values), ("base_values", base_values)):
        if tensor is not None and tensor.numel() != count:
            raise _fail(where, f"tensor `{key}.{name}` has {tensor.numel()} entries but the config says {count}; {fix}")
    indices = indices.long()
    numel = shape[0] * shape[1]
    if count and (int(indices.min()) < 0 or int(indices.max()) >= numel):
        raise _fail(where, f"tensor `{key}.indices` has positions outside [0, {numel}) for shape {list(shape)}; {fix}")
    if count > 1 and not bool((indices[1:] > indices[:-1]).all()):
        raise _fail(where, f"tensor `{key}.indices` is not sorted and unique; {fix}")
    for name, tensor in (("values", values), ("base_values", base_values)):
        if tensor is not None and not bool(torch.isfinite(tensor).all()):
            raise _fail(where, f"tensor `{key}.{name}` holds NaN or inf; retrain from a checkpoint before the divergence")
    return indices


def read_adapter(adapter_dir: str | os.PathLike) -> Adapter:
    """Read and validate an adapter directory; raise `AdapterError` naming the first problem found."""
    directory = Path(adapter_dir)
    meta = _read_meta(directory)
    config_path = directory / CONFIG_NAME
    try:
        config = SparseConfig.from_dict(meta["config"])
    except (ValueError, TypeError) as err:
        raise _fail(config_path, f"invalid `config`: {err}") from None
    tensors = _read_tensors(directory, meta["save_id"])
    suffixes = ("indices", "values", "base_values") if meta["has_base_values"] else ("indices", "values")
    expected = {f"{key}.{s}" for key in meta["targets"] for s in suffixes}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise _fail(directory / WEIGHTS_NAME, f"tensors do not match {CONFIG_NAME} (missing {missing[:3]}, unexpected {extra[:3]}); save it again")
    targets = {}
    for key, entry in meta["targets"].items():
        shape, count, dtype = _target_entry(config_path, key, entry)
        base_values = tensors.get(f"{key}.base_values")
        indices = validate_delta(directory / WEIGHTS_NAME, key, shape, count, tensors[f"{key}.indices"], tensors[f"{key}.values"], base_values)
        targets[key] = TargetDelta(key, shape, dtype, indices, tensors[f"{key}.values"], base_values)
    return Adapter(directory, meta, config, targets)


# --------------------------------------------------------------------------------------------- loading


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike, check_base: bool = True) -> nn.Module:
    """Load an adapter into `model`, wrapping its targets first if it has no sparse layers yet.

    Args:
        model (`nn.Module`): the base model (plain, or already prepared with the same targets).
        adapter_dir (`str` or `PathLike`): a directory written by `save_adapter`.
        check_base (`bool`, defaults to `True`): compare the stored base values with the model's weights
            and refuse a different base.

    Returns:
        The model, with indices and values set.

    Example:
        ```python
        >>> model = AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")
        >>> model = load_adapter(model, "out/adapter")
        ```
    """
    adapter = read_adapter(adapter_dir)
    layers = dict(iter_sparse_layers(model))
    if not layers:
        modules = dict(model.named_modules())
        for key, target in adapter.targets.items():
            module = modules.get(key.removesuffix(".weight"))
            if not isinstance(module, nn.Linear) or (module.out_features, module.in_features) != target.shape:
                raise _fail(adapter.path, f"target `{key}` (shape {list(target.shape)}) has no matching Linear in {type(model).__name__}; load the base the adapter was trained on")
            if check_base and target.base_values is not None:  # before wrapping: a refusal leaves the model as it was
                _check_base_values(adapter.path, key, module, target)
        wrap_targets(model, {k.removesuffix(".weight"): t.indices for k, t in adapter.targets.items()}, adapter.config)
        layers = dict(iter_sparse_layers(model))
    if set(layers) != set(adapter.targets):
        raise _fail(adapter.path, f"targets differ from the model's sparse layers (e.g. {sorted(set(layers) ^ set(adapter.targets))[:3]}); prepare the model with the adapter's target_modules or load into an unprepared base")
    for key, layer in layers.items():
        target = adapter.targets[key]
        if layer.shape != target.shape:
            raise _fail(adapter.path, f"target `{key}` has shape {list(target.shape)} but the model's is {list(layer.shape)}")
        if check_base and target.base_values is not None:
            _check_base_values(adapter.path, key, layer.base_layer, target)
    for key, layer in layers.items():  # only once every target passed, so a refusal changes nothing
        _set_delta(layer, adapter.targets[key])
    model.sparse_config = adapter.config
    return model


def _check_base_values(path: Path, key: str, base_layer: nn.Module, target: TargetDelta) -> None:
    try:
        weight = dense_base_weight(base_layer)
    except TypeError:
        return
    current = weight.detach().view(-1)[target.indices.to(weight.device)]
    if not torch.equal(current, target.base_values.to(device=current.device, dtype=current.dtype)):
        raise _fail(path, f"the model's `{key}` differs from the base the adapter was trained on; load that base, or pass check_base=False")


@torch.no_grad()
def _set_delta(layer: SparseDeltaLinear, target: TargetDelta) -> None:
    device = layer.values.device
    indices, values = target.indices.to(device), target.values.to(device=device, dtype=layer.values.dtype)
    if indices.numel() == layer.indices.numel():
        layer.indices.copy_(indices)
        layer.values.copy_(values)
    else:  # a differently sized budget: replace, keeping the same Parameter object
        layer.indices = indices
        layer.values.data = values
