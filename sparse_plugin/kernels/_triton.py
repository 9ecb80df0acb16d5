"""What every kernel module shares: the optional Triton import, where a Triton kernel may run, and the
fp32 -> storage-dtype rounding that keeps kernels bit-exact with their torch references.

Triton is absent on macOS/Windows wheels and unused on CPU. A kernel runs on CUDA tensors, or on CPU
tensors under Triton's interpreter (`TRITON_INTERPRET=1`), which is how the tests check every kernel
without a GPU; `TRITON_INTERPRET=0` (tools/gpu_check.sh) makes the same tests compile for real.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = tl = None

BACKENDS = ("auto", "triton", "torch")
# The spellings Triton's own `getenv_bool` accepts as true; anything else (unset, "0") compiles for real.
_TRUE = ("1", "true", "on", "yes")


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter, read from the environment as Triton reads it."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE


def pick_backend(backend: str, tensor: torch.Tensor) -> str:
    """Resolve `backend` for a kernel whose operands live where `tensor` lives.

    `"auto"` is Triton on CUDA tensors (when installed) and torch otherwise; `"triton"` is checked to be
    runnable here, so a CPU call without the interpreter fails with a message instead of a Triton crash.
    """
    if backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {BACKENDS}, got {backend!r}.")
    if backend == "auto":
        return "triton" if triton is not None and tensor.is_cuda else "torch"
    if backend == "triton" and triton is None:
        raise RuntimeError("backend='triton' needs the `triton` package: pip install triton.")
    if backend == "triton" and not tensor.is_cuda and not interpreting():
        raise RuntimeError("Triton kernels run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1.")
    return backend


if triton is not None:

    @triton.jit
    def round_for_store(value, ptr, BF16: tl.constexpr):
        """`value` (fp32) rounded to nearest even in the element type of `ptr`.

        Parameters:
            value: fp32 block.
            ptr: the pointer the result is stored through (its element type is the target).
            BF16: the target is bf16, rounded by integer arithmetic as torch does: Triton's interpreter
                truncates a plain fp32->bf16 cast, which would break bit-exact agreement with the CPU path.
        """
        if BF16:
            bits = value.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            out = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            out = value.to(ptr.dtype.element_ty)
        return out
