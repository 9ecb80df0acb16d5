"""Stock PEFT's sparse adapters, both ways: export ours as Super-Tuning or SHiRA, and read theirs for the merge.

Neither PEFT method stores arbitrary per-target counts. Super-Tuning gives every target `int(numel·(1−sparsity))`
positions under one `sparsity`; SHiRA gives each `r·(in+out)` under one `r`. An export picks the setting with the
fewest positions that still holds every target's count, and fills each target's extra positions with positions it
does not train, at value 0: the weight PEFT computes, W + scatter(values), is then ours entry for entry (also for
SMT's uneven counts). Both methods wrap `nn.Linear` only, which is all an adapter `load_adapter` accepts targets.

PEFT's files record no weight shapes (Super-Tuning's positions are flat), so reading one needs the base's header:
`read_peft_adapter` is called by the merge once the base checkpoint is open.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .atomic import atomic_directory, reporting_disk_full
from .config import SparseConfig
from .io import FORMAT_VERSION, Adapter, AdapterError, TargetDelta, quote, read_adapter, validate_delta

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
FORMATS = ("supertuning", "shira")
_PREFIX = "base_model.model."  # PeftModel's prefix of the wrapped model's module names in its state dict
# Per format: PEFT's `peft_type`, and the state-dict suffixes of each target's positions and values.
_LAYOUT = {
    "supertuning": ("SUPERTUNING", "supertuning_indices", "supertuning_values"),
    "shira": ("SHIRA", "shira_indices", "shira_weight"),
}
_INT32_LIMIT = 2**31
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def is_peft_adapter(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds a PEFT adapter (and not ours, which wins where both are present)."""
    from .io import CONFIG_NAME

    directory = Path(directory)
    return (directory / PEFT_CONFIG_NAME).is_file() and not (directory / CONFIG_NAME).exists()


# --------------------------------------------------------------------------------------------- export


def supertuning_sparsity(shapes_counts: list[tuple[tuple[int, int], int]]) -> float:
    """The largest sparsity whose `int(numel·(1−sparsity))` (PEFT's own expression) holds every count, at least 1."""
    sparsity = 1.0 - max(max(count, 1) / (shape[0] * shape[1]) for shape, count in shapes_counts)
    sparsity = max(sparsity, 0.0)
    # 1 − (1 − ratio) need not round back to ratio: step down one float at a time until PEFT's floor holds all.
    while any(int(shape[0] * shape[1] * (1 - sparsity)) < max(count, 1) for shape, count in shapes_counts):
        sparsity = math.nextafter(sparsity, 0.0)
    return sparsity


