"""`SparseDeltaLinear`: a frozen linear layer plus a trainable sparse delta, and its autograd Function.

The effective weight is W0 + scatter(indices, values). The layer asks its base module two things only:
`base_layer(x)` (additive forward) and, where it has one, its dense weight. A dense float base keeps
W0 + Δ in its own weight between steps ("merged"): forward and dx are the base's plain GEMMs, and only the
trained entries are rewritten, from the stored W0 entries plus the values, when the values change. Backward
returns the input gradient and the values' gradient (an SDDMM at the indices); nothing dense survives it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .kernels.blocks import BlockPattern, block_grid, tiles_whole_blocks
from .kernels.pattern import SparsePattern

# Below this many weight entries positions fit int32 (half the bytes of int64); torch's CSR kernels take either.
_INT32_LIMIT = 2**31
_DENSE_FLOAT = (torch.float32, torch.bfloat16, torch.float16)


def index_dtype(numel: int) -> torch.dtype:
    """Dtype of the positions of a weight with `numel` entries: int32 below 2^31 entries, int64 beyond."""
    return torch.int32 if numel < _INT32_LIMIT else torch.int64


class SparseLinearFunction(torch.autograd.Function):
    """y = x · Δᵀ (additive, `weight is None`) or y = x · Wᵀ + b where the base weight W already holds W0 + Δ.

    Only `x` and `values` get gradients: dx, and dvalues[p] = Σ_t dy[t, i_p] · x[t, j_p]. With a
    `collector` (set while a selection method gathers statistics) backward forms this layer's dense weight
    gradient dyᵀx once and hands it to the collector, which returns the values' gradient (or None: no update
    while a method is still choosing positions); the dense gradient is freed at once.
    """

    @staticmethod
    def forward(ctx, x, values, pattern, weight, bias, grad_path, collector=None):
        x2 = x.reshape(-1, x.shape[-1])
        if weight is None:
            out = pattern.matmul(x2, values).to(x.dtype)
        else:  # under autocast this runs in the autocast dtype, as the base's own forward would
            out = F.linear(x2, weight, bias)
        ctx.save_for_backward(x, values, weight)
        ctx.pattern, ctx.grad_path, ctx.collector = pattern, grad_path, collector
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x, values, weight = ctx.saved_tensors
        x2 = x.reshape(-1, x.shape[-1])
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dvalues = None
        if ctx.needs_input_grad[0]:
            dx2 = ctx.pattern.matmul_t(dy2, values) if weight is None else dy2 @ weight.to(dy.dtype)
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
    """The trained part of a `SparseDeltaLinear`: sorted unique flat positions `indices` (a buffer, int32 below
    2^31 weight entries) and their `values` (the `nn.Parameter`, zero at first so a freshly prepared model equals
    its base).

    A module of its own so that sharding wrappers can leave it whole: FSDP shards the frozen base and is told to
    ignore these modules (`sparse_plugin.keep_deltas_replicated`), since prune/regrow and SM3's row/column maxima
    need each layer's whole values vector on every rank.
    """

    def __init__(self, indices: torch.Tensor, values_dtype: torch.dtype, device: torch.device, numel: int):
        super().__init__()
        self.register_buffer("indices", indices.to(device=device, dtype=index_dtype(numel)))
        self.values = nn.Parameter(torch.zeros(indices.numel(), dtype=values_dtype, device=device))

    @torch.no_grad()
    def set_indices(self, indices: torch.Tensor) -> None:
        """Train a new set of positions (any count), all starting at Δ = 0; the `values` Parameter object stays
        the same (optimizers and gradient hooks keep referring to it), only its data is replaced."""
        if indices.numel() == self.indices.numel():
            self.indices.copy_(indices)
            self.values.zero_()
            return
        self.indices = indices.to(device=self.indices.device, dtype=self.indices.dtype)
        new = torch.zeros(indices.numel(), dtype=self.values.dtype, device=self.values.device)
        # Autograd caches a leaf's gradient accumulator with its shape, and a graph still alive from the last
        # step (the caller's `loss`) keeps it; assigning `.data` drops that cache only on a dtype change, so
        # pass through another dtype first or the next backward rejects the new shape.
        self.values.data = new.to(torch.float64 if new.dtype != torch.float64 else torch.float32)
        self.values.data = new
        self.values.grad = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint of a method that changes per-layer counts (SMT) loads into a freshly prepared model;
        # int64 indices of older checkpoints are cast by the in-place copy.
        incoming = state_dict.get(prefix + "indices")
        if incoming is not None and incoming.shape != self.indices.shape:
            self.set_indices(incoming)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class SparseDeltaTarget(nn.Module):
    """What every sparse target shares: the `SparseDelta` (`indices`, `values`) over one frozen weight, the
    statistics collector a selection method sets, and the "merged-resident" bookkeeping: while the weight holds
    W0 + Δ (rounded once to its dtype, exactly as `merge` rounds), the target keeps W0's entries at the indices
    (one base-dtype number per trained value) to rewrite them from when the values change, so nothing drifts and
    `restore_base_weight` puts W0 back bit for bit.

    Subclasses say where the weight is (`stored_weight`, `dense_weight`) and how it is seen as matrices: `shape` is
    the (rows × columns) matrix view the optimizers and selection methods work on, `matrices` how many equal
    matrices are stacked in it (the experts of a fused MoE tensor, 1 otherwise), `weight_shape` the tensor's own
    shape (what an adapter records).
    """

    matrices = 1

    def __init__(self, indices: torch.Tensor, values_dtype: torch.dtype, device: torch.device, numel: int):
        super().__init__()
        self.delta = SparseDelta(indices, values_dtype, device, numel)
        # Inference merge (`merge`): forward uses W0 + Δ, the values get no gradient.
        self.merged = False
        # Called with the dense weight gradient inside backward while a selection method gathers statistics;
        # returns the values' gradient or None.
        self.grad_collector = None
        # W0 at the indices while the base weight holds W0 + Δ, and the (indices, values) versions written there.
        self._base_entries: torch.Tensor | None = None
        self._written: tuple | None = None

    @property
    def shape(self) -> tuple[int, int]:
        raise NotImplementedError

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return self.shape

    def stored_weight(self) -> torch.Tensor:
        """The frozen weight as the model stores it (possibly quantised or sharded)."""
        raise NotImplementedError

    def dense_weight(self) -> torch.Tensor:
        """The dense float weight the delta is written into, or a `TypeError` saying there is none."""
        raise NotImplementedError

    def _indices_key(self) -> tuple:
        return (self.indices.data_ptr(), self.indices._version, self.indices.numel())

    @property
    def indices(self) -> torch.Tensor:
        return self.delta.indices

    @property
    def values(self) -> nn.Parameter:
        return self.delta.values

    def set_indices(self, indices: torch.Tensor) -> None:
        """Train a new set of positions (any count), all starting at Δ = 0 (see `SparseDelta.set_indices`)."""
        self.restore_base_weight()
        self.delta.set_indices(indices)

    @torch.no_grad()
    def assign(self, indices: torch.Tensor, values: torch.Tensor) -> None:
        """Train `indices` (sorted, unique, any count) starting from `values`; the base weight follows."""
        self.set_indices(indices)
        self.values.copy_(values)

    @torch.no_grad()
    def _hold_delta(self) -> torch.Tensor:
        """Make the base weight hold W0 + Δ for the current values: the first time, keep W0's entries; after
        that, rewrite the trained entries from them whenever the values changed. Returns the weight."""
        weight = self.dense_weight()
        key = self._indices_key()
        if self._base_entries is None:
            self._base_entries = weight.view(-1).index_select(0, self.indices)
            self._written = (key, None)
        elif self._written[0] != key:
            raise RuntimeError(
                "the indices of this sparse target changed in place while its base weight held W0 + Δ; change "
                "them with `layer.set_indices(...)` or `layer.assign(...)`, which put W0 back first."
            )
        if self._written[1] != self.values._version:
            # One fp32 add and one rounding per entry, as `merge`, `scatter_add_` and `sparse-merge` round.
            merged = (self._base_entries.float() + self.values.float()).to(weight.dtype)
            weight.view(-1).index_copy_(0, self.indices.long(), merged)
            self._written = (key, self.values._version)
        return weight

    @torch.no_grad()
    def restore_base_weight(self) -> None:
        """Put W0 back into the base weight, bit for bit, if it holds W0 + Δ (also ends an inference `merge`);
        the merged strategy writes Δ again at the next forward."""
        if self._base_entries is not None:
            weight = self.dense_weight()
            weight.view(-1).index_copy_(0, self.indices.long(), self._base_entries.to(weight.dtype))
        self._base_entries = self._written = None
        self.merged = False

    def base_entries(self) -> torch.Tensor:
        """W0 at the indices (what an adapter stores for a bit-exact unmerge), also while the weight holds W0 + Δ."""
        if self._base_entries is not None:
            return self._base_entries
        return self.dense_weight().detach().view(-1)[self.indices.long()]

    def _apply(self, fn, recurse=True):
        # `.to()`, `.cuda()`, `.half()`...: W0 back first, so the kept entries never fall behind the weight's device
        # or dtype; the next forward writes Δ again.
        self.restore_base_weight()
        return super()._apply(fn, recurse)

    def delta_weight(self) -> torch.Tensor:
        """Dense Δ (shaped like the weight) in the values' dtype; for tests and inspection, not for training."""
        delta = torch.zeros(self.weight_shape, dtype=self.values.dtype, device=self.values.device)
        delta.view(-1)[self.indices.long()] = self.values.detach()
        return delta

    @torch.no_grad()
    def merge(self) -> None:
        """Fold Δ into the base weight in place for inference; `unmerge` restores the old entries bit for bit."""
        if not self.merged:
            self._hold_delta()
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self.restore_base_weight()


