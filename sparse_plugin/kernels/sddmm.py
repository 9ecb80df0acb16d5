"""Products of activations with a sparse delta Δ (out × in, positions `indices` in row-major order).

* `values_grad`: the values' gradient, an SDDMM: for each position (i, j), Σ_t dy[t, i] · x[t, j].
  Two torch paths: `"dense"` forms the per-layer `dyᵀx` transiently and gathers it (the reference), and
  `"sampled"` computes only the needed entries with `torch.sparse.sampled_addmm`; on CUDA, `"triton"`
  computes them with `_sddmm_kernel` (below), reading a row of dy once for all positions of that row.
* `delta_matmul` (x · Δᵀ, the additive forward) and `delta_matmul_t` (dy · Δ, its input gradient), as
  CSR sparse-dense products.

Torch's CPU CSR kernels exist only for fp32/fp64, so the sparse products run in fp32 and cast back; that
also keeps tiny deltas from rounding away in bf16.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..sizing import SAMPLED_MAX_DENSITY, TRITON_MAX_DENSITY
from ._triton import tl, triton
from .backend import pick_backend

if TYPE_CHECKING:
    from .pattern import SparsePattern

GRAD_PATHS = ("dense", "sampled", "triton")
# Positions per program and tokens per inner step of `_sddmm_kernel`; not tuned on a GPU yet.
_BLOCK_P = 32
_BLOCK_T = 128


if triton is not None:

    @triton.jit
    def _sddmm_kernel(
        dyt_ptr, xt_ptr, rows_ptr, cols_ptr, out_ptr, n, tokens, BLOCK_P: tl.constexpr, BLOCK_T: tl.constexpr
    ):
        """`out[p] += Σ_t dyt[rows[p], t] · xt[cols[p], t]` for the BLOCK_P positions of one program, in fp32.

        Activations come transposed (feature-major), so each position reads contiguous runs of tokens
        (coalesced) instead of one element per row of x; positions are sorted by row, so neighbouring
        positions load the same dy row and hit the cache.

        Parameters:
            dyt_ptr: output gradient transposed, (out × tokens) contiguous, fp32/bf16/fp16.
            xt_ptr: input transposed, (in × tokens) contiguous, fp32/bf16/fp16.
            rows_ptr, cols_ptr: row and column of each position, int32 or int64, sorted by row.
            out_ptr: fp32 gradient of the values, accumulated into (the launcher splits tokens into chunks).
            n: number of positions.
            tokens: tokens in this chunk, also the row stride of both activations.
            BLOCK_P: positions per program.
            BLOCK_T: tokens per step of the loop over tokens.
        """
        p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
        in_range = p < n
        dy_rows = dyt_ptr + tl.load(rows_ptr + p, mask=in_range, other=0).to(tl.int64)[:, None] * tokens
        x_rows = xt_ptr + tl.load(cols_ptr + p, mask=in_range, other=0).to(tl.int64)[:, None] * tokens
        acc = tl.zeros([BLOCK_P], dtype=tl.float32)
        for start in range(0, tokens, BLOCK_T):
            t = start + tl.arange(0, BLOCK_T)
            mask = in_range[:, None] & (t < tokens)[None, :]
            a = tl.load(dy_rows + t[None, :], mask=mask, other=0.0).to(tl.float32)
            b = tl.load(x_rows + t[None, :], mask=mask, other=0.0).to(tl.float32)
            acc += tl.sum(a * b, axis=1)
        acc += tl.load(out_ptr + p, mask=in_range, other=0.0)
        tl.store(out_ptr + p, acc, mask=in_range)


def values_grad_dense(dy: torch.Tensor, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Reference: the dense per-layer gradient dyᵀx, gathered at `indices`, then freed."""
    return (dy.t() @ x).view(-1).index_select(0, indices)


def values_grad_sampled(dy: torch.Tensor, x: torch.Tensor, pattern: SparsePattern) -> torch.Tensor:
    """Only the entries of dyᵀx at the pattern's positions (fp32), never the dense matrix."""
    mask = pattern.csr(torch.zeros(pattern.indices.numel(), dtype=torch.float32, device=dy.device))
    return torch.sparse.sampled_addmm(mask, dy.t().float(), x.float(), beta=0.0).values()


def _token_chunk(x: torch.Tensor) -> int:
    """Tokens per launch of `_sddmm_kernel`: on CUDA as many as keep the transposed chunk of x within half
    the L2 cache, so positions sharing a column re-read it from L2 rather than memory (this also bounds the
    transposed copies); all of them in the interpreter."""
    if not x.is_cuda:
        return max(1, x.shape[0])
    budget = torch.cuda.get_device_properties(x.device).L2_cache_size // 2
    rows = budget // (x.shape[1] * x.element_size())
    return max(_BLOCK_T, rows // _BLOCK_T * _BLOCK_T)


def values_grad_triton(
    dy: torch.Tensor, x: torch.Tensor, pattern: SparsePattern, token_chunk: int | None = None
) -> torch.Tensor:
    """The entries of dyᵀx at the pattern's positions (fp32) by `_sddmm_kernel`, never the dense matrix.

    Args:
        dy (`torch.Tensor`): output gradient, T × out (fp32/bf16/fp16).
        x (`torch.Tensor`): input, T × in, same device.
        pattern (`SparsePattern`): the positions (rows, cols, int32 or int64, sorted).
        token_chunk (`int`, *optional*): tokens per launch (default: `_token_chunk`); each launch takes
            feature-major copies of its slice of dy and x and adds into the fp32 result.

    Returns:
        fp32 tensor, one gradient per position.
    """
    pick_backend("triton", dy)
    n, tokens = pattern.indices.numel(), dy.shape[0]
    out = torch.zeros(n, dtype=torch.float32, device=dy.device)
    if n == 0 or tokens == 0:
        return out
    chunk = token_chunk or _token_chunk(x)
    grid = (triton.cdiv(n, _BLOCK_P),)
    rows, cols = pattern.rows, pattern.cols
    for start in range(0, tokens, chunk):
        dyt = dy[start : start + chunk].t().contiguous()
        xt = x[start : start + chunk].t().contiguous()
        _sddmm_kernel[grid](dyt, xt, rows, cols, out, n, dyt.shape[1], BLOCK_P=_BLOCK_P, BLOCK_T=_BLOCK_T)
    return out


def grad_path_rule(density: float, device: torch.device) -> str:
    """The values' gradient path for a pattern of `density` on `device`.

    CPU (measured): sampled below `SAMPLED_MAX_DENSITY`, dense-then-gather above. CUDA with Triton (an estimate
    until measured): the Triton kernel below `TRITON_MAX_DENSITY`, dense-then-gather above. Both thresholds,
    and why, are in sizing.py.
    """
    if device.type == "cuda" and triton is not None:
        return "triton" if density < TRITON_MAX_DENSITY else "dense"
    return "sampled" if density < SAMPLED_MAX_DENSITY else "dense"


def pick_grad_path(pattern: SparsePattern) -> str:
    """`grad_path_rule` for this pattern's density and device."""
    return grad_path_rule(pattern.density, pattern.indices.device)


def values_grad(dy: torch.Tensor, x: torch.Tensor, pattern: SparsePattern, path: str = "auto") -> torch.Tensor:
    """Gradient of the values: Σ_t dy[t, i] · x[t, j] at each position, for 2-D `dy` (T × out), `x` (T × in)."""
    if path == "auto":
        path = pick_grad_path(pattern)
    if path == "triton":
        return values_grad_triton(dy, x, pattern)
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
