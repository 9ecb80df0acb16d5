"""`SparseConfig`: what to train sparsely, how much of it, and how to pick the positions.

One dataclass is the single source of truth for every option: the Axolotl args model and the
adapter's `sparse_config.json` are derived from its fields, never copied by hand.
"""

from __future__ import annotations

import dataclasses
import re
import textwrap
from dataclasses import dataclass, field
from typing import Any

SELECTION_METHODS = ("spiel", "smt", "sift")
VALUES_DTYPES = ("float32", "bfloat16", "float16")
FORWARD_STRATEGIES = ("auto", "additive", "merged")
REGROW_METHODS = ("ma", "ag")
INITIAL_POSITIONS = ("random", "magnitude")
RESELECTION_SCHEDULES = ("linear", "cosine")
ALL_LINEAR = "all-linear"
ALL_WEIGHTS = "all-weights"
SMT_DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj")


def _document_fields(cls: type) -> type:
    """Write the docstring's Args section from each field's `help` metadata, the text Axolotl's keys show too."""
    if cls.__doc__ is None:  # python -OO
        return cls
    entries = []
    for item in dataclasses.fields(cls):
        default = "*optional*" if item.default is None else f"defaults to `{item.default!r}`"
        entry = f"{item.name} (`{item.type.removesuffix(' | None')}`, {default}): {item.metadata['help']}"
        entries.append(textwrap.fill(entry, 115, initial_indent=" " * 8, subsequent_indent=" " * 12))
    summary, example = cls.__doc__.split("    Example:", 1)
    cls.__doc__ = summary + "    Args:\n" + "\n".join(entries) + "\n\n    Example:" + example
    return cls