class SparseDeltaLinear(SparseDeltaTarget):
    """A frozen `base_layer` plus a trainable sparse delta at flat positions `indices` of its weight.

    With the `"merged"` strategy the base weight holds W0 + Δ (rounded once to its dtype, exactly as `merge`
    rounds) from the first forward on, and the layer keeps W0's entries at the indices (one base-dtype number per
    trained value) to rewrite them from when the values change, so nothing drifts. `state_dict()` still yields W0
    as `base_layer.weight`, and `unmerge` (or loading a state dict) puts W0 back bit for bit.

    Args:
        base_layer (`nn.Module`): the frozen linear module (`nn.Linear` or a quantised variant) it wraps.
        indices (`torch.Tensor`): sorted unique flat positions in the (out × in) weight.
        values_dtype (`torch.dtype`, defaults to `torch.float32`): dtype of the trained values.
        forward_strategy (`str`, defaults to `"auto"`): `"additive"`, `"merged"` or `"auto"` (merged wherever
            the base has a whole dense float weight and a frozen bias).
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
        numel = base_layer.in_features * base_layer.out_features
        super().__init__(indices, values_dtype, base_layer.weight.device, numel)
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.forward_strategy = forward_strategy
        self.block_size = block_size
        self._pattern_key: tuple | None = None
        self._pattern: SparsePattern | None = None
        self._strategy_key: tuple | None = None
        self._strategy: str | None = None
        self.register_state_dict_post_hook(_base_weight_as_w0)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def stored_weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def dense_weight(self) -> torch.Tensor:
        return dense_base_weight(self.base_layer)

    def pattern(self) -> SparsePattern:
        """Structure of the current indices (a `BlockPattern` when they tile SMT blocks), rebuilt only when
        they change (in place or replaced)."""
        key = self._indices_key()
        if key != self._pattern_key:
            block = block_grid(self.shape, self.block_size) if self.block_size else None
            if block is not None and tiles_whole_blocks(self.indices, self.shape, block):
                self._pattern = BlockPattern(self.indices, self.shape, block)
            else:
                self._pattern = SparsePattern(self.indices, self.shape)
            self._pattern_key = key
        return self._pattern

    def strategy(self) -> str:
        """The forward strategy: the configured one, or for `"auto"` merged wherever it applies.

        Merged needs a plain `nn.Linear` with a whole (not FSDP-sharded) fp32/bf16/fp16 weight and a frozen
        bias; it then costs one rewrite of the trained entries per step instead of two sparse products per
        call, so it wins at every density (tools/benchmarks/bench_layer.py). Decided once per base weight.
        """
        key = (self.forward_strategy, id(getattr(self.base_layer, "weight", None)))
        if key != self._strategy_key:
            self._strategy, self._strategy_key = self._decide_strategy(), key
        return self._strategy

    def _decide_strategy(self) -> str:
        if self.forward_strategy != "auto":
            return self.forward_strategy
        from .fsdp import is_whole  # imports this module

        base = self.base_layer
        mergeable = (
            type(base) is nn.Linear
            and base.weight.dtype in _DENSE_FLOAT
            and is_whole(base.weight, self.shape)
            and (base.bias is None or not base.bias.requires_grad)
        )
        return "merged" if mergeable else "additive"

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
        if self.strategy() == "merged":
            weight = self._hold_delta()
            return SparseLinearFunction.apply(
                compute_x, self.values, self.pattern(), weight, self.base_layer.bias, grad_path, self.grad_collector
            )
        self.restore_base_weight()  # the strategy was switched to additive
        base_out = self.base_layer(x)
        with torch.autocast(device_type, enabled=False):
            delta = SparseLinearFunction.apply(
                compute_x, self.values, self.pattern(), None, None, grad_path, self.grad_collector
            )
        return base_out + delta.to(base_out.dtype)

    def _load_from_state_dict(self, *args, **kwargs):
        # Runs before the children load: W0 back first, so new indices or a new base weight start clean.
        self.restore_base_weight()
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, trained={self.indices.numel()}"


def _base_weight_as_w0(module: SparseDeltaLinear, state_dict: dict, prefix: str, local_metadata) -> None:
    """State-dict hook: while the base weight holds W0 + Δ, save a copy with W0's entries put back, so no
    checkpoint or `save_pretrained` ever writes Δ into what it calls the base (costs one weight copy each)."""
    key = prefix + "base_layer.weight"
    if module._base_entries is not None and key in state_dict:
        weight = state_dict[key].detach().clone()
        weight.view(-1).index_copy_(0, module.indices.long(), module._base_entries.to(weight.dtype))
        state_dict[key] = weight
