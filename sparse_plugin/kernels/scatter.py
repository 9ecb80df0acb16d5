"""Scatter of sparse values into a dense weight: the merge (`W[idx] += alpha * v`) and the exact restore
(`W[idx] = v`).

Both paths compute in fp32 and round once to the weight's dtype, so the Triton kernel (CUDA, or CPU
under `TRITON_INTERPRET=1`, in `scatter_triton`) and the torch reference (the CPU path) agree bit for bit.

Positions are not bound-checked here: the Triton kernel would write outside the weight, the torch path would
raise a bare IndexError. Callers pass positions already validated against the weight they write: `read_adapter`
checks each adapter's indices (in range of the recorded shape, sorted, unique) and `sparse_plugin.merge` checks
that shape against the checkpoint's header and the loaded tensor; a layer's indices come from its own selection.
"""

from __future__ import annotations

import torch

from .backend import pick_backend


def scatter_add_reference(
    weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, alpha: float = 1.0
) -> None:
    """Torch reference and CPU path of the merge: one fp32 add, one rounding to `weight.dtype`."""
    flat = weight.view(-1)
    current = flat.index_select(0, indices).float()
    flat.index_copy_(0, indices, current.add_(values.float(), alpha=alpha).to(weight.dtype))


def scatter_set_reference(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> None:
    """Torch reference and CPU path of the exact restore."""
    weight.view(-1).index_copy_(0, indices, values.to(weight.dtype))


def _check(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> None:
    if not weight.is_contiguous():
        raise ValueError("scatter needs a contiguous weight; call .contiguous() first.")
    if indices.dim() != 1 or values.dim() != 1 or indices.numel() != values.numel():
        raise ValueError(
            f"indices and values must be 1-D and of equal length, got {tuple(indices.shape)} and {tuple(values.shape)}."
        )
    if indices.device != weight.device or values.device != weight.device:
        raise ValueError(
            f"weight, indices and values must share a device, got {weight.device}, {indices.device}, {values.device}."
        )


def scatter_add_(
    weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, alpha: float = 1.0, backend: str = "auto"
) -> torch.Tensor:
    """Add `alpha * values` to `weight` at the flat `indices`, in place.

    Args:
        weight (`torch.Tensor`): dense contiguous weight of any shape, modified in place.
        indices (`torch.Tensor`): unique flat positions (int32 or int64), 1-D, each in [0, `weight.numel()`):
            validated by the caller, not here (see the module docstring).
        values (`torch.Tensor`): one value per position, 1-D, any float dtype.
        alpha (`float`, defaults to 1.0): 1 merges, -1 subtracts.
        backend (`str`, defaults to `"auto"`): `"triton"` on CUDA, `"torch"` otherwise.

    Returns:
        `weight`.

    Example:
        ```python
        >>> w = torch.zeros(2, 3)
        >>> scatter_add_(w, torch.tensor([1, 5]), torch.tensor([1.0, 2.0])).tolist()
        [[0.0, 1.0, 0.0], [0.0, 0.0, 2.0]]
        ```
    """
    _check(weight, indices, values)
    if pick_backend(backend, weight) == "triton":
        from .scatter_triton import launch  # here, so that a CPU merge (sparse-merge without a GPU) never loads Triton

        launch(weight, indices, values, alpha, add=True)
    else:
        scatter_add_reference(weight, indices.long(), values, alpha)
    return weight


def scatter_set_(
    weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, backend: str = "auto"
) -> torch.Tensor:
    """Overwrite `weight` at the flat `indices` with `values`, in place (the bit-exact unmerge).

    `indices` are unique and in [0, `weight.numel()`), validated by the caller as for `scatter_add_`.
    """
    _check(weight, indices, values)
    if pick_backend(backend, weight) == "triton":
        from .scatter_triton import launch

        launch(weight, indices, values, 0.0, add=False)
    else:
        scatter_set_reference(weight, indices.long(), values)
    return weight
