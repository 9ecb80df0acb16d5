"""What every selection schedule shares: the layers it watches, the optimizer that advances it, the run
length, collectors switched on and off per step, and the metrics of its last decision."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..config import SparseConfig
from ..model import iter_sparse_layers


class Selector:
    """Base of `SpielSelector`, `SmtSelector` and `SiftSelector`.

    Owned by `SM3`/`SparseAdamW` and advanced by their `step()`: `after_step()` once each optimizer step has
    been applied, then `prepare_next_step()` sets each layer's gradient collector for the coming step's
    micro-batches. Steps are optimizer steps, whatever the gradient accumulation.
    """

    def __init__(self, model: nn.Module, config: SparseConfig, optimizer, total_steps: int | None = None):
        self.layers = list(iter_sparse_layers(model))
        self.config = config
        self.optimizer = optimizer
        self.total_steps = total_steps
        self.last_round: dict[str, float] = {}

    def prepare_next_step(self) -> None:
        raise NotImplementedError

    def after_step(self) -> None:
        raise NotImplementedError

    def require_total_steps(self) -> int:
        if self.total_steps is None:
            raise RuntimeError(
                f"{self.config.method.upper()} needs the training length for its schedule: pass `total_steps=` to the "
                "optimizer, set TrainingArguments.max_steps, or add `sparse_plugin.SparseCallback()` to the Trainer."
            )
        return self.total_steps

    def set_collectors(self, collectors: dict[str, Callable] | None) -> None:
        """Give each layer its collector for the coming micro-batches (None: plain sparse backward)."""
        for key, layer in self.layers:
            layer.grad_collector = None if collectors is None else collectors.get(key)


class OneShotSelector(Selector):
    """A method that gathers statistics from the start, chooses positions once, then keeps them (SMT, SIFT).

    Whether the choice is made lives in the optimizer's param groups (`sparse_selected`), so it is saved
    with the optimizer state and a resumed run does not choose again.
    """

    def __init__(self, model, config, optimizer, total_steps=None):
        super().__init__(model, config, optimizer, total_steps)
        for group in optimizer.param_groups:
            group.setdefault("sparse_selected", False)
        self.collectors: dict[str, Callable] = {}

    @property
    def selected(self) -> bool:
        return bool(self.optimizer.param_groups[0].get("sparse_selected", False))

    def mark_selected(self, metrics: dict[str, float]) -> None:
        for group in self.optimizer.param_groups:
            group["sparse_selected"] = True
        self.collectors.clear()
        self.set_collectors(None)
        self.last_round = metrics

    def prepare_next_step(self) -> None:
        if self.selected:
            self.set_collectors(None)
            return
        for key, layer in self.layers:
            self.collectors.setdefault(key, self.make_collector(layer))
        for collector in self.collectors.values():
            collector.new_step()
        self.set_collectors(self.collectors)

    def make_collector(self, layer) -> Callable:
        raise NotImplementedError
