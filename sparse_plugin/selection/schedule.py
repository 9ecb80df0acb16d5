"""When SpIEL gathers importance and when it prunes/regrows, counted in optimizer steps.

Steps are numbered from 1 (the first `optimizer.step()`). With reselection every R steps and A gathering
steps, steps kR-A+1 … kR gather (all their micro-batches, so gradient accumulation changes nothing) and the
prune/regrow round runs right after step kR, as in the SpIEL reference (AlanAnsell/peft `tuners/sft/trainer.py`).
"""

from __future__ import annotations

import math

from ..config import SparseConfig


def is_gathering_step(step: int, config: SparseConfig) -> bool:
    """Whether optimizer step `step` (1-based) gathers importance for the next round."""
    period = config.reselection_steps
    return step >= 1 and (step - 1) % period >= period - config.selection_accumulation_steps


def is_reselection_step(step: int, config: SparseConfig, total_steps: int) -> bool:
    """Whether a prune/regrow round runs after optimizer step `step`; never after the last step."""
    return step >= 1 and step % config.reselection_steps == 0 and step < total_steps


def reselection_rate(step: int, config: SparseConfig, total_steps: int) -> float:
    """Share of each matrix's positions replaced after `step`: the initial rate decayed to 0 at `total_steps`."""
    progress = min(max(step / total_steps, 0.0), 1.0)
    if config.reselection_schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        decay = 1.0 - progress
    return config.initial_reselection_rate * decay
