"""Streaming merge and unmerge of an adapter into a safetensors checkpoint on disk.

Each shard is copied with only its targeted tensors rewritten (`shard_rewrite`: same header and offsets, one
tensor in memory at a time); deltas are scattered with the Triton kernel on CUDA and the torch path on CPU.
Output is built in a temporary directory beside the target and renamed into place only when complete
(`atomic.atomic_directory`), so a refusal, a full disk or a kill never leaves a partial model where one is
expected, and the checkpoint read is never written to.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from .atomic import atomic_directory, reporting_disk_full
from .checkpoint_layout import FusedDigests, split_for_checkpoint
from .io import (
    QUANTIZED_DTYPES,
    Adapter,
    AdapterError,
    TargetDelta,
    describe_difference,
    entries_digest,
    merged_entries,
    quote,
    read_adapter,
)
from .kernels.scatter import scatter_add_, scatter_set_
from .peft_interop import is_peft_adapter, read_peft_adapter
from .shard_rewrite import rewrite_shard

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Weight files of other formats would hold stale, unmerged weights in the output: never copied.
_OTHER_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".safetensors")
_DISK_FULL_FIX = "free space or choose another output directory (--output)"
# Bases whose rounding can swallow trained deltas. An fp32 base loses only deltas below 2^-24 of their weight, under
# the forward pass's own rounding; a bf16 one loses every delta below 2^-9 of it (0.2%), a common size for fp32-trained
# updates, and fp16 below 2^-12.
_LOW_PRECISION = (torch.bfloat16, torch.float16)


@dataclass
class Checkpoint:
    """A safetensors checkpoint directory: its shard files and which shard holds each tensor."""

    directory: Path
    shards: list[str]
    weight_map: dict[str, str]

    def header(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """(shape, dtype code) of every tensor, read from the shard headers without loading data.

        Raises `AdapterError` where a shard holds a tensor that the index places elsewhere or omits.
        """
        info = {}
        for shard in self.shards:
            try:
                with safe_open(self.directory / shard, framework="pt") as fh:
                    pieces = {key: fh.get_slice(key) for key in fh.keys()}
                    entries = {key: (tuple(piece.get_shape()), piece.get_dtype()) for key, piece in pieces.items()}
            except Exception as err:  # safetensors raises several types for malformed headers
                raise AdapterError(
                    f"{self.directory / shard}: not a readable safetensors file ({type(err).__name__}: {err}); re-download or re-save the model"
                ) from None
            for key, entry in entries.items():
                if self.weight_map.get(key) != shard:  # else the merge would look for it in the wrong shard
                    raise AdapterError(
                        f"{self.directory / shard}: holds `{key}`, which {INDEX_FILE} puts in {self.weight_map.get(key)!r}; "
                        "the index is inconsistent, re-save the model with save_pretrained"
                    )
                info[key] = entry
        return info


def open_checkpoint(directory: str | os.PathLike) -> Checkpoint:
    """Find the shards of a checkpoint (`model.safetensors` or an index with shards), or raise `AdapterError`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterError(f"{directory}: model directory not found")
    weight_map = _weight_map(directory)
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        if not (directory / shard).is_file():
            raise AdapterError(
                f"{directory / shard}: shard listed in {INDEX_FILE} is missing; re-download or re-save the model"
            )
    return Checkpoint(directory, shards, weight_map)


def _weight_map(directory: Path) -> dict[str, str]:
    """Tensor name -> shard file, from the index or the single file's header."""
    index = directory / INDEX_FILE
    try:
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        elif (directory / SINGLE_FILE).is_file():
            with safe_open(directory / SINGLE_FILE, framework="pt") as fh:
                weight_map = dict.fromkeys(fh.keys(), SINGLE_FILE)
        else:
            raise AdapterError(
                f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}; save the model with save_pretrained(safe_serialization=True)"
            )
    except AdapterError:
        raise
    except Exception as err:
        raise AdapterError(
            f"{directory}: unreadable checkpoint ({type(err).__name__}: {err}); re-save it with save_pretrained"
        ) from None
    for shard in weight_map.values():
        # Shards sit beside the index. A name like `../x` or `/x` would be read from outside the model and, worse,
        # written to outside the output directory.
        if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".."):
            raise AdapterError(
                f"{index}: shard {quote(shard)} is not a file name in {directory}; re-save the model with save_pretrained"
            )
    return weight_map


