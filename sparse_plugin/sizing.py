"""How many values each target trains, and the sizes where the code paths change: plain Python, no torch.

The package uses these to build and run an adapter; tools/benchmarks/memory_model.py, which imports no torch, uses the
same names to predict its memory, so a change here changes both.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import SparseConfig

# On CPU: `sampled_addmm` computes the values' gradient below this density, dense-then-gather above. The
# crossover is near 5-6% for most shapes (dense wins for the small k/v projections); see tools/benchmarks/bench_layer.py.
SAMPLED_MAX_DENSITY = 0.05
# On CUDA: the Triton SDDMM below this density, dense-then-gather above. An estimate until
# tools/benchmarks/bench_kernels.py measures it (tools/gpu_check.sh runs it): the kernel reads ~tokens·bytes of x per
# position, the dense path computes 2·tokens·out·in FLOPs, so kernel÷dense ≈ density·bytes·FLOP rate÷(2·byte
# rate) whatever the token count; on current GPUs that puts the crossover near 0.5-1% in bf16 and 3-7% in fp32
# without TF32, and 2% sits between the two.
TRITON_MAX_DENSITY = 0.02
# SIFT's pool of candidates kept per matrix, in multiples of its trained count k: 12 bytes per pooled position
# (an int32 position and two fp32 sums).
POOL_FACTOR = 4
# Elements of one chunk of SpIEL-MA scores (16 MiB of fp32): bounds memory for any matrix size.
SCORE_CHUNK = 1 << 22


def allocate_budget(shapes: list[tuple[int, ...]], config: SparseConfig) -> list[int]:
    """Trainable values per target: `density` of each, or the total budget shared in proportion to size.

    Args:
        shapes (`list[tuple[int, ...]]`): the shape of each target: (out, in) of a matrix, or (E, out, in) of
            E stacked matrices (fused MoE experts), which LoRA would adapt with one rank-r pair per matrix.
        config (`SparseConfig`): its `density`, `num_params` or `lora_rank_equivalent` sets the budget.

    Returns:
        One count per target, at least one value and at most its size.
    """
    sizes = [math.prod(shape) for shape in shapes]
    if config.density is not None:
        return [max(1, round(config.density * n)) for n in sizes]
    total = config.num_params
    if config.lora_rank_equivalent is not None:
        rank = config.lora_rank_equivalent
        total = sum(rank * math.prod(shape[:-2]) * (shape[-2] + shape[-1]) for shape in shapes)
    if total > sum(sizes):
        raise ValueError(
            f"The budget of {total} values exceeds the {sum(sizes)} weights of the targets; "
            "lower `num_params`/`lora_rank_equivalent` or target more modules."
        )
    return share_budget(sizes, total)


def share_budget(sizes: list[int], total: int) -> list[int]:
    """`total` values shared in proportion to `sizes`, each share clamped to [1, size].

    Shares are rounded by largest remainder (ties to the earlier target), so before clamping they add up to
    `total` exactly.
    """
    if not sizes:
        return []
    scale = total / sum(sizes)
    exact = [size * scale for size in sizes]
    counts = [math.floor(e) for e in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda j: exact[j] - counts[j], reverse=True)
    for j in by_remainder[: total - sum(counts)]:
        counts[j] += 1
    return [min(max(1, count), size) for count, size in zip(counts, sizes)]
