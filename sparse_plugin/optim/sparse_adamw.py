"""Sparse-masked AdamW (`spiel_adamw`): AdamW on the trained positions only, with state that follows them.

Moments are stored per trained position (never per dense weight) together with each position's own step
count, so a position regrown at step t gets the bias correction of a fresh start instead of the global
one, as in the SpIEL reference (AlanAnsell/peft `SftAdamW`, commit 07df253, "age"; int16, saturating where the
corrections reach exactly 1, see `age_cap`). When indices change the
moments of surviving positions move with them and new positions start from zero.

It also trains a dense parameter on a subset of its entries: give the group a `mask` (bool tensor of the
parameter's shape, or flat indices) and only those entries move; state is kept for them alone.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import SparseConfig
from .base import SparseOptimizer

REGROWN_STARTS = ("fresh", "ramp")


class SparseAdamW(SparseOptimizer):
    """AdamW with decoupled weight decay over sparse positions.

    Args:
        params (`nn.Module` or iterable): a prepared model, or parameters / param groups (a group may carry
            `mask`, see the module docstring) with `model=` for the sparse layers' selection schedule.
        lr (`float`, defaults to 1e-3), betas (`tuple`, defaults to (0.9, 0.999)), eps (`float`, defaults
            to 1e-8): as in `torch.optim.AdamW`.
        weight_decay (`float`, defaults to 0.0): decoupled; on a sparse delta it pulls W toward the
            pretrained weight.
        regrown_start (`str`, defaults to `"fresh"`): the first updates of a position regrown by a prune/regrow
            round. `"fresh"` (the SpIEL reference): zero moments with its own bias correction, so its first update
            is a full `lr`-sized step. `"ramp"`: the same moments, but a position younger than the matrix's oldest
            takes age / (1 / (1 − β1)) of its step (10 steps to full size at β1 = 0.9).
        model (`nn.Module`, *optional*): the prepared model, when `params` are parameters.
        total_steps (`int`, *optional*): training length, for the reselection-rate decay.
        sparse_config (`SparseConfig`, *optional*): the selection method's settings; defaults to the model's
            (`prepare_model` attaches it).

    Example:
        ```python
        >>> optimizer = SparseAdamW(model, lr=1e-4)
        >>> SparseAdamW([{"params": [w], "mask": w_mask}], lr=1e-3)   # only w[w_mask] moves
        ```
    """

    per_position_state = ("exp_avg", "exp_avg_sq", "age")

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        regrown_start: str = "fresh",
        *,
        model: nn.Module | None = None,
        total_steps: int | None = None,
        sparse_config: SparseConfig | None = None,
    ):
        if not lr >= 0:
            raise ValueError(f"SparseAdamW `lr` must be >= 0, got {lr!r}.")
        if not all(0 <= b < 1 for b in betas) or len(betas) != 2:
            raise ValueError(f"SparseAdamW `betas` must be two numbers in [0, 1), got {betas!r}.")
        if not eps >= 0 or not weight_decay >= 0:
            raise ValueError(f"SparseAdamW `eps` and `weight_decay` must be >= 0, got {eps!r}, {weight_decay!r}.")
        if regrown_start not in REGROWN_STARTS:
            raise ValueError(f"SparseAdamW `regrown_start` must be one of {REGROWN_STARTS}, got {regrown_start!r}.")
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "regrown_start": regrown_start,
            "mask": None,
        }
        super().__init__(params, defaults, model=model, total_steps=total_steps, sparse_config=sparse_config)

    def _prepare_group(self, group: dict) -> None:
        if group["mask"] is not None:
            if len(group["params"]) != 1:
                raise ValueError("A SparseAdamW group with `mask` must hold exactly one parameter.")
            group["mask"] = _flat_positions(group["mask"], group["params"][0])

    def _new_state(self, param: torch.Tensor, group: dict) -> dict:
        count = param.numel() if group["mask"] is None else group["mask"].numel()
        state = {
            key: torch.zeros(count, dtype=torch.float32, device=param.device) for key in ("exp_avg", "exp_avg_sq")
        }
        age_dtype = torch.int16 if age_cap(group["betas"]) <= torch.iinfo(torch.int16).max else torch.int32
        state["age"] = torch.zeros(count, dtype=age_dtype, device=param.device)
        return state

    def _update(self, param: torch.Tensor, group: dict) -> None:
        positions = group["mask"]
        flat = param.view(-1)
        grad = param.grad.view(-1)
        if positions is not None:
            grad = grad[positions]
        grad = grad.float()
        state = self.state[param]
        if not state:  # a state dict without this parameter's state was loaded
            state.update(self._new_state(param, group))
        beta1, beta2 = group["betas"]
        state["age"].add_(1).clamp_(max=age_cap(group["betas"]))
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias1 = 1 - beta1 ** state["age"]
        bias2 = 1 - beta2 ** state["age"]
        step = (state["exp_avg"] / bias1) / ((state["exp_avg_sq"] / bias2).sqrt_().add_(group["eps"]))
        if group["regrown_start"] == "ramp" and positions is None:
            age = state["age"]
            ramp = (age.float() * (1 - beta1)).clamp_(max=1.0)
            step.mul_(ramp.masked_fill_(age == age.max(), 1.0))  # the oldest (the first chosen) are not ramped
        current = (flat if positions is None else flat[positions]).float()
        if group["weight_decay"] > 0:
            current = current * (1 - group["lr"] * group["weight_decay"])
        updated = current - group["lr"] * step
        if positions is None:
            flat.copy_(updated)
        else:
            flat[positions] = updated.to(param.dtype)


def age_cap(betas: tuple[float, float]) -> int:
    """The age after which both bias corrections 1 - β^age are exactly 1 in fp32 (β^age < 2^-26), so a position's
    age may stop counting there: 18,014 steps for β = 0.999, which lets ages live in int16 (2 B per position)."""
    beta = max(betas)
    return 1 if beta == 0 else math.ceil(-26 * math.log(2) / math.log(beta))


def _flat_positions(mask: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """Flat int64 positions from a bool mask of `param`'s shape or from indices; clear errors otherwise."""
    mask = torch.as_tensor(mask, device=param.device)
    if mask.dtype == torch.bool:
        if mask.shape != param.shape:
            raise ValueError(f"`mask` has shape {list(mask.shape)} but the parameter is {list(param.shape)}.")
        return mask.reshape(-1).nonzero().squeeze(1)
    if mask.dtype in (torch.int32, torch.int64) and mask.dim() == 1:
        positions = mask.long().unique()
        if positions.numel() and (positions[0] < 0 or positions[-1] >= param.numel()):
            raise ValueError(f"`mask` indices must lie in [0, {param.numel()}).")
        return positions
    raise ValueError(f"`mask` must be a bool tensor shaped like the parameter or 1-D int indices, got {mask.dtype}.")
