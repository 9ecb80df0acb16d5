"""The contract between a selection method and the optimizer that drives it: all either side may call on the other.

A selector is built by the optimizer, as `SELECTORS[config.method](model, config, host, total_steps)`, and speaks
of layers by their keys in `iter_sparse_layers(model)`. It calls on its host (`SparseOptimizer`) only:

    host.completed_steps -> int              optimizer steps taken (1-based schedules: the coming one is +1)
    host.selection_done -> bool              a one-time choice was made (kept in the optimizer's state dict)
    host.set_selection_done(done)            record it; a one-shot selector sets False when built
    host.reset_state(values)                 fresh per-position state, after the values were resized
    host.remap_state(values, source)         per-position state follows new indices: slot j <- old slot source[j]
    host.row_col_accumulators(values)        SM3 only (`RowColAccumulators`): (r, c), or None before any update

The optimizer and `SparseCallback` call on a selector (`optimizer.selector`, None without a sparse config) only:

    selector.updates_allowed() -> bool       may this step update the values (asked before each update)
    selector.after_step()                    after each applied step: decide, then prepare the next step
    selector.prepare_next_step()             after a skipped (non-finite) step or a loaded state dict
    selector.set_total_steps(n)              the run length, once known (`SparseCallback` at train begin)
    selector.pop_metrics() -> dict           `sparse/*` metrics of the decisions since the last call, once
    selector.state_dict() / load_state_dict  statistics gathered so far, {layer key: {name: tensor}}

`Selector` (in `base`) implements the selector side with per-layer gradient collectors; any class with these
methods works. docs/extending.md walks through adding a method.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


class SelectionHost(Protocol):
    """What a selector may call on the optimizer that drives it."""

    @property
    def completed_steps(self) -> int: ...

    @property
    def selection_done(self) -> bool: ...

    def set_selection_done(self, done: bool) -> None: ...

    def reset_state(self, param: torch.Tensor) -> None: ...

    def remap_state(self, param: torch.Tensor, source: torch.Tensor) -> None: ...


@runtime_checkable
class RowColAccumulators(Protocol):
    """A host that keeps SM3's row and column accumulators (SpIEL-MA scores positions by them)."""

    def row_col_accumulators(self, param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None: ...


class SelectionSchedule(Protocol):
    """What the optimizer and the Trainer callback may call on a selector."""

    def updates_allowed(self) -> bool: ...

    def after_step(self) -> None: ...

    def prepare_next_step(self) -> None: ...

    def set_total_steps(self, total_steps: int | None) -> None: ...

    def pop_metrics(self) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, dict]: ...

    def load_state_dict(self, state: dict[str, dict]) -> None: ...
