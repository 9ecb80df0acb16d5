"""What the kernel tests share: skip marks for where Triton can run, and random sparse patterns.

tests/conftest.py sets TRITON_INTERPRET=1 unless the environment already sets it, so a plain `pytest`
runs every kernel in the interpreter on CPU tensors; tools/gpu_check.sh sets TRITON_INTERPRET=0 and
runs `-m gpu`, where the same kernels compile for the GPU.
"""

import pytest
import torch

from sparse_plugin.kernels._triton import triton
from sparse_plugin.kernels.backend import interpreting
from sparse_plugin.kernels.pattern import SparsePattern

interpreter = pytest.mark.skipif(
    triton is None or not interpreting(), reason="Triton on CPU tensors needs `triton` and TRITON_INTERPRET=1"
)
compiled_cuda = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        triton is None or not torch.cuda.is_available() or interpreting(),
        reason="needs `triton`, a CUDA device and TRITON_INTERPRET=0 so kernels compile for real (tools/gpu_check.sh)",
    ),
]


def random_pattern(
    shape: tuple[int, int],
    density: float,
    index_dtype: torch.dtype = torch.int64,
    device: str = "cpu",
    empty_rows: int = 0,
    seed: int = 0,
) -> SparsePattern:
    """At least one position, drawn at `density` from all rows but the first `empty_rows` (kept empty so
    kernels meet rows without positions), sorted, as `index_dtype`."""
    out_features, in_features = shape
    generator = torch.Generator().manual_seed(seed)
    first = empty_rows * in_features
    pool = out_features * in_features - first
    count = min(pool, max(1, round(density * out_features * in_features)))
    indices = (first + torch.randperm(pool, generator=generator)[:count]).sort().values
    return SparsePattern(indices.to(device=device, dtype=index_dtype), shape)
