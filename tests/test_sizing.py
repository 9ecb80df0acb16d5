"""The budget arithmetic (torch-free) against a torch reference, and its rounding, clamping and refusal."""

import random

import pytest
import torch

from sparse_plugin import SparseConfig
from sparse_plugin.sizing import allocate_budget, share_budget


def _reference_share(sizes: list[int], total: int) -> list[int]:
    """Largest remainder in float64 tensors: floor the exact shares, then +1 to the largest remainders."""
    size = torch.tensor(sizes, dtype=torch.float64)
    exact = size * (total / size.sum())
    counts = exact.floor().long()
    order = torch.argsort(exact - counts, descending=True, stable=True)
    counts[order[: total - int(counts.sum())]] += 1
    return counts.clamp(1, None).minimum(size.long()).tolist()


@pytest.mark.parametrize("seed", range(20))
def test_share_matches_torch_reference(seed):
    rng = random.Random(seed)
    sizes = [rng.choice([1, 7, 64, 576 * 192, 576 * 1536]) * rng.randint(1, 3) for _ in range(rng.randint(1, 30))]
    total = rng.randint(1, sum(sizes))
    assert share_budget(sizes, total) == _reference_share(sizes, total)


def test_share_breaks_ties_towards_the_earlier_target():
    assert share_budget([10, 10, 10], 2) == [1, 1, 1]  # clamped to one each
    assert share_budget([10, 10, 10, 10], 6) == [2, 2, 1, 1]


def test_budget_proportional_to_size_and_exact():
    shapes = [(48, 48), (24, 48), (80, 48), (48, 80)]
    counts = allocate_budget(shapes, SparseConfig(num_params=1000))
    assert sum(counts) == 1000
    for (o, i), c in zip(shapes, counts):
        assert abs(c - 1000 * o * i / sum(a * b for a, b in shapes)) < 1
    lora = allocate_budget(shapes, SparseConfig(lora_rank_equivalent=4))
    assert sum(lora) == sum(4 * (o + i) for o, i in shapes)
    assert allocate_budget(shapes, SparseConfig(density=0.25)) == [576, 288, 960, 960]


def test_budget_larger_than_targets_is_refused():
    with pytest.raises(ValueError, match="exceeds the 12 weights"):
        allocate_budget([(3, 4)], SparseConfig(num_params=13))
