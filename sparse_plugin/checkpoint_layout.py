"""Targets whose tensor a checkpoint stores in another layout: fused MoE experts.

transformers 5 fuses a MoE checkpoint's per-expert tensors (`model.layers.0.mlp.experts.3.gate_proj.weight`, ...)
into one `[E, out, in]` parameter when it loads the model, and splits it again when it saves. An adapter names a
target by the model's state-dict key (`model.layers.0.mlp.experts.gate_up_proj`), which is then no tensor of the
checkpoint. `split_for_checkpoint` re-expresses such a target on the checkpoint's own tensors: it runs the model
type's own reverse conversion (`transformers.core_model_loading.revert_weight_conversion`, what `save_pretrained`
does) on a tensor holding each entry's flat position, so every layout transformers knows (concatenated or
interleaved gate/up, transposed experts, renamed modules) maps exactly, with no table of our own.

Cost: the position tensor of one fused weight at a time (4 bytes per entry below 2^31 entries), on the CPU.

A split target's entries are the fused target's, in another order: the fused target's sha256 digests (`base_sha256`,
`merged_sha256`: of its entries in its own order) check them once every piece is in (`FusedDigests`), so a merge
refuses a wrong base without stored base values as it does for any other target.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from .io import Adapter, TargetDelta, entries_digest

_INT32_LIMIT = 2**31


@dataclasses.dataclass
class SplitTarget(TargetDelta):
    """The part of a fused target stored in one checkpoint tensor: its entries are the fused target's at `slots`
    (positions in the fused target's sorted indices), which has `fused_count` entries and these digests."""

    fused_key: str = ""
    slots: torch.Tensor | None = None
    fused_count: int = 0
    fused_base_sha256: str | None = None
    fused_merged_sha256: str | None = None


class FusedDigests:
    """Checks split targets against their fused target's digest: `add` each piece's entries as the merge reads
    them (before it writes), `mismatched` once every shard is done. Only targets without stored base values need
    it (those are compared piece by piece); `merged` picks `merged_sha256` (an unmerge) over `base_sha256`."""

    def __init__(self, adapter: Adapter, merged: bool = False):
        self.expected: dict[str, str] = {}
        self.counts: dict[str, int] = {}
        for target in adapter.targets.values():
            if not isinstance(target, SplitTarget) or target.base_values is not None:
                continue
            digest = target.fused_merged_sha256 if merged else target.fused_base_sha256
            if digest is not None:
                self.expected[target.fused_key] = digest
                self.counts[target.fused_key] = target.fused_count
        self.entries: dict[str, torch.Tensor] = {}
        self.filled: dict[str, int] = {}

    def add(self, target: TargetDelta, entries: torch.Tensor) -> None:
        """`entries`: the stored tensor's entries at `target.indices`."""
        if not isinstance(target, SplitTarget) or target.fused_key not in self.expected:
            return
        key = target.fused_key
        if key not in self.entries:
            self.entries[key] = torch.empty(self.counts[key], dtype=entries.dtype)
            self.filled[key] = 0
        self.entries[key][target.slots] = entries.cpu()
        self.filled[key] += target.slots.numel()

    def mismatched(self) -> list[str]:
        """The fused targets whose re-assembled entries do not match their digest (or were not all seen)."""
        return [
            key
            for key, digest in self.expected.items()
            if self.filled.get(key) != self.counts[key] or entries_digest(self.entries[key]) != digest
        ]


def split_for_checkpoint(adapter: Adapter, header: dict, model_dir: str | Path) -> Adapter:
    """`adapter` with every target that `header` lacks replaced by targets on the checkpoint tensors it is stored
    as; unchanged when nothing is missing or the layout cannot be derived (the merge then names the missing tensor).

    Split targets (`SplitTarget`) keep their values and base values (so an unmerge stays exact); the fused target's
    sha256 digests, which cover its entries in its own order, travel with each piece for `FusedDigests`.
    """
    missing = [key for key in adapter.targets if key not in header]
    if not missing:
        return adapter
    model = _meta_model(Path(model_dir))
    if model is None:
        return adapter
    from transformers.core_model_loading import revert_weight_conversion

    targets = {key: target for key, target in adapter.targets.items() if key not in missing}
    for key in missing:
        target = adapter.targets[key]
        numel = math.prod(target.shape)
        dtype = torch.int32 if numel < _INT32_LIMIT else torch.int64
        converted = revert_weight_conversion(model, {key: torch.arange(numel, dtype=dtype).view(target.shape)})
        if set(converted) == {key} or not set(converted) <= set(header):
            targets[key] = target  # not a layout transformers converts: refused by the header check
            continue
        for stored_key, positions in converted.items():
            flat = positions.reshape(-1).long()  # the fused position each entry of the stored tensor holds
            local = torch.isin(flat, target.indices).nonzero().squeeze(1)
            if local.numel() == 0:
                continue
            slots = torch.searchsorted(target.indices, flat[local])
            base = None if target.base_values is None else target.base_values[slots]
            targets[stored_key] = SplitTarget(
                stored_key,
                tuple(positions.shape),
                target.base_dtype,
                local,
                target.values[slots],
                base,
                fused_key=key,
                slots=slots,
                fused_count=target.indices.numel(),
                fused_base_sha256=target.base_sha256,
                fused_merged_sha256=target.merged_sha256,
            )
    return dataclasses.replace(adapter, targets=targets)


def _meta_model(model_dir: Path):
    """The checkpoint's architecture on the meta device (no weights), or None where transformers cannot build it."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except (ImportError, OSError, ValueError, KeyError):
        return None
