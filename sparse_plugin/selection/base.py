"""What every selection schedule shares: the layers it watches, the optimizer that advances it, the run
length, collectors switched on and off per step (and saved with the optimizer state), and the metrics of its
last decision. What a selector and its optimizer may call on each other is written down in `protocol`."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from ..config import SparseConfig
from ..model import iter_sparse_layers
from .protocol import SelectionHost


class Collector:
    """Statistics one layer gathers from its dense gradient; `STATE` names the attributes a checkpoint keeps,
    so a run killed between gathering and deciding resumes with the same numbers."""

    STATE: tuple[str, ...] = ()

    def new_step(self) -> None:
        """Called before each optimizer step's micro-batches."""

    def state_dict(self) -> dict:
        """The `STATE` attributes that are set, numbers as one-element float64 tensors: torch.distributed.checkpoint
        (FSDP checkpoints) carries neither None nor a plain number that a freshly built optimizer lacks."""
        saved = {}
        for name in self.STATE:
            value = getattr(self, name)
            if isinstance(value, (int, float)):
                value = torch.tensor([value], dtype=torch.float64)
            if value is not None:
                saved[name] = value
        return saved

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        for name in self.STATE:
            if name not in state:  # not set yet when saved, as in a fresh collector
                continue
            value, default = state[name], getattr(self, name)
            if isinstance(default, (int, float)):
                value = type(default)(value.item() if isinstance(value, torch.Tensor) else value)
            elif isinstance(value, torch.Tensor):
                value = value.to(device)
            setattr(self, name, value)


class Selector(ABC):
    """Base of `SpielSelector`, `SmtSelector` and `SiftSelector`, implementing `protocol.SelectionSchedule`.

    Owned by `SM3`/`SparseAdamW` and advanced by their `step()`: `after_step()` once each optimizer step has
    been applied, then `prepare_next_step()` sets each layer's gradient collector for the coming step's
    micro-batches. Steps are optimizer steps, whatever the gradient accumulation. It calls on `optimizer` only
    what `protocol.SelectionHost` lists.
    """

    def __init__(
        self, model: nn.Module, config: SparseConfig, optimizer: SelectionHost, total_steps: int | None = None
    ):
        self.layers = list(iter_sparse_layers(model))
        self.config = config
        self.optimizer = optimizer
        self.total_steps = total_steps
        self.last_round: dict[str, float] = {}
        self.collectors: dict[str, Collector] = {}

    @abstractmethod
    def make_collector(self, layer) -> Collector:
        """A fresh statistics collector for `layer`."""

    @abstractmethod
    def prepare_next_step(self) -> None:
        """Set each layer's collector (or none) for the coming step's micro-batches."""

    @abstractmethod
    def after_step(self) -> None:
        """Act on the step just applied (decide, prune/regrow), then prepare the next one."""

    def set_total_steps(self, total_steps: int | None) -> None:
        """The run length, once known, and the coming step prepared again (whether it gathers may depend on it)."""
        self.total_steps = total_steps
        self.prepare_next_step()

    def pop_metrics(self) -> dict[str, float]:
        """The metrics of the decisions since the last call (empty if none), handed out once."""
        metrics, self.last_round = self.last_round, {}
        return metrics

    def updates_allowed(self) -> bool:
        """Whether this step may update the values (not while a method is still choosing positions: DDP hands
        zero gradients to parameters that got none, and an optimizer step on them would still age the moments)."""
        return True

    def state_dict(self) -> dict:
        """The statistics gathered so far, per layer key (what a resumed run needs to decide the same way)."""
        return {key: collector.state_dict() for key, collector in self.collectors.items()}

    def load_state_dict(self, state: dict) -> None:
        """Collectors from saved statistics, per layer key (the optimizer maps its state dict's entries to keys)."""
        layers = dict(self.layers)
        self.collectors = {}
        for key, saved in state.items():
            self.collectors[key] = self.make_collector(layers[key])
            self.collectors[key].load_state_dict(saved, layers[key].indices.device)

    def require_total_steps(self) -> int:
        if self.total_steps is None:
            raise RuntimeError(
                f"{self.config.method.upper()} needs the training length for its schedule: pass `total_steps=` to the "
                "optimizer, set TrainingArguments.max_steps, or add `sparse_plugin.SparseCallback()` to the Trainer."
            )
        return self.total_steps

    def set_collectors(self, collectors: dict[str, Collector] | None) -> None:
        """Give each layer its collector for the coming micro-batches (None: plain sparse backward)."""
        for key, layer in self.layers:
            layer.grad_collector = None if collectors is None else collectors.get(key)


class OneShotSelector(Selector):
    """A method that gathers statistics from the start, chooses positions once, then keeps them (SMT, SIFT).

    Whether the choice is made is kept by the optimizer (`selection_done`), so it is saved with the optimizer
    state and a resumed run does not choose again.
    """

    def __init__(self, model, config, optimizer, total_steps=None):
        super().__init__(model, config, optimizer, total_steps)
        optimizer.set_selection_done(False)

    @property
    def selected(self) -> bool:
        return self.optimizer.selection_done

    def updates_allowed(self) -> bool:
        return self.selected

    def mark_selected(self, metrics: dict[str, float]) -> None:
        self.optimizer.set_selection_done(True)
        self.collectors.clear()
        self.set_collectors(None)
        self.last_round = metrics

    def prepare_next_step(self) -> None:
        if self.selected:
            self.set_collectors(None)
            return
        for key, layer in self.layers:
            if key not in self.collectors:
                self.collectors[key] = self.make_collector(layer)
        for collector in self.collectors.values():
            collector.new_step()
        self.set_collectors(self.collectors)
