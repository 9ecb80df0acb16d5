"""Builders shared by the io, merge, cli and atomic tests: a trained tiny adapter, plain-torch references, checkpoint
readers, file-tree digests, stand-ins for a full disk, and the hostile adapters (written directly with safetensors /
json) that every reader must refuse."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from conftest import tiny_llama
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save, save_file
from transformers import LlamaForCausalLM

from sparse_plugin import SparseConfig, iter_sparse_layers, prepare_model, save_adapter
from sparse_plugin.io import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME

# The target the hostile edits touch: 48 x 48 = 2304 entries, 115 trained at density 0.05.
KEY = "model.layers.0.self_attn.q_proj.weight"
KEY_NUMEL = 48 * 48
KEY_COUNT = 115
IDX, VAL, BASE = f"{KEY}.indices", f"{KEY}.values", f"{KEY}.base_values"
TOKENS = torch.randint(97, (2, 12), generator=torch.Generator().manual_seed(0))


def target_keys(model: torch.nn.Module) -> list[str]:
    """State-dict keys of every Linear weight except the output head: what `all-linear` trains."""
    return [
        f"{name}.weight" for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head"
    ]


def base_state(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The state dict of `tiny_llama(seed, dtype)`, rebuilt (it is seeded, so identical to the trained model's base)."""
    return {k: v.clone() for k, v in tiny_llama(seed, dtype).state_dict().items()}


