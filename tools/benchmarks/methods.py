"""The whole-model methods that `bench_step` and `bench_quality` compare, the memory probes, and the driver that
runs each method in its own subprocess (`python -m <benchmark> --method X --json`).

Methods (all on SmolLM2-135M-Instruct, every linear layer except `lm_head`):

* `floor`: every weight frozen; the input embeddings require grad, so backward runs through all layers for
  dx only. The cost any method pays at least (bench_step only).
* `spiel-ma`: `SparseConfig(lora_rank_equivalent=16, regrow="ma")` + `SM3`.
* `spiel-ag`: the same budget, `regrow="ag"` + `SparseAdamW`.
* `lora-r16`, `dora-r16`: PEFT `LoraConfig(r=16, lora_alpha=32, lora_dropout=0, use_dora=...)` on
  `"all-linear"`, torch `AdamW`.
* `shira`: PEFT `ShiraConfig(r=16)` (random mask, r·(in + out) values per matrix: LoRA r16's count), AdamW.
* `supertuning`: PEFT `SupertuningConfig` (peft >= 0.21: the largest-magnitude entries of each matrix, int32
  positions + fp32 values), `sparsity` set so its total count is LoRA r16's; AdamW.
* `full`: every parameter trained (the tied embedding / head included), torch `AdamW`.
* `spiel-ma-1pct`: `SparseConfig(density=0.01)` + `SM3`; `lora-1pct`: LoRA whose rank gives the same
  trainable count, `round(k / Σ(in + out))` (r = 3 on SmolLM2), alpha = 2r.

All torch AdamW instances use `weight_decay=0` (torch's default is 0.01), like our optimizers' default.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

try:  # Linux only; maxrss_mb is unavailable elsewhere
    import resource
except ImportError:  # pragma: no cover
    resource = None

import torch

from tools.benchmarks.common import OtherLoad

ROOT = Path(__file__).resolve().parents[2]  # where `python -m tools.benchmarks...` finds the package

MIB = 2**20
LORA_RANK = 16
ONE_PERCENT = 0.01

# name -> (family, optimizer): what `build_method` makes; the order is the tables' order.
BENCH_METHODS = {
    "floor": ("floor", None),
    "spiel-ma": ("spiel", "SM3"),
    "spiel-ag": ("spiel", "SparseAdamW"),
    "smt": ("smt", "SparseAdamW"),
    "sift": ("sift", "SparseAdamW"),
    "lora-r16": ("lora", "AdamW"),
    "dora-r16": ("dora", "AdamW"),
    "shira": ("shira", "AdamW"),
    "supertuning": ("supertuning", "AdamW"),
    "full": ("full", "AdamW"),
    "spiel-ma-1pct": ("spiel", "SM3"),
    "lora-1pct": ("lora", "AdamW"),
}
# SpIEL settings measured against the defaults (tools/bench_quality.py): name -> (base method, SparseConfig fields,
# optimizer arguments). The base method's row is the paper-faithful setting.
SPIEL_VARIANTS = {
    "spiel-ma-mag": ("spiel-ma", {"initial_positions": "magnitude"}, {}),
    "spiel-ag-mag": ("spiel-ag", {"initial_positions": "magnitude"}, {}),
    "spiel-ma-static": ("spiel-ma", {"initial_reselection_rate": 0.0}, {}),
    "spiel-ag-ramp": ("spiel-ag", {}, {"regrown_start": "ramp"}),
    "spiel-ag-static": ("spiel-ag", {"initial_reselection_rate": 0.0}, {}),
    "spiel-ag-mag-static": ("spiel-ag", {"initial_positions": "magnitude", "initial_reselection_rate": 0.0}, {}),
    "spiel-ag-mag-ramp": ("spiel-ag", {"initial_positions": "magnitude"}, {"regrown_start": "ramp"}),
    "spiel-ag-mag-ramp-r10": (
        "spiel-ag",
        {"initial_positions": "magnitude", "initial_reselection_rate": 0.1},
        {"regrown_start": "ramp"},
    ),
    "spiel-ma-m9": ("spiel-ma", {}, {"momentum": 0.9}),
    "spiel-ma-b9": ("spiel-ma", {}, {"beta": 0.9}),
    "spiel-ma-rms": ("spiel-ma", {}, {"beta": 0.999}),
    "spiel-ma-mag-m9": ("spiel-ma", {"initial_positions": "magnitude"}, {"momentum": 0.9}),
}

# The LoRA row each method's trainable count equals (for the "matched LoRA" ratio).
MATCHED_LORA = {
    "spiel-ma": "lora-r16",
    "spiel-ag": "lora-r16",
    "smt": "lora-r16",
    "sift": "lora-r16",
    "dora-r16": "lora-r16",
    "shira": "lora-r16",
    "supertuning": "lora-r16",
    "spiel-ma-1pct": "lora-1pct",
}


# ---------------------------------------------------------------- memory


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def rss_mb() -> float:
    """Resident set size now (Linux /proc; elsewhere the lifetime peak, the best available)."""
    kb = _status_kb("VmRSS")
    return kb / 1024 if kb is not None else maxrss_mb()


def maxrss_mb() -> float:
    """Lifetime peak RSS from getrusage (KiB on Linux, bytes on macOS)."""
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value / (MIB if sys.platform == "darwin" else 1024)


def reset_peak() -> bool:
    """Reset the kernel's RSS high-water mark (`echo 5 > /proc/self/clear_refs`, Linux >= 4.0), so the next
    `peak_rss_mb()` excludes model loading's transient peak. False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak RSS since the last `reset_peak()` (VmHWM), or the lifetime `ru_maxrss` where /proc is missing."""
    kb = _status_kb("VmHWM")
    return kb / 1024 if kb is not None else maxrss_mb()


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of every tensor in `optimizer.state` (moments, accumulators, step counters, ages)."""
    if optimizer is None:
        return 0
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                total += value.numel() * value.element_size()
    return total


# ---------------------------------------------------------------- methods


def load_base():
    """(model, tokenizer): the bundled SmolLM2 in fp32, every page of its weights touched, so the RSS read
    after it is the loaded model and not a lazily mapped file."""
    from tools.bundled_model import load_model

    model, tokenizer = load_model()
    with torch.no_grad():
        for param in model.parameters():
            param.sum()
    return model, tokenizer


def linear_targets(model) -> list[tuple[int, int]]:
    """(out, in) of every linear layer that "all-linear" selects (all but the head)."""
    from sparse_plugin.config import ALL_LINEAR
    from sparse_plugin.model import find_targets

    modules = dict(model.named_modules())
    return [(modules[n].out_features, modules[n].in_features) for n in find_targets(model, ALL_LINEAR)]


def lora_rank_for_density(model, density: float) -> int:
    """The LoRA rank whose trainable count is closest to SpIEL's at `density` (at least 1)."""
    from sparse_plugin.config import SparseConfig
    from sparse_plugin.sizing import allocate_budget

    shapes = linear_targets(model)
    k = sum(allocate_budget(shapes, SparseConfig(density=density)))
    return max(1, round(k / sum(o + i for o, i in shapes)))


