"""What the sparse optimizers share: finding each values tensor's layer, the step counter, the selection
hook after each step, remapping per-position state when indices change, the selection statistics in the
state dict, and skipping steps whose gradients are not finite. The optimizer is the selector's host: what
each may call on the other is `selection.protocol`."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..config import SparseConfig
from ..layer import SparseDeltaLinear
from ..model import iter_sparse_layers, require_sparse_layers
from ..selection import make_selector
from ..selection.protocol import SelectionSchedule

# Prefix of the selection statistics inside a values parameter's state in the optimizer's state dict.
_SELECTION = "selection."


class SparseOptimizer(torch.optim.Optimizer):
    """Base of `SM3` and `SparseAdamW`: a plain `torch.optim.Optimizer` that also owns the selection schedule.

    `params` is either a model prepared with `prepare_model` (its `values` are trained) or the usual
    iterable of parameters / param groups, with `model=` naming the model they belong to. With a `sparse_config`
    (by default the one `prepare_model` attached to the model), every `step()` ends by advancing its method's
    selection schedule, `selector` (SpIEL's prune/regrow, SMT's and SIFT's one-time choice), so a plain training
    loop (or the HF Trainer) needs nothing else; `total_steps` is the run length the schedules need (the
    `SparseCallback` gives it from the Trainer through `selector.set_total_steps`).
    """

    # Names of the state tensors with one entry per trained position (subclasses set them). Subclasses define
    # `_new_state(param, group)` (a fresh, zeroed state) and `_update(param, group)` (the per-parameter update), and
    # may override `_prepare_group(group)` to check or convert a param group before states are made.
    per_position_state: tuple[str, ...] = ()

    def __init__(
        self,
        params,
        defaults: dict,
        model: nn.Module | None = None,
        total_steps: int | None = None,
        sparse_config: SparseConfig | None = None,
    ):
        if isinstance(params, nn.Module):
            model, params = params, [layer.values for _, layer in require_sparse_layers(params)]
        super().__init__(params, defaults)
        # The sparse layers by key (the selector's names for them), and by their values tensor.
        self._keyed: dict[str, SparseDeltaLinear] = dict(iter_sparse_layers(model)) if model is not None else {}
        self._layers = {id(layer.values): layer for layer in self._keyed.values()}
        for group in self.param_groups:
            group.setdefault("sparse_step", 0)
            self._prepare_group(group)
            for param in group["params"]:
                # State from the start, not at the first update: torch.distributed.checkpoint, which FSDP checkpoints
                # go through, runs a zero-gradient step() on an optimizer without state (that would advance the
                # selection schedule) and loads a full state dict only into one that has state tensors.
                self.state[param] = self._new_state(param, group)
        self.selector: SelectionSchedule | None = None
        if sparse_config is None:
            sparse_config = getattr(model, "sparse_config", None)
        if sparse_config is not None and self._layers:
            self.selector = make_selector(model, sparse_config, self, total_steps)

    def layer_of(self, param: torch.Tensor) -> SparseDeltaLinear | None:
        """The `SparseDeltaLinear` whose `values` this is, or None for a plain parameter."""
        return self._layers.get(id(param))

    @property
    def completed_steps(self) -> int:
        """Optimizer steps taken, restored with the state dict, so the schedule resumes where it stopped."""
        return self.param_groups[0]["sparse_step"]

    @property
    def selection_done(self) -> bool:
        """Whether a one-time selection (SMT, SIFT) was made; kept in the param groups, so saved with the state."""
        return bool(self.param_groups[0].get("sparse_selected", False))

    def set_selection_done(self, done: bool) -> None:
        for group in self.param_groups:
            group["sparse_selected"] = done

    def _prepare_group(self, group: dict) -> None:
        """Check or convert a param group before its states are made (nothing by default)."""

    def reset_state(self, param: torch.Tensor) -> None:
        """A fresh, zeroed state for `param`, sized for its current values (after SMT's resize)."""
        group = next(g for g in self.param_groups if any(p is param for p in g["params"]))
        self.state[param] = self._new_state(param, group)

    def state_dict(self):
        """Torch's optimizer state dict, with the selection statistics gathered so far stored in the state of each
        layer's values under `selection.<name>`: per-parameter state is what torch.distributed.checkpoint (FSDP
        checkpoints) keeps, and it drops any other top-level key."""
        state = super().state_dict()
        if self.selector is not None:
            slot = {id(p): i for i, p in enumerate(p for group in self.param_groups for p in group["params"])}
            for key, saved in self.selector.state_dict().items():
                index = slot[id(self._keyed[key].values)]
                # a copy: torch's state dict shares the per-parameter dicts with `self.state`
                state["state"][index] = dict(state["state"].get(index, {})) | {
                    f"{_SELECTION}{name}": value for name, value in saved.items()
                }
        return state

    def load_state_dict(self, state_dict):
        slots = [i for group in state_dict["param_groups"] for i in group["params"]]
        param_of = dict(zip(slots, (p for group in self.param_groups for p in group["params"])))
        key_of = {id(layer.values): key for key, layer in self._keyed.items()} if self.selector is not None else {}
        selection, per_param = {}, {}
        for index, entry in state_dict["state"].items():
            per_param[index] = {k: v for k, v in entry.items() if not k.startswith(_SELECTION)}
            stats = {k.removeprefix(_SELECTION): v for k, v in entry.items() if k.startswith(_SELECTION)}
            key = key_of.get(id(param_of.get(index)))
            if stats and key is not None:
                selection[key] = stats
        super().load_state_dict(dict(state_dict) | {"state": per_param})
        if self.selector is not None:
            self.selector.load_state_dict(selection)
            self.selector.prepare_next_step()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._grads_finite():
            # Like a GradScaler skip: nothing moves (values, moments, accumulators, indices); the step still
            # counts so the schedule stays aligned with the Trainer's, and a decision due now waits.
            warnings.warn(
                f"{type(self).__name__}: non-finite gradient at step {self.completed_steps + 1}; "
                "this update and any selection due now are skipped.",
                RuntimeWarning,
                stacklevel=2,
            )
            for group in self.param_groups:
                group["sparse_step"] += 1
            if self.selector is not None:
                self.selector.prepare_next_step()
            return loss
        update = self.selector is None or self.selector.updates_allowed()
        for group in self.param_groups:
            for param in group["params"]:
                if update and param.grad is not None:
                    self._update(param, group)
            group["sparse_step"] += 1
        if self.selector is not None:
            self.selector.after_step()
        return loss

    def _grads_finite(self) -> bool:
        grads = [
            p.grad for group in self.param_groups for p in group["params"] if p.grad is not None and p.grad.numel()
        ]
        return not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())

    @torch.no_grad()
    def remap_state(self, param: torch.Tensor, source: torch.Tensor) -> None:
        """Follow new indices: slot j of every per-position state takes old slot `source[j]`, or 0 where -1."""
        state = self.state.get(param)
        if not state:
            return
        new = source < 0
        for key in self.per_position_state:
            if key in state:
                moved = state[key][source.clamp(min=0)]
                moved[new] = 0
                state[key] = moved