def shira_rank(shapes_counts: list[tuple[tuple[int, int], int]]) -> int:
    """The smallest SHiRA rank whose `r·(in+out)` holds every count (at least 1)."""
    return max(max(1, -(-count // (shape[0] + shape[1]))) for shape, count in shapes_counts)


def _slots(format: str, shape: tuple[int, int], setting: float) -> int:
    if format == "supertuning":
        return int(shape[0] * shape[1] * (1 - setting))
    return setting * (shape[0] + shape[1])


def pad_delta(indices: torch.Tensor, values: torch.Tensor, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`slots` sorted positions: `indices`, plus the lowest positions they lack at value 0 (fp32 values)."""
    extra = slots - indices.numel()
    values = values.float()
    if extra == 0:
        return indices, values
    window = torch.arange(slots, dtype=torch.int64)  # `extra` untrained positions always lie below `slots`
    free = window[~torch.isin(window, indices)][:extra]
    order = torch.cat([indices, free]).argsort()
    return torch.cat([indices, free])[order], torch.cat([values, values.new_zeros(extra)])[order]


def export_peft(
    adapter_dir: str | os.PathLike, output_dir: str | os.PathLike, format: str = "supertuning", overwrite: bool = False
) -> dict:
    """Write an adapter as a PEFT adapter directory that `PeftModel.from_pretrained` loads with stock peft.

    Args:
        adapter_dir (`str` or `PathLike`): a directory written by `save_adapter`.
        output_dir (`str` or `PathLike`): the PEFT adapter directory to write atomically; must not exist unless
            `overwrite`.
        format (`str`, defaults to `"supertuning"`): `"supertuning"` (one sparsity for all targets) or `"shira"`
            (one rank; refused where a target is too small to hold `r·(in+out)` positions).
        overwrite (`bool`, defaults to `False`): replace an existing `output_dir`.

    Returns:
        A summary: format, `sparsity` or `r`, positions written, and how many of them are padding at 0.

    Raises:
        AdapterError: the adapter is unreadable, the format cannot hold it, or the output exists.
    """
    if format not in FORMATS:
        raise AdapterError(f"format {quote(format)} is not one of {', '.join(FORMATS)}; pick one")
    from .merge import check_output  # merge imports this module

    adapter = read_adapter(adapter_dir)
    output = Path(output_dir).absolute()
    check_output(output, {"adapter": adapter.path}, overwrite)  # never over (or inside) the adapter read
    peft_type, index_name, value_name = _LAYOUT[format]
    for key, target in adapter.targets.items():
        if len(target.shape) != 2 or not key.endswith(".weight"):
            raise AdapterError(
                f"{adapter.path}: `{key}` ({'x'.join(map(str, target.shape))}) is not a Linear weight, and PEFT's "
                f"{format} adapts Linear layers only; merge the adapter with `sparse-merge merge` instead"
            )
    shapes_counts = [(t.shape, t.indices.numel()) for t in adapter.targets.values()]
    setting = supertuning_sparsity(shapes_counts) if format == "supertuning" else shira_rank(shapes_counts)
    tensors = {}
    for key, target in adapter.targets.items():
        indices, values = pad_delta(target.indices, target.values, _check_slots(adapter, format, target, setting))
        module = _PREFIX + key.removesuffix(".weight")
        if format == "shira":  # [2, N]: row and column of each position
            indices = torch.stack([indices // target.shape[1], indices % target.shape[1]])
        tensors[f"{module}.{index_name}"] = indices.to(torch.int32).contiguous()
        tensors[f"{module}.{value_name}"] = values.contiguous()
    setting_key = "sparsity" if format == "supertuning" else "r"
    config = _peft_config(format, peft_type, adapter, {setting_key: setting})
    with atomic_directory(output, replace=overwrite) as tmp:
        fix = "free space or choose another output directory"
        with reporting_disk_full(output / PEFT_WEIGHTS_NAME, fix):
            save_file(tensors, tmp / PEFT_WEIGHTS_NAME, metadata={"format": "pt"})
        with reporting_disk_full(output / PEFT_CONFIG_NAME, fix):
            (tmp / PEFT_CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
    written = sum(t.numel() for name, t in tensors.items() if name.endswith(value_name))
    trained = sum(count for _, count in shapes_counts)
    return {"format": format, setting_key: setting, "positions": written, "padding": written - trained}


def _check_slots(adapter: Adapter, format: str, target: TargetDelta, setting: float) -> int:
    """The positions `format` gives `target` at `setting`, refused where they do not fit its matrix or int32."""
    out_features, in_features = target.shape
    slots = _slots(format, target.shape, setting)
    if slots > out_features * in_features:
        widest = max(adapter.targets.values(), key=lambda t: t.indices.numel() / sum(t.shape))
        raise AdapterError(
            f"{adapter.path}: `{target.key}` ({out_features}x{in_features}) cannot hold SHiRA's r·(in+out) = {slots:,d} "
            f"positions at r={setting}, the rank that `{widest.key}`'s {widest.indices.numel():,d} values need; "
            "export with --format supertuning"
        )
    if format == "supertuning" and out_features * in_features >= _INT32_LIMIT:
        raise AdapterError(
            f"{adapter.path}: `{target.key}` has {out_features * in_features:,d} entries, beyond the "
            "int32 positions Super-Tuning stores; export with --format shira"
        )
    return slots


def _peft_config(format: str, peft_type: str, adapter: Adapter, setting: dict) -> dict:
    """`adapter_config.json` as peft's own `save_pretrained` writes it for this method (every field explicit)."""
    common = {
        "peft_type": peft_type,
        "task_type": None,
        "base_model_name_or_path": adapter.base_model,
        "revision": None,
        "inference_mode": True,
        "init_weights": True,
        "modules_to_save": None,
        "target_modules": sorted(key.removesuffix(".weight") for key in adapter.targets),  # exact module names
    }
    if format == "supertuning":
        return {
            **common,
            **setting,
            "select_top": True,
            "r": None,
            "lora_alpha": None,
            "lora_dropout": 0.0,
            "save_precomputed_indices": True,
        }
    return {**common, **setting, "mask_type": "random", "random_seed": None, "fan_in_fan_out": False}


# --------------------------------------------------------------------------------------------- reading PEFT's


def read_peft_adapter(directory: str | os.PathLike, header: dict[str, tuple[tuple[int, ...], str]]) -> Adapter:
    """Read a PEFT SHiRA or Super-Tuning adapter as an `Adapter` over the base whose tensor `header` is given.

    Positions PEFT holds twice are summed into one (PEFT's scatter-add and sparse COO sum them too). The result has
    no base values, so an unmerge of it subtracts.
    """
    directory = Path(directory)
    format, config = _read_peft_config(directory / PEFT_CONFIG_NAME)
    _, index_name, value_name = _LAYOUT[format]
    path = directory / PEFT_WEIGHTS_NAME
    try:
        tensors = load_file(path)
    except Exception as err:  # noqa: BLE001 - safetensors raises several types for a missing or malformed file
        raise AdapterError(
            f"{path}: not a readable safetensors file ({type(err).__name__}: {err}); save the PEFT "
            "adapter again with save_pretrained(safe_serialization=True)"
        ) from None
    modules = sorted({name[len(_PREFIX) :].rsplit(".", 1)[0] for name in tensors if name.startswith(_PREFIX)})
    expected = {f"{_PREFIX}{m}.{suffix}" for m in modules for suffix in (index_name, value_name)}
    if set(tensors) != expected or not modules:
        odd = sorted(set(tensors) ^ expected)[:3]
        raise AdapterError(
            f"{path}: tensors {quote(odd)} are not a PEFT {format} adapter's `<module>.{index_name}` / "
            f"`.{value_name}` pairs; save the PEFT adapter again"
        )
    targets = {}
    for module in modules:
        key = f"{module}.weight"
        if key not in header:
            raise AdapterError(
                f"{directory}: the base has no tensor `{key}`; pass the base model the adapter was trained on"
            )
        shape, dtype = header[key]
        if len(shape) != 2:
            raise AdapterError(
                f"{directory}: `{key}` is {list(shape)} in the base, not a Linear weight; pass the right base"
            )
        indices = _flat_positions(path, key, tuple(shape), tensors[f"{_PREFIX}{module}.{index_name}"], format)
        targets[key] = _coalesced(path, key, tuple(shape), dtype, indices, tensors[f"{_PREFIX}{module}.{value_name}"])
    meta = {
        "format": FORMAT_VERSION,
        "method": f"peft-{format}",
        "base_model": config.get("base_model_name_or_path"),
        "has_base_values": False,
        "targets": {
            k: {"shape": list(t.shape), "count": t.indices.numel(), "dtype": t.base_dtype} for k, t in targets.items()
        },
    }
    total = sum(t.indices.numel() for t in targets.values())
    sparse_config = SparseConfig(num_params=max(total, 1), target_modules=modules, store_base_values=False)
    return Adapter(directory, meta, sparse_config, targets)


def _read_peft_config(path: Path) -> tuple[str, dict]:
    """The format of a PEFT adapter config, refusing types and options whose delta is not W + scatter(values)."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        peft_type = config.get("peft_type")
    except (OSError, ValueError, AttributeError) as err:
        raise AdapterError(
            f"{path}: not a readable PEFT adapter config ({type(err).__name__}); save the adapter again"
        ) from None
    formats = {peft: name for name, (peft, _, _) in _LAYOUT.items()}
    if peft_type not in formats:
        raise AdapterError(
            f"{path}: a PEFT {quote(peft_type)} adapter; sparse-merge reads SHIRA and SUPERTUNING adapters "
            "only (merge others with peft's merge_and_unload)"
        )
    supertuning = peft_type == "SUPERTUNING"
    refusals = (
        ("r", supertuning and config.get("r") is not None, "its Supra LoRA part is not sparse"),
        (
            "save_precomputed_indices",
            supertuning and config.get("save_precomputed_indices") is False,
            "its positions are not saved (PEFT recomputes them from the base)",
        ),
        ("fan_in_fan_out", bool(config.get("fan_in_fan_out")), "its weights are transposed (Conv1D)"),
        ("modules_to_save", bool(config.get("modules_to_save")), "it also saves whole modules"),
    )
    for field, refused, reason in refusals:
        if refused:
            raise AdapterError(
                f"{path}: `{field}` is {quote(config.get(field))}: {reason}, which sparse-merge cannot "
                "fold; use peft's merge_and_unload"
            )
    return formats[peft_type], config


def _flat_positions(path: Path, key: str, shape: tuple[int, int], indices: torch.Tensor, format: str) -> torch.Tensor:
    """Flat int64 positions from Super-Tuning's flat or SHiRA's [2, N] (row, column) indices, range-checked."""
    rows_cols = format == "shira"
    if (
        indices.dtype not in (torch.int32, torch.int64)
        or indices.dim() != (2 if rows_cols else 1)
        or (rows_cols and indices.shape[0] != 2)
    ):
        want = "[2, N]" if rows_cols else "1-D"
        raise AdapterError(
            f"{path}: `{key}` positions must be {want} int32/int64, got {indices.dtype} "
            f"{list(indices.shape)}; save the PEFT adapter again"
        )
    if not rows_cols:
        return indices.long()
    rows, cols = indices.long()
    if indices.numel() and (int(cols.min()) < 0 or int(cols.max()) >= shape[1]):  # else one would alias another row
        raise AdapterError(
            f"{path}: `{key}` has columns outside [0, {shape[1]}) for shape {list(shape)}; pass the "
            "base model the adapter was trained on"
        )
    return rows * shape[1] + cols


def _coalesced(
    path: Path, key: str, shape: tuple[int, int], dtype: str, indices: torch.Tensor, values: torch.Tensor
) -> TargetDelta:
    if values.dtype not in _FLOAT_DTYPES or values.shape != indices.shape:
        raise AdapterError(
            f"{path}: `{key}` values must be {indices.numel()} floats, got {values.dtype} "
            f"{list(values.shape)}; save the PEFT adapter again"
        )
    unique, inverse = torch.unique(indices, sorted=True, return_inverse=True)
    values = values.new_zeros(unique.numel()).index_add_(0, inverse, values)  # sorted, repeats summed
    validate_delta(path, key, shape, unique.numel(), unique, values, None)
    return TargetDelta(key, shape, dtype, unique, values, None)