def check_base_matches_adapter(adapter: Adapter, header: dict[str, tuple[tuple[int, ...], str]], force: bool) -> None:
    """Refuse a base that lacks a target, has another shape, or (unless `force`) another dtype.

    Every target's recorded shape and dtype is compared with the base's own header, whatever the adapter's
    `base_fingerprint` says: the fingerprint is the adapter's claim about itself, so a file whose targets were
    edited can keep it. `read_adapter` has checked the indices against the recorded shape; equal to the base's,
    it keeps every position inside the weight the scatter writes. An adapter trained over a bitsandbytes base
    (recorded dtype NF4/FP4/INT8) merges into its unquantised checkpoint, whatever float dtype that has.
    """
    for key, target in adapter.targets.items():
        if key not in header:
            raise AdapterError(
                f"{adapter.path}: the base has no tensor `{key}`; pass the base model the adapter was trained on"
            )
        shape, dtype = header[key]
        if tuple(shape) != target.shape:
            raise AdapterError(
                f"{adapter.path}: `{key}` is {list(shape)} in the base but {list(target.shape)} in the adapter; pass the matching base model"
            )
        if dtype not in ("F32", "BF16", "F16", "F64"):
            raise AdapterError(
                f"{adapter.path}: `{key}` is {dtype} in the base, not a float weight (it was {target.base_dtype} in "
                "training); merge into the unquantised checkpoint"
            )
        if dtype != target.base_dtype and target.base_dtype not in QUANTIZED_DTYPES and not force:
            raise AdapterError(
                f"{adapter.path}: base fingerprint differs: `{key}` is {dtype} in the base but was {target.base_dtype} in training; "
                "pass --force to merge anyway (deltas are rounded to the base dtype)"
            )


def _plan_copies(source: Path, shards: list[str]) -> tuple[list[Path], list[str]]:
    """The other entries of `source` to copy (config, tokenizer, ...) and the weight files of other formats left out."""
    copies, skipped = [], []
    for entry in sorted(source.iterdir()):
        if entry.name in shards or entry.name.startswith("."):
            continue
        if entry.name.endswith(_OTHER_WEIGHT_SUFFIXES):
            skipped.append(entry.name)
        else:
            for path in (entry, *_tree(entry)):
                _check_link(path)
            copies.append(entry)
    return copies, skipped


def _tree(entry: Path) -> Iterator[Path]:
    """Everything under a real (not linked) directory, without following linked directories."""
    if entry.is_dir() and not entry.is_symlink():
        for root, dirs, files in os.walk(entry):
            yield from (Path(root, name) for name in dirs + files)


def _check_link(path: Path) -> None:
    """Refuse a link the merge cannot copy into a self-contained model.

    A linked file is copied as a file, wherever it points: the Hugging Face hub cache links every file of a
    snapshot into `../../blobs/`. A linked directory is refused: the copy would take in everything under its
    target (a link to `/` would fill the disk), and hub snapshots never hold one.
    """
    if not path.is_symlink():
        return
    if not path.exists():
        raise AdapterError(
            f"{path}: broken symlink (to {os.readlink(path)}); re-download the model or remove the link"
        )
    if path.is_dir():
        raise AdapterError(
            f"{path}: symlinked directory (to {path.resolve()}); the merge would copy all of it into the output, "
            "so replace the link with a copy or remove it"
        )


def _copy(entries: list[Path], tmp: Path, output: Path, fix: str) -> None:
    """Copy `entries` into `tmp` as real files (links followed), reporting a full disk under their final names."""
    for entry in entries:
        with reporting_disk_full(output / entry.name, fix):
            if entry.is_dir():
                shutil.copytree(entry, tmp / entry.name)
            else:
                shutil.copy2(entry, tmp / entry.name)


def check_output(output: Path, inputs: dict[str, Path], overwrite: bool) -> None:
    """Refuse an output that is or contains an input, lies inside a model input, or exists without `overwrite`.

    `inputs` maps a role ("base", "merged model", "adapter") to its directory. Paths are compared resolved, links
    and `..` followed, and each input's files count where their links lead (the hub cache's blobs), so no spelling
    of `--output` lets `--overwrite` delete what the run reads. An output inside a model directory is refused too
    (its files are what a merge copies); one inside the adapter's directory is not: the adapter reads three named
    files, and Axolotl's `sparse_merge_on_finish` writes `OUTPUT_DIR/merged` beside them.
    """
    resolved = output.resolve()
    for role, directory in inputs.items():
        source = directory.resolve()
        # Where the input's files really are (the hub cache's blobs): an output replacing them would delete them.
        linked = {entry.resolve().parent for entry in directory.iterdir()}
        inside = resolved == source if role == "adapter" else _within(resolved, source)
        if inside or any(_within(place, resolved) for place in {source, *linked}):
            raise AdapterError(
                f"{output}: output must be a new directory outside the {role} ({directory}) and not "
                "contain it; choose another --output"
            )
    if output.exists() and not overwrite:
        raise AdapterError(f"{output}: output directory exists; choose another path or pass --overwrite")