def trainable_params(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_method(
    model, method: str, *, lr: float, total_steps: int, sparse_overrides: dict | None = None, seed: int = 0
):
    """Turn the loaded base `model` into `method`'s trainable model; returns (model, optimizer, info).

    `sparse_overrides` are extra `SparseConfig` fields for the sparse methods (bench_step shortens AG's
    reselection period so gathering and non-gathering steps both occur in its window, and ends SMT's and
    SIFT's selection within its warm-up steps). All sparse methods target every linear layer but the head, at
    LoRA-r16's trainable count (SMT too, though its paper's default is Q/K/V), so rows compare like for like.
    `seed` draws the random initial positions (SpIEL) and SHiRA's mask; LoRA's A comes from torch's global seed.
    `method` may also name one of `SPIEL_VARIANTS`. The model stays on the device it was given.
    """
    optimizer_options: dict = {}
    if method in SPIEL_VARIANTS:
        method, variant_fields, optimizer_options = SPIEL_VARIANTS[method]
        sparse_overrides = {**variant_fields, **(sparse_overrides or {})}
    if method not in BENCH_METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join([*BENCH_METHODS, *SPIEL_VARIANTS])}")
    family, _ = BENCH_METHODS[method]
    info: dict = {}
    if family == "floor":
        model.requires_grad_(False)
        return model, None, info
    if family == "full":
        model.requires_grad_(True)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        return model, optimizer, info
    if family in ("spiel", "smt", "sift"):
        import sparse_plugin
        from sparse_plugin import SM3, SparseAdamW, SparseConfig

        budget = {"density": ONE_PERCENT} if method.endswith("-1pct") else {"lora_rank_equivalent": LORA_RANK}
        regrow = "ag" if method == "spiel-ag" else "ma"
        config = SparseConfig(
            method=family, regrow=regrow, target_modules="all-linear", seed=seed, **budget, **(sparse_overrides or {})
        )
        model = sparse_plugin.prepare_model(model, config)
        cls = SM3 if BENCH_METHODS[method][1] == "SM3" else SparseAdamW
        optimizer = cls(model, lr=lr, total_steps=total_steps, **optimizer_options)
        info["optimizer_options"] = optimizer_options
        layers = [layer for _, layer in sparse_plugin.iter_sparse_layers(model)]
        info["strategies"] = sorted({f"{layer.strategy()}" for layer in layers})
        from sparse_plugin.kernels.sddmm import pick_grad_path

        info["grad_paths"] = sorted({pick_grad_path(layer.pattern()) for layer in layers})
        info["sparse_config"] = {
            k: v
            for k, v in config.to_dict().items()
            if k
            in (
                "method",
                "density",
                "lora_rank_equivalent",
                "regrow",
                "reselection_steps",
                "selection_accumulation_steps",
                "block_size",
                "warmup_steps",
                "selection_steps",
                "initial_positions",
                "initial_reselection_rate",
            )
        }
        return model, optimizer, info
    from peft import get_peft_model

    if family in ("lora", "dora"):
        from peft import LoraConfig

        rank = lora_rank_for_density(model, ONE_PERCENT) if method.endswith("-1pct") else LORA_RANK
        peft_config = LoraConfig(
            r=rank,
            lora_alpha=2 * rank,
            lora_dropout=0.0,
            target_modules="all-linear",
            use_dora=family == "dora",
            task_type="CAUSAL_LM",
        )
        info["rank"] = rank
    elif family == "shira":
        from peft import ShiraConfig

        peft_config = ShiraConfig(r=LORA_RANK, target_modules="all-linear", random_seed=seed, task_type="CAUSAL_LM")
    else:  # supertuning: one sparsity for every matrix, so counts follow sizes as SpIEL's budget does
        from peft import SupertuningConfig

        shapes = linear_targets(model)
        sparsity = 1 - sum(LORA_RANK * (o + i) for o, i in shapes) / sum(o * i for o, i in shapes)
        peft_config = SupertuningConfig(sparsity=sparsity, target_modules="all-linear", task_type="CAUSAL_LM")
        info["sparsity"] = sparsity
    model = get_peft_model(model, peft_config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    return model, optimizer, info


# ---------------------------------------------------------------- driver


def run_child(
    module: str, method: str, extra: list[str], timeout: float | None = None
) -> tuple[list[dict], float | None]:
    """Run `python -m MODULE --method METHOD --json EXTRA` (from the repository root) in a fresh interpreter; its
    JSON lines, and the share of the machine that other processes used meanwhile. A failure becomes one row with
    an `error`. Callers pass their own `__spec__.name`."""
    load = OtherLoad()
    command = [sys.executable, "-m", module, "--method", method, "--json", *extra]
    try:
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [{"method": method, "error": f"timed out after {timeout} s"}], load.share()
    rows = []
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    if done.returncode != 0 or not rows:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        rows.append({"method": method, "error": f"exit {done.returncode}: {tail[-400:]}"})
    return rows, load.share()
