"""The adapter on disk: `sparse_config.json` + `sparse_adapter.safetensors`, and their validation.

Tensors are named by the base model's state-dict key of each targeted weight:
`<key>.indices` (int32 when the matrix has < 2^31 entries, else int64), `<key>.values` and, by default,
`<key>.base_values` (the base weight's entries at the indices, for a bit-exact unmerge). Each target's entry
in `sparse_config.json` also records `base_sha256` and `merged_sha256`, digests of the base's entries at the
indices before and after the merge (`entries_digest`): a few bytes that let a merge, unmerge or load refuse the
wrong base or merged model even when the adapter stores no base values. Every reader goes through
`read_adapter`, which refuses anything inconsistent with one line naming the file, the tensor and the fix.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import version as package_version
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .atomic import write_files
from .config import SparseConfig
from .kernels.scatter import scatter_add_
from .model_card import CARD_NAME, card_writer

# The model side (layer, model, fsdp) is imported inside the functions that handle a model: `sparse-merge` only
# reads adapters, and the layer module brings in torch's compiler stack (seconds at start-up).
if TYPE_CHECKING:
    from .layer import SparseDeltaTarget

FORMAT_VERSION = 1
CONFIG_NAME = "sparse_config.json"
WEIGHTS_NAME = "sparse_adapter.safetensors"
_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}
_INT32_LIMIT = 2**31
_MAX_NUMEL = 2**63 - 1  # torch's (int64) limit: no real weight has more entries
_MAX_DIMS = 4  # matrices, stacked matrices (fused MoE experts), and room for one more leading dimension
_FLOAT_DTYPES = tuple(_ST_DTYPES)  # the dtypes values and base values may have on disk


class AdapterError(ValueError):
    """An adapter directory, or the base it is applied to, is missing, corrupt or inconsistent.

    The message is always one line (`sparse-merge` prints it as its only output): line breaks inside names read
    from a hostile file are shown as `\\n`.
    """

    def __init__(self, message: str) -> None:
        super().__init__("\\n".join(str(message).splitlines()))


@dataclass
class TargetDelta:
    """The sparse delta of one base weight."""

    key: str
    shape: tuple[int, ...]  # the weight's own shape: (out, in) of a Linear, (E, out, in) of fused experts
    base_dtype: str
    indices: torch.Tensor  # int64, sorted, unique
    values: torch.Tensor
    base_values: torch.Tensor | None
    base_sha256: str | None = None  # `entries_digest` of the base at the indices; None in adapters saved before it
    merged_sha256: str | None = None  # the same, of the merged model


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


# What `targets[key]["dtype"]` records for a bitsandbytes base: the scheme, not the packed storage dtype. The
# unquantised checkpoint of any float dtype is then the right base to merge into.
QUANTIZED_DTYPES = ("NF4", "FP4", "INT8")


def base_dtype_code(weight: torch.Tensor) -> str:
    """The recorded dtype of a base weight: safetensors' code, or the bitsandbytes scheme of a quantised one."""
    kind = type(weight).__name__
    if kind == "Params4bit":
        return str(getattr(weight, "quant_type", "nf4")).upper()
    if kind == "Int8Params":
        return "INT8"
    return dtype_code(weight.dtype)


def entries_digest(entries: torch.Tensor) -> str:
    """sha256 of a weight's entries at an adapter's indices, as stored (dtype and bytes, little-endian).

    Recorded per target by `save_adapter` for the base (`base_sha256`) and for the merged model (`merged_sha256`:
    the entries plus the values, added in fp32 and rounded once, which is what every merge path computes, bit for
    bit); compared by the merge, the unmerge and `load_adapter`.
    """
    data = entries.detach().contiguous().cpu()
    return hashlib.sha256(
        dtype_code(data.dtype).encode() + data.view(-1).view(torch.uint8).numpy().tobytes()
    ).hexdigest()