def _within(path: Path, directory: Path) -> bool:
    """Whether `path` is `directory` or lies under it (both resolved)."""
    return path == directory or directory in path.parents


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise AdapterError("--device cuda: no CUDA device is available; use --device cpu or auto")
    return torch.device(device)


def rounded_away(entries: torch.Tensor, values: torch.Tensor) -> int:
    """How many nonzero deltas a merge into 16-bit `entries` (the base's weights at the indices) loses: the merge's
    fp32 sum rounds back to the entry itself. Always 0 for fp32 and fp64 entries (see `_LOW_PRECISION`).

    The sum is the merge's own scatter, so the count is what the merged model lacks, not an estimate.
    """
    if entries.dtype not in _LOW_PRECISION:
        return 0
    values = values.to(entries.device)
    merged = scatter_add_(entries.clone(), torch.arange(len(entries), device=entries.device), values)
    return int(((merged == entries) & (values != 0)).sum())


def _positions(weight: torch.Tensor, target: TargetDelta, where: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's indices and values on `weight`'s device, once its shape is the adapter's.

    `check_base_matches_adapter` has already compared the header; this repeats it on the loaded tensor because
    the scatter kernels do not bound-check (see kernels/scatter.py): a position is only written after this.
    """
    if tuple(weight.shape) != target.shape:
        raise AdapterError(
            f"{where}: `{target.key}` is {list(weight.shape)} in the model but {list(target.shape)} in the "
            "adapter; pass the model the adapter was trained on"
        )
    return target.indices.to(weight.device), target.values.to(weight.device)


def _verify(
    entries: torch.Tensor, stored: torch.Tensor | None, digest: str | None, indices: torch.Tensor
) -> str | None:
    """Why `entries` are not what the adapter recorded (its stored entries, else their digest), or None if they are
    (or it recorded neither: an adapter saved before the digests, or over a quantised base)."""
    if stored is not None:
        stored = stored.to(device=entries.device, dtype=entries.dtype)
        return None if torch.equal(entries, stored) else describe_difference(entries, stored, indices)
    if digest is not None and entries_digest(entries) != digest:
        return "its entries at the indices do not match the sha256 the adapter recorded"
    return None


def _merge_tensor(
    weight: torch.Tensor, target: TargetDelta, force: bool, where: Path, fused: FusedDigests | None = None
) -> int:
    """Add the target's deltas to `weight`; return how many of them its dtype rounded away (`rounded_away`)."""
    indices, values = _positions(weight, target, where)
    entries = weight.view(-1)[indices]
    if fused is not None:
        fused.add(target, entries)
    if not force and (why := _verify(entries, target.base_values, target.base_sha256, indices)):
        raise AdapterError(
            f"{where}: `{target.key}` differs from the base the adapter was trained on ({why}); "
            "pass the right base or --force"
        )
    lost = rounded_away(entries, values)
    scatter_add_(weight, indices, values)
    return lost


def _unmerge_tensor(
    weight: torch.Tensor, target: TargetDelta, force: bool, where: Path, fused: FusedDigests | None = None
) -> None:
    """Restore the base's entries: exactly from stored base values, else by subtracting the values.

    Either way the merged entries are checked first (unless `force`): against the stored base values plus the
    values, or against `merged_sha256`, which `save_adapter` computed from the base with the merge's own
    arithmetic, so it matches the output of any merge of this adapter into the base it was trained on.
    """
    indices, values = _positions(weight, target, where)
    base_values = (
        None if target.base_values is None else target.base_values.to(device=weight.device, dtype=weight.dtype)
    )
    if fused is not None:
        fused.add(target, weight.view(-1)[indices])
    if not force:
        expected = None if base_values is None else merged_entries(base_values, values)
        if why := _verify(weight.view(-1)[indices], expected, target.merged_sha256, indices):
            raise AdapterError(
                f"{where}: `{target.key}` is not this adapter merged into its base ({why}); pass the "
                "merged model this adapter made, or --force"
            )
    if base_values is None:
        scatter_add_(weight, indices, values, alpha=-1.0)
    else:
        scatter_set_(weight, indices, base_values)


def _refuse_fused(keys: list[str], where: Path, unmerge: bool) -> None:
    """A fused target (stored per expert) whose re-assembled entries do not match the adapter's digest: the
    output is not written (the caller is inside the atomic directory)."""
    more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
    why = "its entries at the indices, read from its per-expert tensors, do not match the sha256 the adapter recorded"
    if unmerge:
        raise AdapterError(
            f"{where}: `{keys[0]}`{more} is not this adapter merged into its base ({why}); pass the merged model "
            "this adapter made, or --force"
        )
    raise AdapterError(
        f"{where}: `{keys[0]}`{more} differs from the base the adapter was trained on ({why}); pass the right base "
        "or --force"
    )


def merge_checkpoint(
    model_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    unmerge: bool = False,
    device: str = "auto",
    force: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Merge (or unmerge) an adapter into a checkpoint directory, writing a new directory atomically.

    Args:
        model_dir: base checkpoint (merge) or merged checkpoint (unmerge), safetensors, single or sharded.
        adapter_dir: directory written by `save_adapter`, or a PEFT SHiRA / Super-Tuning adapter directory.
        output_dir: new checkpoint directory; must not exist unless `overwrite`.
        unmerge (`bool`, defaults to `False`): subtract instead of add; exact when the adapter holds base values.
        device (`str`, defaults to `"auto"`): `"cuda"` (Triton scatter), `"cpu"` or `"auto"`.
        force (`bool`, defaults to `False`): accept a base whose dtypes or weights differ from training.
        overwrite (`bool`, defaults to `False`): replace an existing `output_dir`.

    Returns:
        A summary: tensors changed, values applied, shards, seconds, device; for unmerge, `exact`; for merge,
        `rounded_away`: {tensor: nonzero deltas that a bf16/fp16 base rounded away}, only tensors that lost any.

    Raises:
        AdapterError: the adapter, the checkpoint or the output path is refused; nothing was written.
        DiskFullError: the disk filled; the output is absent (with `overwrite`: the previous one, intact).
    """
    started = time.perf_counter()
    peft = is_peft_adapter(adapter_dir)
    adapter = None if peft else read_adapter(adapter_dir)
    checkpoint = open_checkpoint(model_dir)
    output = Path(output_dir).absolute()
    header = checkpoint.header()
    if peft:  # PEFT's files record no shapes: the base's header supplies them
        adapter = read_peft_adapter(adapter_dir, header)
    else:  # fused MoE experts are stored per expert on disk
        adapter = split_for_checkpoint(adapter, header, checkpoint.directory)
    check_output(
        output, {"merged model" if unmerge else "base": checkpoint.directory, "adapter": adapter.path}, overwrite
    )
    check_base_matches_adapter(adapter, header, force)
    torch_device = _resolve_device(device)
    copies, skipped = _plan_copies(checkpoint.directory, checkpoint.shards)
    by_shard: dict[str, list[TargetDelta]] = {}
    for key, target in adapter.targets.items():
        by_shard.setdefault(checkpoint.weight_map[key], []).append(target)
    lost: dict[str, int] = {}
    # Targets split into per-expert tensors are checked against their fused digest after the last shard
    fused = None if force else FusedDigests(adapter, merged=unmerge)
    # disable=None draws the bar only on a terminal, so piped stderr holds nothing but a refusal's one line;
    # the `with` closes (leave=False: erases) the bar before an error propagates to be printed.
    with (
        atomic_directory(output, replace=overwrite) as tmp,
        tqdm(
            total=len(adapter.targets),
            desc="unmerge" if unmerge else "merge",
            unit="tensor",
            disable=None if progress else True,
            leave=False,
        ) as bar,
    ):
        for shard in checkpoint.shards:
            path = checkpoint.directory / shard
            targets = {target.key: target for target in by_shard.get(shard, [])}

            def apply(key: str, weight: torch.Tensor, targets=targets, path=path) -> torch.Tensor:
                weight = weight.to(torch_device)
                if unmerge:
                    _unmerge_tensor(weight, targets[key], force, path, fused)
                elif count := _merge_tensor(weight, targets[key], force, path, fused):
                    lost[key] = count
                bar.update(1)
                return weight.cpu()

            with reporting_disk_full(output / shard, _DISK_FULL_FIX):
                rewrite_shard(path, tmp / shard, targets, apply)
        bar.close()
        if fused is not None and (wrong := fused.mismatched()):
            _refuse_fused(wrong, checkpoint.directory, unmerge)
        _copy(copies, tmp, output, _DISK_FULL_FIX)
    return {
        "tensors": len(adapter.targets),
        "values": sum(t.indices.numel() for t in adapter.targets.values()),
        "shards": len(checkpoint.shards),
        "seconds": time.perf_counter() - started,
        "device": str(torch_device),
        "exact": adapter.has_base_values if unmerge else None,
        "rounded_away": None if unmerge else lost,
        "skipped_files": skipped,
    }
