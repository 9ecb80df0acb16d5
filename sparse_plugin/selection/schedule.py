"""When the selection methods gather and decide, counted in optimizer steps: the schedule arithmetic, in one place.

Steps are numbered from 1 (the first `optimizer.step()`). SpIEL: with reselection every R steps and A gathering
steps, steps kR-A+1 … kR gather (all their micro-batches, so gradient accumulation changes nothing) and the
prune/regrow round runs right after step kR, as in the SpIEL reference (AlanAnsell/peft `tuners/sft/trainer.py`).
SMT: gathers from step 1 and chooses after its warm-up. (SIFT counts micro-batches, inside its collectors.)
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


def gathers_for_a_round(step: int, config: SparseConfig, total_steps: int | None) -> bool:
    """Whether step `step` gathers importance for a round that will run: a gathering step whose round (the next
    multiple of `reselection_steps`) comes before the end of the run, or any gathering step while its length is
    unknown."""
    period = config.reselection_steps
    next_round = -(-step // period) * period
    return is_gathering_step(step, config) and (
        total_steps is None or is_reselection_step(next_round, config, total_steps)
    )


def reselection_rate(step: int, config: SparseConfig, total_steps: int) -> float:
    """Share of each matrix's positions replaced after `step`: the initial rate decayed to 0 at `total_steps`."""
    progress = min(max(step / total_steps, 0.0), 1.0)
    if config.reselection_schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        decay = 1.0 - progress
    return config.initial_reselection_rate * decay


# SMT's paper warms up for 100 steps; shorter runs use a tenth of their length.
MAX_WARMUP_STEPS = 100
WARMUP_SHARE = 0.1


def warmup_length(config: SparseConfig, total_steps: int | None) -> int | None:
    """SMT's steps before it chooses: configured `warmup_steps`, else 10% of the run capped at 100 (None while the
    run length is unknown)."""
    if config.warmup_steps is not None:
        return config.warmup_steps
    if total_steps is None:
        return None
    return max(1, min(MAX_WARMUP_STEPS, int(WARMUP_SHARE * total_steps)))