def train_values(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Give every sparse layer random nonzero values, as after training (N(0, 0.05²): larger than the base's 0.02
    init, so a bf16 merge rounds few away: 2 of 1,844 in `saved_setup`)."""
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


def dense_reference(
    base: dict[str, torch.Tensor], adapter_tensors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Plain torch merge: each target's values added at its flat indices in fp32, rounded once to the base dtype."""
    merged = dict(base)
    for name, indices in adapter_tensors.items():
        if name.endswith(".indices"):
            key = name.removesuffix(".indices")
            weight = base[key].float().flatten().clone()  # clone: for fp32, float() and flatten() are views
            weight[indices.long()] += adapter_tensors[f"{key}.values"].float()
            merged[key] = weight.view(base[key].shape).to(base[key].dtype)
    return merged


def rounded_away_reference(base: dict[str, torch.Tensor], adapter_tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """Plain torch count, per target that loses any, of the nonzero deltas that a merge into a bf16/fp16 `base`
    rounds away: the fp32 sum, rounded to the base's dtype, is the base entry again."""
    lost = {}
    for key in (n.removesuffix(".indices") for n in adapter_tensors if n.endswith(".indices")):
        if base[key].dtype in (torch.bfloat16, torch.float16):
            entries = base[key].flatten()[adapter_tensors[f"{key}.indices"].long()]
            values = adapter_tensors[f"{key}.values"]
            same = (entries.float() + values.float()).to(entries.dtype) == entries
            if count := int((same & (values != 0)).sum()):
                lost[key] = count
    return lost


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


def saved_setup(
    root: Path, *, dtype: torch.dtype = torch.float32, max_shard_size: str | None = None, **config
) -> Saved:
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


def snapshot(directory: Path) -> dict[str, str]:
    """sha256 of every file under `directory`, by relative path: equal snapshots mean nothing was written there."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def leftovers(out: Path) -> list[str]:
    """Temporary (`.OUT.*.tmp`) or trash (`.OUT.*.old`) directories of an atomic write beside `out`."""
    return sorted(p.name for p in out.parent.glob(f".{out.name}.*"))


def hub_cache_layout(directory: Path, blobs: Path) -> None:
    """Move every file of `directory` into `blobs/` under its sha256 and link it back by a relative path, as the
    Hugging Face hub cache lays out a snapshot (`snapshots/<rev>/config.json -> ../../blobs/<sha256>`)."""
    blobs.mkdir(exist_ok=True)
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        blob = blobs / hashlib.sha256(path.read_bytes()).hexdigest()
        path.replace(blob)
        path.symlink_to(os.path.relpath(blob, path.parent))


# --------------------------------------------------------------------------------------------- a full disk


def safetensors_disk_full() -> None:
    """Raise what safetensors' `save_file` raises on a full disk (seen on a real tmpfs: test_atomic)."""
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def os_disk_full(*_args, **_kwargs) -> None:
    """Raise what Python's own writes (`write_text`, `shutil.copy2`) raise on a full disk."""
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def save_file_failing_at(call: int, fail: Callable[[], None]):
    """A stand-in for safetensors' `save_file` that writes normally except on its `call`-th use, where it writes
    the first half of the file (the part that fit) and then calls `fail()`: raise a full disk, or stall to be killed."""
    calls = []

    def save_file_(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == call:
            data = save(tensors, metadata=metadata)
            Path(path).write_bytes(data[: len(data) // 2])
            fail()
        save_file(tensors, path, metadata=metadata)

    return save_file_


def rewrite_failing_at(call: int, fail: Callable[[], None]):
    """A stand-in for the merge's `rewrite_shard` that rewrites normally except on its `call`-th use, where it
    leaves the first half of the shard (the part that fit) and then calls `fail()`: a full disk, or a stall."""
    from sparse_plugin.shard_rewrite import rewrite_shard

    calls = []

    def rewrite_shard_(source, destination, names, edit):
        calls.append(destination)
        rewrite_shard(source, destination, names, edit)
        if len(calls) == call:
            data = Path(destination).read_bytes()
            Path(destination).write_bytes(data[: len(data) // 2])
            fail()

    return rewrite_shard_


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


def _rewrite_header(edit_text):
    """An edit that replaces the adapter's safetensors header by `edit_text(header_json)`, keeping the data bytes:
    the way to write headers that safetensors' own writer never would."""

    def edit(directory: Path) -> None:
        path = directory / WEIGHTS_NAME
        raw = path.read_bytes()
        (length,) = struct.unpack("<Q", raw[:8])
        header = edit_text(raw[8 : 8 + length].decode().rstrip())
        path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + raw[8 + length :])

    return edit


def edit_header(fn):
    """An edit that rewrites the adapter's safetensors header (a dict) after `fn(header)`."""

    def edit_text(text: str) -> str:
        header = json.loads(text)
        fn(header)
        return json.dumps(header)

    return _rewrite_header(edit_text)


def _set_header_length(length: int):
    def edit(directory: Path) -> None:
        path = directory / WEIGHTS_NAME
        raw = path.read_bytes()
        path.write_bytes(struct.pack("<Q", length(len(raw))) + raw[8:])

    return edit


def _set(name: str, position: int, value):
    def fn(tensors):
        tensors[name][position] = value

    return fn


def _replace(name: str, change):
    """A tensor edit that replaces tensor `name` by `change(tensor)`, or drops it where that is None."""

    def fn(tensors):
        new = change(tensors[name])
        if new is None:
            del tensors[name]
        else:
            tensors[name] = new

    return fn


def _swap_first_two(tensors):
    indices = tensors[IDX]
    indices[[0, 1]] = indices[[1, 0]]


def _duplicate_first(tensors):
    indices = tensors[IDX]
    indices[1] = indices[0]


def _terabyte_values(header):
    entry = header[VAL]
    start = entry["data_offsets"][0]
    entry.update(shape=[2**38], data_offsets=[start, start + 2**40])  # 2^38 fp32 = 1 TiB, in a 100 KB file


def _repeat_values_entry(text: str) -> str:
    """The header with an empty entry for `VAL` first: safetensors keeps the last (real) one and loads fine."""
    return text.replace("{", "{" + json.dumps(VAL) + ': {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}, ', 1)


def _truncate(directory: Path) -> None:
    path = directory / WEIGHTS_NAME
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _random_bytes(directory: Path) -> None:
    path = directory / WEIGHTS_NAME
    path.write_bytes(random.Random(0).randbytes(path.stat().st_size))


def _pickle(directory: Path) -> None:
    path = directory / WEIGHTS_NAME
    tensors = {k: v.clone() for k, v in load_file(path).items()}  # clone: load_file maps the file it reads
    torch.save(tensors, path)  # what a `.bin` renamed to `.safetensors` holds


def _oversized_config(directory: Path) -> None:
    os.truncate(directory / CONFIG_NAME, 17 * 2**20)  # sparse: no disk used


def _duplicate_target(directory: Path) -> None:
    path = directory / CONFIG_NAME
    meta = json.loads(path.read_text())
    entry = json.dumps(meta["targets"][KEY])
    path.write_text(json.dumps(meta).replace('"targets": {', f'"targets": {{"{KEY}": {entry}, ', 1))


def _link_config_outside(directory: Path) -> None:
    secret = directory.parent / "outside.txt"
    secret.write_text(f"{SECRET}\n")
    (directory / CONFIG_NAME).unlink()
    (directory / CONFIG_NAME).symlink_to(secret)


def _count_minus_one(meta):
    meta["targets"][KEY]["count"] -= 1


def _set_target(**fields):
    return edit_meta(lambda meta: meta["targets"][KEY].update(fields))


def _rename_target(new_key: str):
    return edit_meta(lambda meta: meta["targets"].update({new_key: meta["targets"].pop(KEY)}))


class Hostile(NamedTuple):
    """A hostile edit of a valid adapter directory and the one-line refusal it must get."""

    edit: Callable[[Path], None]
    file: str  # the file the refusal names first: CONFIG_NAME, WEIGHTS_NAME, or "" for the directory
    message: str  # regex of the problem, which a `; <fix>` must follow


SECRET = "SECRET-TOKEN=hunter2"  # held by a file outside the adapter that a hostile link points to
_UNREADABLE = "not a readable safetensors file"
_OUTSIDE = rf"`{KEY}.indices` has positions outside \[0, {KEY_NUMEL}\)"
_NOT_FORMAT = "not a format version"
_BAD_TARGET = rf"target `{KEY}` needs `shape` \(two to 4 integers\), `count` \(an integer\) and `dtype`"
C, W = CONFIG_NAME, WEIGHTS_NAME
HOSTILE_ADAPTERS = {
    # the directory and its files
    "missing-adapter-dir": Hostile(shutil.rmtree, "", "adapter directory not found"),
    "missing-safetensors": Hostile(lambda d: (d / W).unlink(), W, "missing"),
    "save-id-mismatch": Hostile(edit_meta(lambda m: m.update(save_id="0" * 32)), W, "come from different saves"),
    "config-symlinked-outside": Hostile(_link_config_outside, C, "not valid JSON"),
    # sparse_config.json
    "invalid-json": Hostile(lambda d: (d / C).write_text('{"format": 1,'), C, "not valid JSON"),
    "config-not-object": Hostile(lambda d: (d / C).write_text("[1]"), C, "not a JSON object"),
    "config-deeply-nested": Hostile(
        lambda d: (d / C).write_text("[" * 100_000 + "]" * 100_000), C, r"not valid JSON \(RecursionError"
    ),
    "config-too-large": Hostile(_oversized_config, C, "larger than 16 MiB"),
    "config-duplicate-target": Hostile(_duplicate_target, C, f"not valid JSON .*duplicate key '{KEY}'"),
    "format-newer": Hostile(
        edit_meta(lambda m: m.update(format=FORMAT_VERSION + 1)), C, f"format {FORMAT_VERSION + 1} is newer"
    ),
    "format-missing": Hostile(edit_meta(lambda m: m.pop("format")), C, f"`format` is None, {_NOT_FORMAT}"),
    "format-zero": Hostile(edit_meta(lambda m: m.update(format=0)), C, f"`format` is 0, {_NOT_FORMAT}"),
    "format-string": Hostile(edit_meta(lambda m: m.update(format="1")), C, f"`format` is '1', {_NOT_FORMAT}"),
    "has-base-values-not-bool": Hostile(
        edit_meta(lambda m: m.update(has_base_values="yes")), C, "`has_base_values` is missing or not a bool"
    ),
    "invalid-sparse-config": Hostile(
        edit_meta(lambda m: m["config"].update(density=2)), C, r"invalid `config` \(`density` must be"
    ),
    "targets-empty": Hostile(edit_meta(lambda m: m.update(targets={})), C, "`targets` is empty"),
    "target-not-a-weight": Hostile(_rename_target(KEY + "."), C, "is not a parameter's state-dict key"),
    "target-shape-float": Hostile(_set_target(shape=[48.0, 48]), C, _BAD_TARGET),
    "target-shape-infinite": Hostile(_set_target(shape=[float("inf"), 48]), C, _BAD_TARGET),
    "target-count-string": Hostile(_set_target(count="115"), C, _BAD_TARGET),
    "target-name-with-line-break": Hostile(
        edit_meta(lambda m: m["targets"].update({"evil\nname.weight": {}})), C, r"target `evil\\nname\.weight` needs"
    ),
    "count-too-large": Hostile(_set_target(count=KEY_NUMEL + 1), C, "which do not fit"),
    "shape-beyond-int64": Hostile(_set_target(shape=[2**62, 4]), C, "which do not fit"),
    "count-mismatch": Hostile(
        edit_meta(_count_minus_one), W, f"`{IDX}` has {KEY_COUNT} entries but the config says {KEY_COUNT - 1}"
    ),
    # sparse_adapter.safetensors: the container
    "truncated-safetensors": Hostile(_truncate, W, _UNREADABLE),
    "random-bytes-safetensors": Hostile(_random_bytes, W, _UNREADABLE),
    "empty-safetensors": Hostile(lambda d: (d / W).write_bytes(b""), W, _UNREADABLE),
    "pickle-not-safetensors": Hostile(_pickle, W, _UNREADABLE),
    "header-length-beyond-file": Hostile(_set_header_length(lambda size: 2 * size), W, _UNREADABLE),
    "header-length-huge": Hostile(_set_header_length(lambda size: 2**63), W, _UNREADABLE),
    "data-offsets-huge": Hostile(
        edit_header(lambda h: h[VAL].update(data_offsets=[2**62, 2**62 + 4 * KEY_COUNT])), W, _UNREADABLE
    ),
    "data-offsets-negative": Hostile(
        edit_header(lambda h: h[VAL].update(data_offsets=[-4 * KEY_COUNT, 0])), W, _UNREADABLE
    ),
    "terabyte-tensor": Hostile(edit_header(_terabyte_values), W, _UNREADABLE),
    "duplicate-tensor-name": Hostile(_rewrite_header(_repeat_values_entry), W, f"duplicate key '{VAL}'"),
    # sparse_adapter.safetensors: the tensors
    "missing-tensor": Hostile(edit_tensors(_replace(VAL, lambda t: None)), W, rf"missing \['{VAL}'\]"),
    "extra-tensor": Hostile(
        edit_tensors(lambda t: t.update({"lm_head.weight.values": torch.zeros(3)})),
        W,
        r"unexpected \['lm_head.weight.values'\]",
    ),
    "indices-2d": Hostile(
        edit_tensors(_replace(IDX, lambda t: t.view(1, -1))),
        W,
        rf"`{IDX}` must be 1-D int32/int64, got torch.int32 \[1, {KEY_COUNT}\]",
    ),
    "indices-float": Hostile(
        edit_tensors(_replace(IDX, torch.Tensor.float)), W, rf"`{IDX}` must be 1-D int32/int64, got torch.float32"
    ),
    "values-int": Hostile(
        edit_tensors(_replace(VAL, torch.Tensor.int)),
        W,
        rf"`{VAL}` must be 1-D float32/bfloat16/float16/float64, got torch.int32",
    ),
    "values-float8": Hostile(
        edit_tensors(_replace(VAL, lambda t: t.to(torch.float8_e4m3fn))),
        W,
        rf"`{VAL}` must be .*, got torch.float8_e4m3fn",
    ),
    "values-shorter": Hostile(
        edit_tensors(_replace(VAL, lambda t: t[1:])),
        W,
        f"`{VAL}` has {KEY_COUNT - 1} entries but the config says {KEY_COUNT}",
    ),
    "base-values-2d": Hostile(edit_tensors(_replace(BASE, lambda t: t.view(1, -1))), W, f"`{BASE}` must be 1-D"),
    "index-out-of-range": Hostile(edit_tensors(_set(IDX, -1, KEY_NUMEL)), W, _OUTSIDE),
    "negative-index": Hostile(edit_tensors(_set(IDX, 0, -1)), W, _OUTSIDE),
    "unsorted-indices": Hostile(edit_tensors(_swap_first_two), W, f"`{IDX}` is not sorted and unique"),
    "duplicate-indices": Hostile(edit_tensors(_duplicate_first), W, f"`{IDX}` is not sorted and unique"),
    "nan-values": Hostile(edit_tensors(_set(VAL, 3, float("nan"))), W, f"`{VAL}` holds NaN or inf"),
    "inf-values": Hostile(edit_tensors(_set(VAL, 3, float("inf"))), W, f"`{VAL}` holds NaN or inf"),
    "nan-base-values": Hostile(edit_tensors(_set(BASE, 0, float("nan"))), W, f"`{BASE}` holds NaN or inf"),
    "base-values-other-dtype": Hostile(
        edit_tensors(_replace(BASE, lambda t: t.to(torch.bfloat16))),
        W,
        f"`{BASE}` is BF16 but {C} records the base as F32",
    ),
    "base-digest-not-hex": Hostile(
        _set_target(base_sha256="zz" * 32), C, f"`{KEY}` has `base_sha256` 'z{{64}}', not a sha256"
    ),
    "merged-digest-short": Hostile(
        _set_target(merged_sha256="ab"), C, f"`{KEY}` has `merged_sha256` 'ab', not a sha256"
    ),
}


# --------------------------------------------------------------------------------------------- deltas that round away

TINY = 50  # the deltas of KEY that `tiny_deltas` makes a bf16 or fp16 merge round away


def _tiny_deltas(tensors):
    for name in [n for n in tensors if n.endswith(".base_values")]:
        tensors[name.replace(".base_values", ".values")] = tensors[name].float() * 0.5
    tensors[VAL][:TINY] = tensors[BASE][:TINY].float() * 1e-6


def tiny_deltas(directory: Path) -> None:
    """Rewrite an adapter's values relative to its (nonzero) base values: half of each entry, which any merge keeps,
    except the first `TINY` of `KEY`: 1e-6 of the entry, far below half a unit in the last place, which is at least
    2^-9 of the entry in bf16 and 2^-12 in fp16, so a 16-bit merge loses exactly those (and an fp32 one none: 2^-25)."""
    edit_tensors(_tiny_deltas)(directory)


def hostile_copy(adapter: Path, destination: Path, case: str) -> Path:
    """Copy a valid adapter to `destination` and apply the hostile edit `case` of `HOSTILE_ADAPTERS`."""
    shutil.copytree(adapter, destination)
    HOSTILE_ADAPTERS[case].edit(destination)
    return destination


def refusal(directory: Path, case: str) -> str:
    """Regex of the one-line refusal of hostile `case` applied to `directory`: the file, the problem, then the fix."""
    hostile = HOSTILE_ADAPTERS[case]
    return rf"{re.escape(str(directory / hostile.file))}: .*{hostile.message}.*; \w"
