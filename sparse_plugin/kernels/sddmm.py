"""Products of activations with a sparse delta Δ (out × in, positions `indices` in row-major order).

* `values_grad`: the values' gradient, an SDDMM: for each position (i, j), Σ_t dy[t, i] · x[t, j].
  Two torch paths: `"dense"` forms the per-layer `dyᵀx` transiently and gathers it (the reference), and
  `"sampled"` computes only the needed entries with `torch.sparse.sampled_addmm`.
* `delta_matmul` (x · Δᵀ, the additive forward) and `delta_matmul_t` (dy · Δ, its input gradient), as
  CSR sparse-dense products.

Torch's CPU CSR kernels exist only for fp32/fp64, so the sparse products run in fp32 and cast back; that
also keeps tiny deltas from rounding away in bf16.
"""

from __future__ import annotations

import warnings

import torch

GRAD_PATHS = ("dense", "sampled")
# Measured by tools/bench_layer.py (torch 2.13 CPU, 2 cores, fp32, SmolLM2 shapes at 128-512 tokens and
# 4096×4096 at 512-2048): sampled÷dense step time 0.5-0.98 up to 4.6% density, 0.95-1.06 at 7%, 1.02-1.2
# at 10%, so the crossover is ~6%. Exception: 192×576 (k/v) where dense wins by ~10% at every density.
SAMPLED_MAX_DENSITY = 0.05


class SparsePattern:
    """Row ids, column ids and CSR row pointers of sorted flat indices, computed once per index set."""

    def __init__(self, indices: torch.Tensor, shape: tuple[int, int]):
        out_features, in_features = shape
        self.indices = indices
        self.shape = shape
        self.rows = torch.div(indices, in_features, rounding_mode="floor")
        self.cols = indices - self.rows * in_features
        self.crow = torch.zeros(out_features + 1, dtype=torch.int64, device=indices.device)
        self.crow[1:] = torch.bincount(self.rows, minlength=out_features).cumsum(0)

    @property
    def density(self) -> float:
        return self.indices.numel() / (self.shape[0] * self.shape[1])

    def csr(self, values: torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(self.crow, self.cols, values, self.shape, check_invariants=False)

    # The three products the layer needs; `BlockPattern` overrides them with block GEMMs.
    def matmul(self, x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return delta_matmul(x, values, self)

    def matmul_t(self, dy: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return delta_matmul_t(dy, values, self)

    def values_grad(self, dy: torch.Tensor, x: torch.Tensor, path: str = "auto") -> torch.Tensor:
        return values_grad(dy, x, self, path)


def values_grad_dense(dy: torch.Tensor, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Reference: the dense per-layer gradient dyᵀx, gathered at `indices`, then freed."""
    return (dy.t() @ x).view(-1).index_select(0, indices)


def values_grad_sampled(dy: torch.Tensor, x: torch.Tensor, pattern: SparsePattern) -> torch.Tensor:
    """Only the entries of dyᵀx at the pattern's positions (fp32), never the dense matrix."""
    mask = pattern.csr(torch.zeros(pattern.indices.numel(), dtype=torch.float32, device=dy.device))
    return torch.sparse.sampled_addmm(mask, dy.t().float(), x.float(), beta=0.0).values()


def pick_grad_path(pattern: SparsePattern) -> str:
    """The measured rule: sampled below `SAMPLED_MAX_DENSITY`, dense-then-gather above."""
    return "sampled" if pattern.density < SAMPLED_MAX_DENSITY else "dense"


def values_grad(dy: torch.Tensor, x: torch.Tensor, pattern: SparsePattern, path: str = "auto") -> torch.Tensor:
    """Gradient of the values: Σ_t dy[t, i] · x[t, j] at each position, for 2-D `dy` (T × out), `x` (T × in)."""
    if path == "auto":
        path = pick_grad_path(pattern)
    if path == "sampled":
        return values_grad_sampled(dy, x, pattern)
    if path == "dense":
        return values_grad_dense(dy, x, pattern.indices)
    raise ValueError(f"`path` must be 'auto' or one of {GRAD_PATHS}, got {path!r}.")


def delta_matmul(x: torch.Tensor, values: torch.Tensor, pattern: SparsePattern) -> torch.Tensor:
    """x · Δᵀ for 2-D `x` (T × in), in fp32."""
    return (pattern.csr(values.float()) @ x.t().float()).t()


def delta_matmul_t(dy: torch.Tensor, values: torch.Tensor, pattern: SparsePattern) -> torch.Tensor:
    """dy · Δ for 2-D `dy` (T × out), in fp32: the input gradient of `delta_matmul`."""
    return dy.float() @ pattern.csr(values.float())