def merged_entries(entries: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The entries a merge writes: `entries + values` in fp32, rounded once to the entries' dtype (the merge's own
    scatter, so the result is the merged model's, not an estimate)."""
    values = values.to(entries.device)
    return scatter_add_(entries.clone(), torch.arange(len(entries), device=entries.device), values)


def fingerprint(entries: dict[str, tuple[tuple[int, ...], str]]) -> str:
    """sha256 of the sorted (name, shape, dtype) of the targeted base tensors."""
    rows = sorted((key, list(shape), dtype) for key, (shape, dtype) in entries.items())
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


# --------------------------------------------------------------------------------------------- writing


def _base_values(key: str, layer: SparseDeltaTarget, required: bool = True) -> torch.Tensor | None:
    """The base weight's entries at the layer's indices; None for a quantised base (it has no exact entries), and
    for a base FSDP shards unless `required`."""
    from .fsdp import is_whole

    try:
        weight = layer.dense_weight()
    except TypeError:  # a quantised base has no exact entries to restore
        return None
    if not is_whole(weight, layer.weight_shape):
        if not required:
            return None
        raise ValueError(
            f"the base weight of `{key}` is sharded (FSDP): gather its entries on every rank with "
            "`sparse_plugin.fsdp.gathered_base_values(model)` and pass them as `base_values=`, or set store_base_values=False"
        )
    return layer.base_entries()


def save_adapter(
    model: nn.Module,
    save_directory: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    base_values: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Write the model's sparse deltas to `save_directory` (created if needed), with a `README.md` model card.

    Both files are written in full under temporary names before either is renamed into place, so a crash
    or a full disk while writing leaves the previous adapter (or no directory at all), never half a file. A
    kill between the two renames leaves a json/safetensors pair from two saves, which the `save_id` they
    share exposes to every reader.

    Each target also records `base_sha256` and `merged_sha256` (`entries_digest` of the base's entries at the
    indices, and of those entries with the values merged in), whether or not the base values are stored: with
    `store_base_values=False` they are what lets a merge refuse another base and an unmerge refuse a model this
    adapter did not make. A bitsandbytes base has no exact entries (the merge goes into its unquantised
    checkpoint, whose entries the quantised model cannot know), so it records none and merges unchecked, as
    adapters saved before the digests do. A base FSDP shards needs its entries passed as `base_values` (what
    `SparseCallback` does, stored or not); without them its digests are left out.

    Args:
        model (`nn.Module`): a model prepared with `prepare_model` or `load_adapter`.
        save_directory (`str` or `PathLike`): target directory; other files in it are left alone, and so is a
            `README.md` that this library did not write.
        base_model_name_or_path (`str`, *optional*): recorded as the base; defaults to the model config's
            `_name_or_path`.
        base_values (`Mapping[str, torch.Tensor]`, *optional*): the base weight at each target's indices, by key,
            for a model whose base FSDP shards (`sparse_plugin.fsdp.gathered_base_values`); read from the model
            otherwise.

    Example:
        ```python
        >>> save_adapter(model, "out/adapter")
        ```
    """
    from .model import require_sparse_layers

    layers = require_sparse_layers(model)
    config: SparseConfig = model.sparse_config
    if base_values is not None and (missing := [key for key, _ in layers if key not in base_values]):
        raise ValueError(
            f"`base_values` lacks `{missing[0]}` ({len(missing)} target(s) missing); gather them with "
            "`sparse_plugin.fsdp.gathered_base_values(model)`."
        )
    tensors, targets = {}, {}
    for key, layer in layers:
        dtype = base_dtype_code(layer.stored_weight())
        targets[key] = {"shape": list(layer.weight_shape), "count": layer.indices.numel(), "dtype": dtype}
        index_dtype = torch.int32 if math.prod(layer.weight_shape) < _INT32_LIMIT else torch.int64
        tensors[f"{key}.indices"] = layer.indices.to(index_dtype)
        tensors[f"{key}.values"] = layer.values.detach()
        base = base_values[key] if base_values is not None else _base_values(key, layer, config.store_base_values)
        if base is not None:
            # Computed even when the base values are not stored: the digests are what then checks the base.
            targets[key].update(
                base_sha256=entries_digest(base),
                merged_sha256=entries_digest(merged_entries(base, tensors[f"{key}.values"])),
            )
            if config.store_base_values:
                tensors[f"{key}.base_values"] = base
    has_base_values = all(f"{key}.base_values" in tensors for key in targets)
    if not has_base_values:  # all or nothing, so readers need no per-tensor case
        tensors = {k: v for k, v in tensors.items() if not k.endswith(".base_values")}
    trained = sum(t["count"] for t in targets.values())
    size = sum(math.prod(t["shape"]) for t in targets.values())
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
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    writers = {
        WEIGHTS_NAME: lambda p: save_file(tensors, p, metadata={"format": "pt", "save_id": save_id}),
        CONFIG_NAME: lambda p: p.write_text(json.dumps(meta, indent=2, sort_keys=True)),
    }
    revision = getattr(getattr(model, "config", None), "_commit_hash", None)  # set by from_pretrained on Hub models
    if (card := card_writer(Path(save_directory), meta, type(model).__name__, revision)) is not None:
        writers[CARD_NAME] = card
    write_files(Path(save_directory), writers, fix="free space or save to another directory")


# --------------------------------------------------------------------------------------------- reading

# The config of a 405B-parameter model's adapter (~900 targets) is ~150 KB; a bound far above that keeps a
# hostile or mistaken file (a symlink to a dataset, say) from being read into memory whole.
_MAX_CONFIG_BYTES = 16 * 2**20
_MAX_QUOTE = 200
_CORRUPT = "the adapter is corrupt or was edited; save it again"


def _fail(where: Path | str, message: str) -> AdapterError:
    return AdapterError(f"{where}: {message}")


def quote(value) -> str:
    """`repr` of a value read from a file, bounded in length so that an error naming it stays short."""
    text = repr(value)
    return text if len(text) <= _MAX_QUOTE else f"{text[:_MAX_QUOTE]}..."


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """JSON object hook refusing a repeated key: parsers disagree on which copy wins (Python's and
    safetensors' keep the last, others the first), so a file with one means different things to different readers."""
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {quote(key)}")
        seen[key] = value
    return seen


def _parse_json(raw: bytes):
    return json.loads(raw, object_pairs_hook=_unique_keys)


def _read_meta(directory: Path) -> dict:
    path = directory / CONFIG_NAME
    if not directory.is_dir():
        raise _fail(directory, "adapter directory not found; pass the directory that save_adapter wrote")
    if not path.is_file():
        from .peft_interop import PEFT_CONFIG_NAME  # peft_interop imports this module

        if (directory / PEFT_CONFIG_NAME).is_file():
            raise _fail(
                directory,
                "a PEFT adapter, not a sparse_plugin one; `sparse-merge merge` folds PEFT SHiRA and "
                "Super-Tuning adapters into a base, PeftModel.from_pretrained loads them",
            )
        raise _fail(path, f"missing; an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    with open(path, "rb") as fh:
        raw = fh.read(_MAX_CONFIG_BYTES + 1)
    if len(raw) > _MAX_CONFIG_BYTES:
        raise _fail(path, f"larger than {_MAX_CONFIG_BYTES >> 20} MiB, far beyond any adapter's config; {_CORRUPT}")
    try:
        meta = _parse_json(raw)
    except (ValueError, RecursionError) as err:  # RecursionError: deeply nested arrays
        raise _fail(path, f"not valid JSON ({type(err).__name__}: {err}); {_CORRUPT}") from None
    if not isinstance(meta, dict):
        raise _fail(path, f"not a JSON object; {_CORRUPT}")
    _check_format(path, meta.get("format"))
    for field, kind in (("targets", dict), ("config", dict), ("has_base_values", bool), ("save_id", str)):
        if not isinstance(meta.get(field), kind):
            raise _fail(path, f"`{field}` is missing or not a {kind.__name__}; {_CORRUPT}")
    if not meta["targets"]:
        raise _fail(path, f"`targets` is empty, so the adapter changes nothing; {_CORRUPT}")
    return meta


def _check_format(path: Path, version) -> None:
    """Refuse a format this version cannot read: a newer one may store tensors it would silently ignore."""
    if not _is_int(version) or version < 1:
        raise _fail(path, f"`format` is {quote(version)}, not a format version (a positive integer); {_CORRUPT}")
    if version > FORMAT_VERSION:
        raise _fail(
            path, f"format {version} is newer than this sparse_plugin reads ({FORMAT_VERSION}); upgrade sparse-plugin"
        )


def _read_tensors(directory: Path, save_id: str) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise _fail(path, f"missing; an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        # safetensors bounds the header (100 MB), checks every offset against the file's size before reading
        # any data, and refuses overlaps and gaps; it lets a repeated tensor name pass, which _header refuses.
        tensors = load_file(path)
        file_id = (_header(path).get("__metadata__") or {}).get("save_id")
    except Exception as err:  # safetensors raises several types for malformed headers and data
        raise _fail(path, f"not a readable safetensors file ({type(err).__name__}: {err}); {_CORRUPT}") from None
    if file_id != save_id:
        raise _fail(
            path,
            f"save_id {quote(file_id)} differs from {CONFIG_NAME}'s {save_id!r}: the two files "
            "come from different saves (one was interrupted or copied over); save the adapter again",
        )
    return tensors


def _header(path: Path) -> dict:
    """The JSON header of a safetensors file that `load_file` has already accepted (so its length is sane)."""
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        return _parse_json(fh.read(length))


_DIGEST_FIELDS = ("base_sha256", "merged_sha256")


def _target_entry(path: Path, key: str, entry) -> tuple[tuple[int, ...], int, str, str | None, str | None]:
    """The recorded (shape, count, base dtype, base and merged digests) of one target, refusing anything but exact
    integers and, where present, sha256 hex digests (adapters saved before the digests have none)."""
    if not all(key.split(".")):  # else load_adapter would look for a parameter no model can have
        raise _fail(path, f"target {quote(key)} is not a parameter's state-dict key (`<module>.<name>`); {_CORRUPT}")
    shape, count, dtype = (
        (entry.get(f) for f in ("shape", "count", "dtype")) if isinstance(entry, dict) else (None,) * 3
    )
    if not (
        isinstance(shape, list)
        and 2 <= len(shape) <= _MAX_DIMS
        and all(map(_is_int, shape))
        and _is_int(count)
        and isinstance(dtype, str)
    ):
        raise _fail(
            path,
            f"target `{key}` needs `shape` (two to {_MAX_DIMS} integers), `count` (an integer) and `dtype`; {_CORRUPT}",
        )
    if min(shape) < 1 or math.prod(shape) > _MAX_NUMEL or not 0 <= count <= math.prod(shape):
        raise _fail(path, f"target `{key}` has shape {quote(shape)} and count {count}, which do not fit; {_CORRUPT}")
    digests = tuple(entry.get(field) for field in _DIGEST_FIELDS)
    for field, digest in zip(_DIGEST_FIELDS, digests):
        if digest is not None and not (
            isinstance(digest, str) and len(digest) == 64 and set(digest) <= set("0123456789abcdef")
        ):
            raise _fail(path, f"target `{key}` has `{field}` {quote(digest)}, not a sha256 hex digest; {_CORRUPT}")
    return (tuple(shape), count, dtype, *digests)


def _check_vector(
    where: Path | str, name: str, tensor: torch.Tensor, dtypes: tuple[torch.dtype, ...], count: int
) -> None:
    if tensor.dtype not in dtypes or tensor.dim() != 1:
        allowed = "/".join(str(d).removeprefix("torch.") for d in dtypes)
        raise _fail(
            where, f"tensor `{name}` must be 1-D {allowed}, got {tensor.dtype} {list(tensor.shape)}; {_CORRUPT}"
        )
    if tensor.numel() != count:
        raise _fail(where, f"tensor `{name}` has {tensor.numel()} entries but the config says {count}; {_CORRUPT}")


def validate_delta(
    where: Path | str, key: str, shape: tuple[int, ...], count: int, indices, values, base_values
) -> torch.Tensor:
    """Check one target's tensors against its recorded shape and count; return the indices as int64.

    Values must be one of the float dtypes a model is stored in: others (float8, say) have no `isfinite`.
    """
    _check_vector(where, f"{key}.indices", indices, (torch.int32, torch.int64), count)
    for name, tensor in (("values", values), ("base_values", base_values)):
        if tensor is not None:
            _check_vector(where, f"{key}.{name}", tensor, _FLOAT_DTYPES, count)
    indices = indices.long()
    numel = math.prod(shape)
    if count and (int(indices.min()) < 0 or int(indices.max()) >= numel):
        raise _fail(
            where, f"tensor `{key}.indices` has positions outside [0, {numel}) for shape {list(shape)}; {_CORRUPT}"
        )
    if count > 1 and not bool((indices[1:] > indices[:-1]).all()):
        raise _fail(where, f"tensor `{key}.indices` is not sorted and unique; {_CORRUPT}")
    for name, tensor in (("values", values), ("base_values", base_values)):
        if tensor is not None and not bool(torch.isfinite(tensor).all()):
            raise _fail(
                where, f"tensor `{key}.{name}` holds NaN or inf; retrain from a checkpoint before the divergence"
            )
    return indices


def read_adapter(adapter_dir: str | os.PathLike) -> Adapter:
    """Read and validate an adapter directory; raise `AdapterError` naming the first problem found.

    Symlinked files are followed: the Hugging Face hub cache links every file of a snapshot to `../../blobs/`.
    Whatever a link points to is validated like any other file, and no error quotes its contents.
    """
    directory = Path(adapter_dir)
    meta = _read_meta(directory)
    config_path = directory / CONFIG_NAME
    try:
        config = SparseConfig.from_dict(meta["config"])
    except (ValueError, TypeError) as err:
        raise _fail(config_path, f"invalid `config` ({err}); {_CORRUPT}") from None
    entries = {key: _target_entry(config_path, key, entry) for key, entry in meta["targets"].items()}
    tensors = _read_tensors(directory, meta["save_id"])
    suffixes = ("indices", "values", "base_values") if meta["has_base_values"] else ("indices", "values")
    expected = {f"{key}.{s}" for key in entries for s in suffixes}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise _fail(
            directory / WEIGHTS_NAME,
            f"tensors do not match {CONFIG_NAME} (missing {quote(missing[:3])}, "
            f"unexpected {quote(extra[:3])}); {_CORRUPT}",
        )
    targets = {}
    for key, (shape, count, dtype, base_sha256, merged_sha256) in entries.items():
        values, base_values = tensors[f"{key}.values"], tensors.get(f"{key}.base_values")
        indices = validate_delta(
            directory / WEIGHTS_NAME, key, shape, count, tensors[f"{key}.indices"], values, base_values
        )
        if base_values is not None and dtype_code(base_values.dtype) != dtype:  # they are the base's own entries
            raise _fail(
                directory / WEIGHTS_NAME,
                f"tensor `{key}.base_values` is {dtype_code(base_values.dtype)} but "
                f"{CONFIG_NAME} records the base as {dtype}; {_CORRUPT}",
            )
        targets[key] = TargetDelta(key, shape, dtype, indices, values, base_values, base_sha256, merged_sha256)
    return Adapter(directory, meta, config, targets)


# --------------------------------------------------------------------------------------------- loading


def load_adapter(
    model: nn.Module,
    adapter_dir: str | os.PathLike,
    check_base: bool = True,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
) -> nn.Module:
    """Load an adapter into `model`, wrapping its targets first if it has no sparse layers yet.

    Args:
        model (`nn.Module`): the base model (plain, or already prepared with the same targets).
        adapter_dir (`str` or `PathLike`): a directory written by `save_adapter`, or a Hub repo id (`org/name`),
            found as `from_pretrained` finds models (cache, `HF_HUB_OFFLINE`); an existing directory wins.
        check_base (`bool`, defaults to `True`): compare the stored base values with the model's weights
            and refuse a different base.
        revision (`str`, *optional*): Hub branch, tag or commit; ignored for a local directory.
        token (`str` or `bool`, *optional*): Hub token; the stored login or `HF_TOKEN` when `None`.

    Returns:
        The model, with indices and values set.

    Example:
        ```python
        >>> model = AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")
        >>> model = load_adapter(model, "out/adapter")
        ```
    """
    from .hub import resolve_adapter  # hub imports this module
    from .model import iter_sparse_layers, wrap_targets

    adapter = read_adapter(resolve_adapter(adapter_dir, revision=revision, token=token))
    layers = dict(iter_sparse_layers(model))
    if not layers:
        params = dict(model.named_parameters())
        for key, target in adapter.targets.items():
            _check_weight(adapter.path, model, params.get(key), target)
            if check_base:  # before wrapping: a refusal leaves the model as it was
                _check_base_values(adapter.path, key, _dense_or_none(model, key), target)
        wrap_targets(model, {k: t.indices for k, t in adapter.targets.items()}, adapter.config)
        layers = dict(iter_sparse_layers(model))
    if set(layers) != set(adapter.targets):
        only_adapter, only_model = (
            sorted(set(adapter.targets) - set(layers)),
            sorted(set(layers) - set(adapter.targets)),
        )
        raise _fail(
            adapter.path,
            f"targets differ from the model's sparse layers: only the adapter has {quote(only_adapter[:3])} "
            f"({len(only_adapter)}), only the model has {quote(only_model[:3])} ({len(only_model)}); "
            "prepare the model with the adapter's target_modules or load into an unprepared base",
        )
    for key, layer in layers.items():
        if tuple(layer.weight_shape) != adapter.targets[key].shape:
            raise _fail(
                adapter.path,
                f"target `{key}` is {list(adapter.targets[key].shape)} in the adapter but "
                f"{list(layer.weight_shape)} in the model; load the base the adapter was trained on",
            )
    for key, layer in layers.items():  # once every shape matched: a shape mismatch is the one to name
        if check_base:
            layer.restore_base_weight()  # a merged-resident weight holds W0 + Δ
            try:
                weight = layer.dense_weight()
            except TypeError:
                weight = None
            _check_base_values(adapter.path, key, weight, adapter.targets[key])
    for key, layer in layers.items():  # only once every target passed, so a refusal changes nothing
        _set_delta(layer, adapter.targets[key])
    model.sparse_config = adapter.config
    return model


def _check_weight(path: Path, model: nn.Module, weight: torch.Tensor | None, target: TargetDelta) -> None:
    """Refuse a weight that cannot carry `target`'s delta, naming what the adapter expects and what the model has."""
    if weight is not None and _unpacked_shape(weight) == target.shape:
        return
    found = "no such weight" if weight is None else f"a weight of shape {list(_unpacked_shape(weight))}"
    raise _fail(
        path,
        f"target `{target.key}` is a weight of shape {list(target.shape)} in the adapter, but it is {found} in "
        f"{type(model).__name__}; load the base the adapter was trained on",
    )


def _unpacked_shape(weight: torch.Tensor) -> tuple[int, ...]:
    """A weight's logical shape; a bitsandbytes 4-bit weight is stored packed and records its shape apart."""
    quant_state = getattr(weight, "quant_state", None)
    return tuple(quant_state.shape) if quant_state is not None else tuple(weight.shape)


def _dense_or_none(model: nn.Module, key: str) -> torch.Tensor | None:
    """The dense float weight under `key` of an unprepared model, or None for a quantised one."""
    from .layer import dense_base_weight

    module_name, _, name = key.rpartition(".")
    owner = model.get_submodule(module_name)
    if isinstance(owner, nn.Linear) and name == "weight":
        try:
            return dense_base_weight(owner)
        except TypeError:
            return None
    weight = owner._parameters[name]
    return weight if weight.dtype in _FLOAT_DTYPES else None


def describe_difference(found: torch.Tensor, expected: torch.Tensor, indices: torch.Tensor) -> str:
    """Where two equally long vectors of entries differ: how many, and the first flat position with both values."""
    differ = (found != expected).nonzero()
    first = int(differ[0])
    return (
        f"{len(differ)} of {len(found)} entries at its indices differ, the first at flat position "
        f"{int(indices[first])}: {found[first].item()!r} there, {expected[first].item()!r} in the adapter"
    )


def _check_base_values(path: Path, key: str, weight: torch.Tensor | None, target: TargetDelta) -> None:
    """Refuse a base whose entries at the indices differ from the adapter's base values, or from its `base_sha256`
    when it stores none. A quantised base has no exact entries to compare, and an adapter saved before the digests
    without base values has nothing to compare them with: both are accepted unchecked."""
    if weight is None or (target.base_values is None and target.base_sha256 is None):
        return
    indices = target.indices.to(weight.device)
    current = weight.detach().view(-1)[indices]
    fix = "load that base, or pass check_base=False"
    if target.base_values is None:
        if entries_digest(current) != target.base_sha256:
            raise _fail(
                path,
                f"the model's `{key}` differs from the base the adapter was trained on (its entries at the "
                f"indices do not match the adapter's base_sha256); {fix}",
            )
        return
    stored = target.base_values.to(device=current.device, dtype=current.dtype)
    if not torch.equal(current, stored):
        raise _fail(
            path,
            f"the model's `{key}` differs from the base the adapter was trained on: "
            f"{describe_difference(current, stored, indices)}; {fix}",
        )


@torch.no_grad()
def _set_delta(layer: SparseDeltaTarget, target: TargetDelta) -> None:
    device = layer.values.device
    layer.assign(target.indices.to(device), target.values.to(device=device, dtype=layer.values.dtype))
