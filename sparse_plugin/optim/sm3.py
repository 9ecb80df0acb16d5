"""SM3 for sparse deltas (`spiel_sm3`): adaptive steps from O(out + in) state per matrix.

SM3 (Anil et al., arXiv:1901.11150) covers a matrix by its rows and columns and keeps one accumulator per
row (r, out) and per column (c, in). For each trained position (i, j):
ν = min(r_i, c_j) + g², then r_i ← max over the row's trained positions of ν, c_j likewise (rows and
columns with none keep their value), and Δ ← Δ − lr · g / √(ν + ε). SpIEL-MA (arXiv:2401.16405) reuses
r_i · c_j as the regrowth score of inactive positions, so the selection needs no extra memory.

Ported in spirit from AlanAnsell/peft `src/peft/tuners/sft/optimizer.py` (`SftSM3`, commit 07df253); changed:
torch `scatter_reduce_` instead of torch_scatter, fp32 update copied back to any values dtype, decoupled
weight decay toward the pretrained weight, and an EMA `beta` under which the accumulators can decrease.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import SparseConfig
from .base import SparseOptimizer


class SM3(SparseOptimizer):
    """SM3 over the `values` of `SparseDeltaLinear` layers.

    Args:
        params (`nn.Module` or iterable): a prepared model, or its `values` parameters / param groups
            together with `model=`.
        lr (`float`, defaults to 1e-3): learning rate (the SpIEL reference uses ~1e-3 for SM3).
        momentum (`float`, defaults to 0.0): heavy-ball momentum in [0, 1); adds one value per position.
        beta (`float`, defaults to 0.0): 0 is the paper's SM3 (accumulators only grow); in (0, 1) an EMA,
            ν = β·min(r_i, c_j) + (1 − β)·g², so old gradients fade, with Adam's bias correction: the step
            divides by √(ν / (1 − βᵗ)) at the t-th update (our documented extension).
        eps (`float`, defaults to 1e-30): added under the square root, as in SM3's reference.
        weight_decay (`float`, defaults to 0.0): decoupled decay of Δ toward 0, i.e. of W toward the
            pretrained weight.
        model (`nn.Module`, *optional*): the prepared model, when `params` are parameters.
        total_steps (`int`, *optional*): training length, for the reselection-rate decay.
        sparse_config (`SparseConfig`, *optional*): the selection method's settings; defaults to the model's
            (`prepare_model` attaches it).

    Example:
        ```python
        >>> optimizer = SM3(model, lr=1e-3, total_steps=1000)   # model from prepare_model
        >>> loss.backward(); optimizer.step(); optimizer.zero_grad()
        ```
    """

    per_position_state = ("momentum_buffer",)

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        momentum: float = 0.0,
        beta: float = 0.0,
        eps: float = 1e-30,
        weight_decay: float = 0.0,
        *,
        model: nn.Module | None = None,
        total_steps: int | None = None,
        sparse_config: SparseConfig | None = None,
    ):
        for name, value, low, high in (
            ("lr", lr, 0, None),
            ("momentum", momentum, 0, 1),
            ("beta", beta, 0, 1),
            ("eps", eps, 0, None),
            ("weight_decay", weight_decay, 0, None),
        ):
            if not (value >= low and (high is None or value < high)):
                bound = f"[{low}, {high})" if high is not None else f">= {low}"
                raise ValueError(f"SM3 `{name}` must be {bound}, got {value!r}.")
        defaults = {"lr": lr, "momentum": momentum, "beta": beta, "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults, model=model, total_steps=total_steps, sparse_config=sparse_config)

    def _prepare_group(self, group: dict) -> None:
        if any(self.layer_of(param) is None for param in group["params"]):
            raise ValueError(
                "SM3 here trains sparse deltas only: every parameter must be the `values` of a "
                "sparse target of `model`; freeze the others or train them with another optimizer."
            )

    def _new_state(self, param: torch.Tensor, group: dict) -> dict:
        layer = self.layer_of(param)
        state = {
            "step": torch.zeros((), dtype=torch.float32),
            "row_acc": torch.zeros(layer.out_features, dtype=torch.float32, device=param.device),
            # one column accumulator per (stacked matrix, column): per (expert, column) for fused MoE experts
            "col_acc": torch.zeros(layer.matrices * layer.in_features, dtype=torch.float32, device=param.device),
        }
        if group["momentum"] > 0:
            state["momentum_buffer"] = torch.zeros(param.numel(), dtype=torch.float32, device=param.device)
        return state

    def row_col_accumulators(self, param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(r, c) of a values tensor, or None before its first update: SpIEL-MA's regrowth statistics."""
        state = self.state.get(param)
        return (state["row_acc"], state["col_acc"]) if state and state["step"] > 0 else None

    def _update(self, param: torch.Tensor, group: dict) -> None:
        layer = self.layer_of(param)
        pattern = layer.pattern()
        state = self.state[param]
        if not state:  # a state dict without this parameter's state was loaded
            state.update(self._new_state(param, group))
        grad = param.grad.float()
        lengths, cols = pattern.row_lengths, pattern.column_slots.long()
        row_acc, col_acc = state["row_acc"], state["col_acc"]
        # Positions are sorted by row: a row's accumulator spreads over its run and its maximum is a segment
        # reduction, with no per-position row ids; columns are scattered.
        nu = torch.minimum(row_acc.repeat_interleave(lengths, output_size=cols.numel()), col_acc[cols])
        beta = group["beta"]
        if beta > 0:
            nu.mul_(beta).addcmul_(grad, grad, value=1 - beta)
        else:
            nu.addcmul_(grad, grad)
        row_max = torch.segment_reduce(nu, "max", lengths=lengths, unsafe=True)
        torch.where(lengths > 0, row_max, row_acc, out=row_acc)  # rows without positions keep their value
        col_acc.scatter_reduce_(0, cols, nu, "amax", include_self=False)
        if beta > 0:  # an EMA starts at (1 − β)·g²: without Adam's correction the first steps are 1/√(1 − β) too long
            nu.div_(1 - beta ** float(state["step"] + 1))
        update = nu.add_(group["eps"]).rsqrt_().mul_(grad)
        if group["momentum"] > 0:
            update = state["momentum_buffer"].mul_(group["momentum"]).add_(update, alpha=1 - group["momentum"])
        values = param.float()
        if group["weight_decay"] > 0:
            values.mul_(1 - group["lr"] * group["weight_decay"])
        param.copy_(values.add_(update, alpha=-group["lr"]))
        state["step"] += 1