@_document_fields
@dataclass
class SparseConfig:
    """Configuration of a sparse fine-tune.

    Give exactly one budget: `density`, `num_params` or `lora_rank_equivalent`.

    Example:
        ```python
        >>> from sparse_plugin import SparseConfig
        >>> SparseConfig(lora_rank_equivalent=16, target_modules=["q_proj", "v_proj"]).method
        'spiel'
        ```
    """

    method: str = field(default="spiel", metadata={"help": 'selection method, one of `"spiel"`, `"smt"`, `"sift"`.'})
    density: float | None = field(
        default=None,
        metadata={"help": "share of each targeted weight matrix that is trained, in (0, 1]."},
    )
    num_params: int | None = field(
        default=None,
        metadata={"help": "total trainable values, spread over the targets in proportion to their size."},
    )
    lora_rank_equivalent: int | None = field(
        default=None,
        metadata={
            "help": (
                "set `num_params` to what LoRA of this rank would train on the same targets, `r * (in + out)` summed "
                "over them."
            )
        },
    )
    target_modules: str | list[str] | None = field(
        default=None,
        metadata={
            "help": (
                'a list of module-name suffixes (`["q_proj", "v_proj"]`, `["experts"]`), a regular expression matched '
                'against the full module name, `"all-linear"` for every linear projection (`nn.Linear`, GPT-2\'s '
                '`Conv1D`) except the output head, or `"all-weights"` for every weight of two or more dimensions '
                "(also fused MoE experts and routers) except the output head and the embeddings. A matched module "
                'contributes its own >=2-D weights. Defaults to `"all-linear"` (none when only `target_parameters` '
                'is given), and to `["q_proj", "k_proj", "v_proj"]` for SMT as in its paper.'
            )
        },
    )
    target_parameters: str | list[str] | None = field(
        default=None,
        metadata={
            "help": (
                "weights targeted by parameter name, on top of `target_modules`: a list of name suffixes "
                '(`["experts.gate_up_proj", "experts.down_proj", "embed_tokens.weight"]`) or a regular expression '
                "matched against the full parameter name, as PEFT's option of that name; any weight of two or more "
                "dimensions (see docs/targets.md)."
            )
        },
    )
    values_dtype: str = field(
        default="float32",
        metadata={
            "help": (
                "dtype of the trained values; fp32 keeps tiny updates that a bf16 copy of the base would round away."
            )
        },
    )
    seed: int = field(default=0, metadata={"help": "seed of the random initial indices."})
    initial_positions: str = field(
        default="random",
        metadata={
            "help": (
                'SpIEL\'s first positions: `"random"` (uniform per matrix, as in the SpIEL paper) or `"magnitude"` (the'
                " largest |W0| entries of each matrix, as PEFT's Super-Tuning). SMT and SIFT choose from gradients"
                " instead."
            )
        },
    )
    forward_strategy: str = field(
        default="auto",
        metadata={
            "help": (
                '`"additive"` (y = base(x) + x·Δᵀ), `"merged"` (the base weight holds W0 + Δ between steps, rounded '
                'to its dtype; dense float bases only) or `"auto"` (merged wherever the base allows it, additive for '
                "quantised or FSDP-sharded bases)."
            )
        },
    )
    store_base_values: bool = field(
        default=True,
        metadata={
            "help": (
                "save the base weight's entries at the indices in the adapter, so `sparse-merge unmerge` restores the"
                " base bit for bit."
            )
        },
    )
    regrow: str = field(
        default="ma",
        metadata={
            "help": (
                "SpIEL's regrowth criterion: "
                '`"ma"` scores inactive positions by the SM3 row/column accumulators '
                '(needs `optim="spiel_sm3"`), `"ag"` by gradients accumulated over the gathering steps for the top '
                "candidates of the first gathering micro-batch."
            )
        },
    )
    reselection_steps: int = field(default=20, metadata={"help": "optimizer steps between prune/regrow rounds."})
    selection_accumulation_steps: int = field(
        default=5,
        metadata={
            "help": (
                "optimizer steps of gradient gathering before each round (AG only); must be at most "
                "`reselection_steps`."
            )
        },
    )
    initial_reselection_rate: float = field(
        default=0.2,
        metadata={
            "help": (
                "share of each matrix's positions replaced in the first round, in [0, 1]; it decays to 0 at the end "
                "of training."
            )
        },
    )
    reselection_schedule: str = field(
        default="linear",
        metadata={"help": 'decay of that share, `"linear"` (the SpIEL reference) or `"cosine"`.'},
    )
    block_size: int = field(
        default=256,
        metadata={
            "help": (
                "SMT's block edge, clamped to each matrix; blocks at the edges of dimensions that are not multiples "
                "are smaller."
            )
        },
    )
    warmup_steps: int | None = field(
        default=None,
        metadata={
            "help": (
                "SMT's optimizer steps of gradient statistics (no updates) before the blocks are chosen; defaults to "
                "10% of the run, at most 100 (the paper's value)."
            )
        },
    )
    selection_steps: int = field(
        default=4,
        metadata={
            "help": (
                "SIFT's micro-batches of accumulated gradient before the positions are chosen; selection happens at "
                "the end of the optimizer step that holds the last one, and that step already updates the chosen "
                "positions."
            )
        },
    )

    def __post_init__(self) -> None:
        _check_choice("method", self.method, SELECTION_METHODS)
        _check_choice("values_dtype", self.values_dtype, VALUES_DTYPES)
        _check_choice("forward_strategy", self.forward_strategy, FORWARD_STRATEGIES)
        _check_choice("initial_positions", self.initial_positions, INITIAL_POSITIONS)
        self._check_budget()
        self._check_target_modules()
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"`seed` must be an int, got {self.seed!r}.")
        if not isinstance(self.store_base_values, bool):
            raise ValueError(f"`store_base_values` must be true or false, got {self.store_base_values!r}.")
        self._check_selection()

    def _check_budget(self) -> None:
        given = [k for k in ("density", "num_params", "lora_rank_equivalent") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "Give exactly one of `density`, `num_params`, `lora_rank_equivalent` "
                f"(got {', '.join(f'`{k}`' for k in given) or 'none'}); e.g. `density=0.01`."
            )
        if self.density is not None:
            if (
                isinstance(self.density, bool)
                or not isinstance(self.density, (int, float))
                or not 0 < self.density <= 1
            ):
                raise ValueError(f"`density` must be a number in (0, 1], got {self.density!r}.")
            self.density = float(self.density)
        for name in ("num_params", "lora_rank_equivalent"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"`{name}` must be a positive int, got {value!r}.")

    def _check_selection(self) -> None:
        _check_choice("regrow", self.regrow, REGROW_METHODS)
        _check_choice("reselection_schedule", self.reselection_schedule, RESELECTION_SCHEDULES)
        for name in (
            "reselection_steps",
            "selection_accumulation_steps",
            "block_size",
            "warmup_steps",
            "selection_steps",
        ):
            value = getattr(self, name)
            if name == "warmup_steps" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
        if self.regrow == "ag" and self.selection_accumulation_steps > self.reselection_steps:
            raise ValueError(
                f"`selection_accumulation_steps` ({self.selection_accumulation_steps}) must not exceed "
                f"`reselection_steps` ({self.reselection_steps}): gathering happens within each reselection period."
            )
        rate = self.initial_reselection_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
            raise ValueError(f"`initial_reselection_rate` must be a number in [0, 1], got {rate!r}.")
        self.initial_reselection_rate = float(rate)

    def _check_target_modules(self) -> None:
        """Fill the method's default targets, then check each option is a preset, a regex or a list of suffixes."""
        if self.target_modules is None and self.target_parameters is None:
            self.target_modules = list(SMT_DEFAULT_TARGETS) if self.method == "smt" else ALL_LINEAR
        if self.target_modules is not None:
            self.target_modules = _check_targets("target_modules", self.target_modules, (ALL_LINEAR, ALL_WEIGHTS))
        if self.target_parameters is not None:
            self.target_parameters = _check_targets("target_parameters", self.target_parameters, ())

    def to_dict(self) -> dict[str, Any]:
        """Plain-json dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SparseConfig:
        """Build from `to_dict()` output; unknown keys are an error naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(
                f"Unknown SparseConfig field(s) {unknown}; allowed: {sorted(names)}. "
                "Was this written by a newer sparse_plugin? Upgrade it."
            )
        return cls(**data)


def _check_targets(name: str, targets: Any, presets: tuple[str, ...]) -> str | list[str]:
    """A preset, a valid regex string, or a non-empty list of name suffixes (returned as a list)."""
    kind = "module" if name == "target_modules" else "parameter"
    allowed = "".join(f"{p!r}, " for p in presets)
    neither = f"neither {' nor '.join(map(repr, presets))} nor" if presets else "not"
    if isinstance(targets, str):
        if targets in presets:
            return targets
        try:
            re.compile(targets)
        except re.error as err:
            raise ValueError(
                f"`{name}` {targets!r} is {neither} a valid regular expression ({err}); pass a list of "
                f"{kind}-name suffixes such as {['q_proj', 'v_proj'] if presets else ['experts.down_proj']}."
            ) from None
        return targets
    if isinstance(targets, (list, tuple)) and targets and all(isinstance(t, str) and t for t in targets):
        return list(targets)
    raise ValueError(
        f"`{name}` must be {allowed}a regex string, or a non-empty list of {kind}-name suffixes; got {targets!r}."
    )


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, allowed))}; got {value!r}.")
