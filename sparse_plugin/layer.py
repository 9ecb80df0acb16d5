"""`SparseDeltaLinear`: a frozen linear layer plus a trainable sparse delta, and its autograd Function.

The effective weight is W0 + scatter(indices, values). The layer asks its base module two things only:
`base_layer(x)` (additive forward) and, for the merged forward and in-memory merge, its dense weight.
Backward returns the input gradient and the values' gradient (an SDDMM at the indices), nothing dense
survives it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .kernels.scatter import scatter_add_, scatter_set_
from .kernels.blocks import BlockPattern, block_grid, tiles_whole_blocks
from .kernels.merged_weight import merged_weight
from .kernels.sddmm import SparsePattern

# Measured by tools/bench_layer.py (torch 2.13 CPU, 2 cores, fp32, fwd+bwd): merged costs two copies of
# W0 per step, additive two CSR products costing ~density·tokens·out·in. At 0.5% merged was 0.45-0.80× the
# additive step on all six shapes (SmolLM2 at 512 tokens, 4096×4096 / 4096×11008 at 2048); at 0.05-0.2%
# it still won on SmolLM2 shapes but lost 1.3-1.4× on 4096×4096 at 256 tokens. The true crossover moves
# with tokens and matrix size (4096×4096: ~0.1% at 2048 tokens, ~1% at 512, ~2-4.6% at 256), so a density
# threshold alone is a compromise aimed at training batches of >= 512 tokens.
MERGED_MIN_DENSITY = 0.004


class SparseLinearFunction(torch.autograd.Function):
    """y = x · Δᵀ (additive, `base_weight is None`) or y = x · (W0 + Δ)ᵀ + b (merged).

    Only `x` and `values` get gradients: dx, and dvalues[p] = Σ_t dy[t, i_p] · x[t, j_p]. The merged
    weight is rebuilt in backward rather than saved, so no dense weight copy outlives the call. With a
    `collector` (set while a selection method gathers statistics) backward forms this layer's dense weight
    gradient dyᵀx once and hands it to the collector, which returns the values' gradient (or None: no update
    while a method is still choosing positions); the dense gradient is freed at once.
    """

    @staticmethod
    def forward(ctx, x, values, pattern, base_weight, bias, grad_path, collector=None):
        x2 = x.reshape(-1, x.shape[-1])
        if base_weight is None:
            out = pattern.matmul(x2, values).to(x.dtype)
        else:
            out = F.linear(x2, _merged_weight(base_weight, values, pattern, x.dtype), bias)
        ctx.save_for_backward(x, values, base_weight)
        ctx.pattern, ctx.grad_path, ctx.collector = pattern, grad_path, collector
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x, values, base_weight = ctx.saved_tensors
        x2 = x.reshape(-1, x.shape[-1])
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dvalues = None
        if ctx.needs_input_grad[0]:
            if base_weight is None:
                dx2 = ctx.pattern.matmul_t(dy2, values)
            else:
                dx2 = dy2 @ _merged_weight(base_weight, values, ctx.pattern, dy.dtype)
            dx = dx2.to(x.dtype).view_as(x)
        if ctx.collector is not None:
            dense = (dy2.t() @ x2).float()
            if torch.isfinite(dense).all():
                dvalues = ctx.collector(dense)
            else:  # kept out of the statistics; the optimizer sees the non-finite gradient and skips the step
                dvalues = dense.view(-1).index_select(0, ctx.pattern.indices)
            dvalues = None if dvalues is None else dvalues.to(values.dtype)
        elif ctx.needs_input_grad[1]:
            dvalues = ctx.pattern.values_grad(dy2, x2, ctx.grad_path).to(values.dtype)
        return dx, dvalues, None, None, None, None, None


def _merged_weight(base_weight: torch.Tensor, values: torch.Tensor, pattern: SparsePattern, dtype) -> torch.Tensor:
    """W0 + Δ in `dtype` for this call: one fused Triton pass on CUDA, a copy and a torch scatter on CPU."""
    return merged_weight(base_weight, values.detach(), pattern, dtype)


def dense_base_weight(base_layer: nn.Module) -> torch.Tensor:
    """The base's dense (out × in) weight, or a `TypeError` saying the base cannot give one."""
    weight = getattr(base_layer, "weight", None)
    if type(base_layer) is nn.Linear and weight is not None:
        return weight
    raise TypeError(
        f"{type(base_layer).__name__} does not expose a dense floating-point weight; use the additive forward "
        "(forward_strategy='additive') and merge with `sparse-merge` on the full-precision checkpoint."
    )


