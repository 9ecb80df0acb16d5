"""Where a kernel runs: Triton or the torch reference, decided without importing Triton.

Triton is absent on macOS/Windows wheels and unused on CPU. A kernel runs on CUDA tensors, or on CPU
tensors under Triton's interpreter (`TRITON_INTERPRET=1`), which is how the tests check every kernel
without a GPU; `TRITON_INTERPRET=0` (tools/gpu_check.sh) makes the same tests compile for real. Importing Triton
takes a noticeable share of `sparse-merge`'s start-up, so a CPU merge never does.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "torch")
# The spellings Triton's own `getenv_bool` accepts as true; anything else (unset, "0") compiles for real.
_TRUE = ("1", "true", "on", "yes")


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter, read from the environment as Triton reads it."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def pick_backend(backend: str, tensor: torch.Tensor) -> str:
    """Resolve `backend` for a kernel whose operands live where `tensor` lives.

    `"auto"` is Triton on CUDA tensors (when installed) and torch otherwise; `"triton"` is checked to be
    runnable here, so a CPU call without the interpreter fails with a message instead of a Triton crash.
    """
    if backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {BACKENDS}, got {backend!r}.")
    if backend == "auto":
        return "triton" if tensor.is_cuda and triton_installed() else "torch"
    if backend == "triton" and not triton_installed():
        raise RuntimeError("backend='triton' needs the `triton` package: pip install triton.")
    if backend == "triton" and not tensor.is_cuda and not interpreting():
        raise RuntimeError("Triton kernels run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1.")
    return backend
