"""Optimizers for sparse deltas: plain `torch.optim.Optimizer` subclasses, usable without any trainer."""

from .sm3 import SM3
from .sparse_adamw import SparseAdamW

__all__ = ["SM3", "SparseAdamW"]
