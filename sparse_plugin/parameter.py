"""`SparseDeltaParameter`: a trainable sparse delta on any frozen ≥2-D weight that is not an `nn.Linear`'s: fused
MoE experts (`[E, out, in]`), GPT-2's `Conv1D` (`[in, out]`), embeddings (`[vocab, hidden]`), routers.

The weight stays where the model keeps it, in its own module, and holds W0 + Δ between steps ("merged-resident",
as `SparseDeltaLinear`'s merged strategy), so every forward is the model's own code, whichever experts
implementation transformers picked. While gradients are recorded, each owning module's forward sees in place of
the parameter an alias of it made by `SparseParameterFunction`: autograd then hands that function the dense
gradient of the whole weight (transient: built by the consumers' backward, gathered at the indices, freed at once),
and the values get it at their positions. Nothing dense persists between backward passes.

The matrix view: positions are flat over the tensor as stored, so prune/regrow and top-k work on any shape; for
the per-row/per-column statistics (SM3, SpIEL-MA, SMT's blocks) a tensor `[..., R, C]` is `matrices =
prod(...)` stacked R × C matrices, seen as one (matrices·R × C) matrix whose columns are counted per matrix. A
Conv1D's matrix is its storage (in × out): the transposition lives only in how its rows are named.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from .layer import _DENSE_FLOAT, SparseDeltaTarget


class SparseParameterFunction(torch.autograd.Function):
    """The weight W (already holding W0 + Δ) as a function of the values: forward aliases W, backward gathers the
    dense weight gradient at the indices (or hands it to the target's collector, as `SparseLinearFunction` does)."""

    @staticmethod
    def forward(ctx, values, weight, target):
        ctx.target = target
        return weight.detach()

    @staticmethod
    def backward(ctx, grad):
        target = ctx.target
        collector = target.grad_collector
        if collector is None:
            dvalues = grad.reshape(-1).index_select(0, target.indices).to(target.values.dtype)
            return dvalues, None, None
        dense = grad.float().reshape(target.shape)
        if torch.isfinite(dense).all():
            dvalues = collector(dense)
        else:  # kept out of the statistics; the optimizer sees the non-finite gradient and skips the step
            dvalues = dense.view(-1).index_select(0, target.indices)
        return (None if dvalues is None else dvalues.to(target.values.dtype)), None, None


def matrix_view(weight_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(matrices, rows, columns) of a ≥2-D tensor: the last two dimensions are a matrix, the leading ones count
    stacked matrices (the experts of a fused `[E, out, in]` tensor)."""
    return math.prod(weight_shape[:-2]), weight_shape[-2], weight_shape[-1]


class SparseDeltaParameter(SparseDeltaTarget):
    """A trainable sparse delta on the parameter `name` of `owner` (and of every other module holding the same
    `nn.Parameter`, such as an output head tied to the embeddings).

    It is registered as a child of `owner`, named `sparse_<name>`, so the model's `parameters()` include the values
    and `state_dict()` saves them; the owners' own state-dict entries keep yielding W0.

    Args:
        owner (`nn.Module`): the module whose `_parameters[name]` is the weight.
        name (`str`): the parameter's name in `owner`.
        indices (`torch.Tensor`): sorted unique flat positions in the weight.
        values_dtype (`torch.dtype`, defaults to `torch.float32`): dtype of the trained values.
        owners (`list[nn.Module]`, *optional*): every module holding the parameter (defaults to `[owner]`).
    """

    def __init__(
        self,
        owner: nn.Module,
        name: str,
        indices: torch.Tensor,
        values_dtype: torch.dtype = torch.float32,
        owners: list[nn.Module] | None = None,
    ):
        weight = owner._parameters[name]
        if weight is None or weight.dim() < 2:
            raise ValueError(f"`{name}` of {type(owner).__name__} is not a ≥2-D weight; only those can be targeted.")
        if weight.dtype not in _DENSE_FLOAT or not weight.is_contiguous() or type(weight) is not nn.Parameter:
            raise ValueError(
                f"`{name}` of {type(owner).__name__} is {weight.dtype} {type(weight).__name__}: a sparse delta on a "
                "non-Linear weight needs a whole, contiguous fp32/bf16/fp16 tensor (no quantised or FSDP-sharded "
                "one); leave it out of the targets."
            )
        super().__init__(indices, values_dtype, weight.device, weight.numel())
        self.param_name = name
        self._weight_shape = tuple(weight.shape)
        self.matrices, rows, cols = matrix_view(self._weight_shape)
        self._shape = (self.matrices * rows, cols)
        self.out_features, self.in_features = self._shape
        # Plain lists: not registered as submodules (the owners are the model's, not this target's).
        self._owners = list(owners or [owner])
        self._originals: dict[int, nn.Parameter] = {}
        self._alias: tuple | None = None
        self._pattern_key: tuple | None = None
        self._pattern = None
        # Partials rather than bound methods: the state-dict hooks get attributes set on them.
        for module in self._owners:
            module.register_forward_pre_hook(partial(SparseDeltaParameter._substitute, self))
            module.register_forward_hook(partial(SparseDeltaParameter._restore, self), always_call=True)
            module.register_state_dict_post_hook(partial(SparseDeltaParameter._weight_as_w0, self))
            module.register_load_state_dict_pre_hook(partial(SparseDeltaParameter._before_load, self))

    @property
    def shape(self) -> tuple[int, int]:
        return self._shape

    @property
    def owners(self) -> list[nn.Module]:
        """Every module holding the weight (an output head tied to the embeddings is the second)."""
        return list(self._owners)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return self._weight_shape

    def stored_weight(self) -> torch.Tensor:
        owner = self._owners[0]
        return self._originals.get(id(owner), owner._parameters[self.param_name])

    def dense_weight(self) -> torch.Tensor:
        return self.stored_weight()

    def pattern(self):
        """The positions' rows and columns in the matrix view (SM3's and SpIEL-MA's statistics)."""
        from .kernels.pattern import SparsePattern

        key = self._indices_key()
        if key != self._pattern_key:
            self._pattern = SparsePattern(self.indices, self.shape, self.matrices)
            self._pattern_key = key
        return self._pattern

    def forward(self, *args, **kwargs):
        raise RuntimeError(
            "a SparseDeltaParameter is not called: it acts through the forward of the module that owns the weight."
        )

    def _substitute(self, module: nn.Module, args) -> None:
        """Forward pre-hook of an owner: the weight holds W0 + Δ; while recording gradients the owner sees it
        through `SparseParameterFunction`, so its backward reaches the values."""
        from .fsdp import is_whole  # imports the model module, which imports this one

        if self.indices.numel() == 0:
            return
        if not is_whole(self.stored_weight(), self.weight_shape):
            raise RuntimeError(
                f"`{self.param_name}` of {type(module).__name__} is sharded (FSDP): a sparse delta on a non-Linear weight "
                "needs the whole weight on every rank; pass the modules `keep_deltas_replicated(model)` returns to "
                "FSDP as ignored (the Trainer's SparseCallback does), or train under DDP."
            )
        weight = self._hold_delta() if not self.merged else self.dense_weight()
        if self.merged or not torch.is_grad_enabled() or not self.values.requires_grad:
            return
        current = module._parameters[self.param_name]
        if id(module) in self._originals or current is not weight:  # a nested call: already substituted
            return
        self._originals[id(module)] = current
        # One alias per forward pass, made by the first owner: an output head tied to the embeddings reuses it, so
        # autograd sums both uses' gradients before the collector (SIFT, SMT, AG) sees the weight's gradient once.
        key = (self.values._version, self._indices_key())
        if module is self._owners[0] or self._alias is None or self._alias[0] != key:
            self._alias = (key, SparseParameterFunction.apply(self.values, weight, self))
        module._parameters[self.param_name] = self._alias[1]

    def _restore(self, module: nn.Module, args, output) -> None:
        original = self._originals.pop(id(module), None)
        if original is not None:
            module._parameters[self.param_name] = original

    def _weight_as_w0(self, module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
        """State-dict hook of an owner: W0 under the weight's key, never W0 + Δ (costs one weight copy)."""
        key = prefix + self.param_name
        if self._base_entries is not None and key in state_dict:
            weight = state_dict[key].detach().clone()
            weight.view(-1).index_copy_(0, self.indices.long(), self._base_entries.to(weight.dtype))
            state_dict[key] = weight

    def _before_load(self, module: nn.Module, state_dict, prefix, *args) -> None:
        # A new base weight (or W0 again) is about to be copied in: W0 back first, so nothing stale is rewritten.
        self.restore_base_weight()

    def extra_repr(self) -> str:
        shape = "x".join(map(str, self.weight_shape))
        return f"param={self.param_name}, shape={shape}, trained={self.indices.numel()}"