class SparseDelta(nn.Module):
    """The trained part of a `SparseDeltaLinear`: sorted unique flat positions `indices` (an `int64` buffer) and
    their `values` (the `nn.Parameter`, zero at first so a freshly prepared model equals its base).

    A module of its own so that sharding wrappers can leave it whole: FSDP shards the frozen base and is told to
    ignore these modules (`sparse_plugin.keep_deltas_replicated`), since prune/regrow and SM3's row/column maxima
    need each layer's whole values vector on every rank.
    """

    def __init__(self, indices: torch.Tensor, values_dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.register_buffer("indices", indices.to(device=device, dtype=torch.int64))
        self.values = nn.Parameter(torch.zeros(indices.numel(), dtype=values_dtype, device=device))

    @torch.no_grad()
    def set_indices(self, indices: torch.Tensor) -> None:
        """Train a new set of positions (any count), all starting at Δ = 0; the `values` Parameter object stays
        the same (optimizers and gradient hooks keep referring to it), only its data is replaced."""
        self.indices = indices.to(device=self.indices.device, dtype=torch.int64)
        new = torch.zeros(indices.numel(), dtype=self.values.dtype, device=self.values.device)
        # Autograd caches a leaf's gradient accumulator with its shape, and a graph still alive from the last
        # step (the caller's `loss`) keeps it; assigning `.data` drops that cache only on a dtype change, so
        # pass through another dtype first or the next backward rejects the new shape.
        self.values.data = new.to(torch.float64 if new.dtype != torch.float64 else torch.float32)
        self.values.data = new
        self.values.grad = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint of a method that changes per-layer counts (SMT) loads into a freshly prepared model.
        incoming = state_dict.get(prefix + "indices")
        if incoming is not None and incoming.shape != self.indices.shape:
            self.set_indices(incoming)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class SparseDeltaLinear(nn.Module):
    """A frozen `base_layer` plus a trainable sparse delta at flat positions `indices` of its weight.

    Args:
        base_layer (`nn.Module`): the frozen linear module (`nn.Linear` or a quantised variant) it wraps.
        indices (`torch.Tensor`): sorted unique flat positions in the (out × in) weight.
        values_dtype (`torch.dtype`, defaults to `torch.float32`): dtype of the trained values.
        forward_strategy (`str`, defaults to `"auto"`): `"additive"`, `"merged"` or `"auto"`.
        block_size (`int`, *optional*): SMT's block edge; while the indices tile whole blocks of that grid,
            the products run as block GEMMs.

    Attributes:
        base_layer: the wrapped module. delta: the `SparseDelta` holding `indices` and `values`, which the
        layer also exposes as `layer.indices` and `layer.values`.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        indices: torch.Tensor,
        values_dtype: torch.dtype = torch.float32,
        forward_strategy: str = "auto",
        block_size: int | None = None,
    ):
        super().__init__()
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.forward_strategy = forward_strategy
        self.block_size = block_size
        self.delta = SparseDelta(indices, values_dtype, base_layer.weight.device)
        self.merged = False
        # Called with the dense weight gradient inside backward while a selection method gathers statistics;
        # returns the values' gradient or None.
        self.grad_collector = None
        self._merged_base_values: torch.Tensor | None = None
        self._pattern_key: tuple | None = None
        self._pattern: SparsePattern | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def pattern(self) -> SparsePattern:
        """Structure of the current indices (a `BlockPattern` when they tile SMT blocks), rebuilt only when
        they change (in place or replaced)."""
        key = (self.indices.data_ptr(), self.indices._version, self.indices.numel())
        if key != self._pattern_key:
            block = block_grid(self.shape, self.block_size) if self.block_size else None
            if block is not None and tiles_whole_blocks(self.indices, self.shape, block):
                self._pattern = BlockPattern(self.indices, self.shape, block)
            else:
                self._pattern = SparsePattern(self.indices, self.shape)
            self._pattern_key = key
        return self._pattern

    @property
    def indices(self) -> torch.Tensor:
        return self.delta.indices

    @property
    def values(self) -> nn.Parameter:
        return self.delta.values

    def set_indices(self, indices: torch.Tensor) -> None:
        """Train a new set of positions (any count), all starting at Δ = 0 (see `SparseDelta.set_indices`)."""
        self.delta.set_indices(indices)

    def strategy(self, compute_dtype: torch.dtype) -> str:
        """The forward strategy for this call: the configured one, or the measured rule for `"auto"`.

        Merged only where it is exact and allowed: a plain fp32 `nn.Linear` (bf16/fp16 W0 + Δ would round
        small deltas away), fp32 compute, a frozen bias, and a density where it is faster.
        """
        if self.forward_strategy != "auto":
            return self.forward_strategy
        base = self.base_layer
        mergeable = (
            type(base) is nn.Linear
            and base.weight.dtype == torch.float32
            and compute_dtype == torch.float32
            and (base.bias is None or not base.bias.requires_grad)
        )
        return "merged" if mergeable and self.pattern().density >= MERGED_MIN_DENSITY else "additive"

    # torch.compile runs this layer eagerly (a graph break per layer): the index bookkeeping (pattern cache,
    # collectors, indices that change between steps) would otherwise force recompiles; the rest of the model
    # still compiles.
    @torch.compiler.disable
    def forward(self, x: torch.Tensor, grad_path: str = "auto") -> torch.Tensor:
        if self.merged or self.indices.numel() == 0:
            return self.base_layer(x)
        device_type = x.device.type
        # Under autocast the base runs as autocast says; the delta runs in the autocast dtype explicitly.
        compute_x = x.to(torch.get_autocast_dtype(device_type)) if torch.is_autocast_enabled(device_type) else x
        if self.strategy(compute_x.dtype) == "merged":
            base = self.base_layer
            weight = dense_base_weight(base)
            return SparseLinearFunction.apply(x, self.values, self.pattern(), weight, base.bias, grad_path, self.grad_collector)
        base_out = self.base_layer(x)
        with torch.autocast(device_type, enabled=False):
            delta = SparseLinearFunction.apply(compute_x, self.values, self.pattern(), None, None, grad_path, self.grad_collector)
        return base_out + delta.to(base_out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """Dense Δ (out × in) in the values' dtype; for tests and inspection, not for training."""
        delta = torch.zeros(self.shape, dtype=self.values.dtype, device=self.values.device)
        delta.view(-1)[self.indices] = self.values.detach()
        return delta

    @torch.no_grad()
    def merge(self) -> None:
        """Fold Δ into the base weight in place; `unmerge` restores the old entries bit for bit."""
        if self.merged:
            return
        weight = dense_base_weight(self.base_layer)
        self._merged_base_values = weight.view(-1)[self.indices].clone()
        scatter_add_(weight.data, self.indices, self.values.detach())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        scatter_set_(dense_base_weight(self.base_layer).data, self.indices, self._merged_base_values)
        self._merged_base_values = None
        self.merged = False

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, trained={self.indices.numel()}"
