"""Benchmark one `SparseDeltaLinear` training step (forward + backward) against LoRA and full fine-tuning.

What is measured, per (shape, tokens, density), all in one run on one machine:

* `sparse-additive-{dense,sampled}`: y = base(x) + x·Δᵀ, the values' gradient by dense-then-gather or by
  `torch.sparse.sampled_addmm` (`layer(x, grad_path=...)`).
* `sparse-merged-{dense,sampled}`: y = x·(W0 + Δ)ᵀ with the same two gradient paths.
* On CUDA, also `sparse-{additive,merged}-triton`: the values' gradient by the Triton SDDMM kernel.
* `lora`: a hand-written LoRA layer (frozen `nn.Linear` + A (r × in), B (out × r), PEFT's
  `base(x) + B(A(x)) * scaling`) with r = round(k / (in + out)), at least 1, so it trains about as many
  values as the sparse layer (k = density · out · in).
* `full`: an `nn.Linear` whose weight requires grad (full fine-tuning of that layer); it does not depend on
  the density, so it is measured once per shape, in the first density's rounds, and reused for the ratios.

Every variant also computes dx (the input requires grad, as in any layer but the first). All in fp32, the
only dtype for which the `"auto"` rule may pick the merged forward. The `auto` column says which of the
four sparse variants `SparseDeltaLinear.strategy()` and `pick_grad_path()` choose for that row.

Timing: warm-up steps, then rounds in which every variant runs one step in a shuffled order (so load from
other processes on a shared machine spreads over all variants instead of biasing one); median and
p10/p90 of the per-step wall time (CUDA is synchronised around each phase). Repeats are adaptive:
rounds stop after `--repeats`, or earlier once `--budget-s` seconds of rounds have passed and at least
`--min-repeats` rounds are done (so the 4096-wide shapes get the minimum and SmolLM2's get the maximum).

Peak memory: bytes allocated during one step above what was allocated before it (parameters, x and the
output gradient already exist; .grad of x and the trainable parameters are reset to None first, so their
allocation is counted). CUDA: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`. CPU:
torch has no peak counter, so the step runs once under `torch.profiler` with `profile_memory=True` and the
allocation/free events of the c10 CPU allocator are summed in time order; the maximum of that running sum
is the peak. It counts every tensor torch allocates (outputs, saved activations, transient products such as
dyᵀx, the merged weight copy, gradients) but not scratch memory that MKL/oneDNN allocate internally
outside torch's allocator; both sides of every ratio are measured the same way.

Usage (from the repository root):

    .venv/bin/python -m tools.benchmarks.bench_layer --quick           # SmolLM2 shapes only, ~20-30 s on 2 cores
    .venv/bin/python -m tools.benchmarks.bench_layer --json            # all shapes, JSON lines then the tables, ~6 min
    .venv/bin/python -m tools.benchmarks.bench_layer --shapes 4096x4096:1024 --densities 0.01,0.046

The sweeps behind the `"auto"` rule's constants (token counts and densities beyond the default grid):

    .venv/bin/python -m tools.benchmarks.bench_layer --no-memory --densities 0.0005,0.002,0.005,0.02,0.046 \
        --shapes 576x576:16,576x576:128,1536x576:16,1536x576:128,4096x4096:16,4096x4096:256,4096x4096:512
    .venv/bin/python -m tools.benchmarks.bench_layer --no-memory --densities 0.046,0.07,0.1,0.15 \
        --shapes 576x576,1536x576,576x1536,192x576,4096x4096:512,4096x4096:2048

Shapes are written out × in (the weight's shape), optionally `:tokens`; SmolLM2-135M's projections are
576×576 (q/o), 192×576 (k/v), 1536×576 (gate/up) and 576×1536 (down).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from sparse_plugin.kernels._triton import triton
from sparse_plugin.kernels.sddmm import SAMPLED_MAX_DENSITY, pick_grad_path
from sparse_plugin.layer import SparseDeltaLinear
from sparse_plugin.model import random_indices
from tools.benchmarks.common import (
    OtherLoad,
    environment,
    header_lines,
    interleaved_rounds,
    markdown_table,
    percentile,
)

SMOL_TOKENS = 512
BIG_TOKENS = 2048
SMOL_SHAPES = [(576, 576), (1536, 576), (576, 1536), (192, 576)]
BIG_SHAPES = [(4096, 4096), (4096, 11008)]
DENSITIES = [0.005, 0.01, 0.02, 0.046]
CPU_GRAD_PATHS = ("dense", "sampled")
MIB = 2**20


def sparse_variants(device: torch.device) -> list[tuple[str, str]]:
    """(forward, gradient path) pairs to time: the Triton gradient only where it compiles (CUDA)."""
    grads = CPU_GRAD_PATHS + (("triton",) if device.type == "cuda" and triton is not None else ())
    return [(fwd, grad) for fwd in ("additive", "merged") for grad in grads]


class LoRALinear(nn.Module):
    """Frozen `base` plus B·A, computed as PEFT's LoRA `Linear.forward` does with dropout 0."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None):
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(
            torch.randn(rank, base.in_features, device=base.weight.device) / math.sqrt(base.in_features)
        )
        # PEFT starts B at zero; any value times the same FLOPs, nonzero keeps every product honest.
        self.lora_B = nn.Parameter(torch.randn(base.out_features, rank, device=base.weight.device) * 1e-3)
        self.scaling = (alpha if alpha is not None else 2 * rank) / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling


@dataclass
class Variant:
    name: str
    call: Callable[[torch.Tensor], torch.Tensor]
    params: list[nn.Parameter]
    fwd: list[float] = field(default_factory=list)
    bwd: list[float] = field(default_factory=list)
    peak_bytes: int | None = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(variant: Variant, x: torch.Tensor, dy: torch.Tensor) -> tuple[float, float]:
    """One forward + backward; returns (forward s, backward s). Frees the output before returning."""
    for p in variant.params:
        p.grad = None
    x.grad = None
    device = x.device
    _sync(device)
    t0 = time.perf_counter()
    y = variant.call(x)
    _sync(device)
    t1 = time.perf_counter()
    y.backward(dy)
    _sync(device)
    t2 = time.perf_counter()
    del y
    return t1 - t0, t2 - t1


@contextlib.contextmanager
def _quiet_stderr():
    """Silence Kineto's C-level "profiler_start/stop" lines on fd 2 (two per profiled step)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak_bytes(run: Callable[[], object]) -> int:
    """Peak of the running sum of CPU allocator events while `run()` executes (see the module docstring)."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    try:
        events = prof.profiler.kineto_results.events()
    except AttributeError as err:  # a torch whose profiler moved its results
        raise RuntimeError(
            f"this torch ({torch.__version__}) does not expose profiler memory events; run with --no-memory"
        ) from err
    memory = [
        (e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")
    ]
    memory.sort(key=lambda item: item[0])  # stable: events with equal stamps keep their recorded order
    current = peak = 0
    for _, nbytes in memory:
        current += nbytes
        peak = max(peak, current)
    return peak


def peak_extra_bytes(variant: Variant, x: torch.Tensor, dy: torch.Tensor) -> int:
    """Bytes allocated by one step above those allocated before it."""
    if x.device.type == "cuda":
        _sync(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        before = torch.cuda.memory_allocated(x.device)
        _step(variant, x, dy)
        return torch.cuda.max_memory_allocated(x.device) - before
    return _cpu_peak_bytes(lambda: _step(variant, x, dy))


def build_sparse(base: nn.Linear, density: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random sorted unique indices for `density` of the weight, and nonzero random values."""
    out_features, in_features = base.weight.shape
    count = max(1, round(density * out_features * in_features))
    generator = torch.Generator().manual_seed(seed)
    indices = random_indices(out_features * in_features, count, generator)
    values = torch.randn(count, generator=generator) * 1e-3
    return indices, values


def sparse_layer(base: nn.Linear, indices: torch.Tensor, values: torch.Tensor, strategy: str) -> SparseDeltaLinear:
    layer = SparseDeltaLinear(base, indices, forward_strategy=strategy)
    with torch.no_grad():
        layer.values.copy_(values.to(layer.values.device))
    return layer


def run_config(
    shape: tuple[int, int],
    tokens: int,
    density: float,
    device: torch.device,
    args: argparse.Namespace,
    full: Variant | None,
) -> tuple[list[dict], Variant]:
    """Measure every variant at one (shape, tokens, density); `full` is reused when already measured."""
    out_features, in_features = shape
    seed = out_features * 7919 + in_features * 31 + tokens
    torch.manual_seed(seed)
    base = nn.Linear(in_features, out_features, bias=False, device=device).requires_grad_(False)
    indices, values = build_sparse(base, density, seed)
    k = indices.numel()
    rank = max(1, round(k / (in_features + out_features)))

    variants: list[Variant] = []
    for fwd, grad in sparse_variants(device):
        layer = sparse_layer(base, indices, values, fwd)
        variants.append(
            Variant(f"sparse-{fwd}-{grad}", lambda x, layer=layer, grad=grad: layer(x, grad_path=grad), [layer.values])
        )
    lora = LoRALinear(base, rank)
    variants.append(Variant("lora", lora, [lora.lora_A, lora.lora_B]))
    new_full = full is None
    if new_full:
        dense = nn.Linear(in_features, out_features, bias=False, device=device)
        with torch.no_grad():
            dense.weight.copy_(base.weight)
        full = Variant("full", dense, [dense.weight])
        variants.append(full)

    auto_layer = SparseDeltaLinear(base, indices, forward_strategy="auto")
    auto_name = f"sparse-{auto_layer.strategy()}-{pick_grad_path(auto_layer.pattern())}"

    x = torch.randn(1, tokens, in_features, device=device, requires_grad=True)
    dy = torch.randn(1, tokens, out_features, device=device)

    neighbours = OtherLoad()
    # Warm-up; on CPU the first warm-up step is the memory-profiled one (its time is discarded anyway).
    # On CUDA the memory step follows the warm-up, so one-time workspace allocations are not counted.
    for variant in variants:
        profile_first = not args.no_memory and device.type == "cpu"
        if profile_first:
            variant.peak_bytes = peak_extra_bytes(variant, x, dy)
        for _ in range(args.warmup - profile_first):
            _step(variant, x, dy)
        if not args.no_memory and device.type != "cpu":
            variant.peak_bytes = peak_extra_bytes(variant, x, dy)

    for variant in interleaved_rounds(list(variants), args.repeats, args.min_repeats, args.budget_s, seed):
        f, b = _step(variant, x, dy)
        variant.fwd.append(f)
        variant.bwd.append(b)

    def stats(v: Variant) -> dict:
        steps = [f + b for f, b in zip(v.fwd, v.bwd)]
        return {
            "fwd_ms": 1e3 * statistics.median(v.fwd),
            "bwd_ms": 1e3 * statistics.median(v.bwd),
            "step_ms": 1e3 * statistics.median(steps),
            "step_p10_ms": 1e3 * percentile(steps, 10),
            "step_p90_ms": 1e3 * percentile(steps, 90),
            "repeats": len(steps),
            "peak_mib": None if v.peak_bytes is None else v.peak_bytes / MIB,
        }

    other_share = neighbours.share()
    measured = {v.name: stats(v) for v in variants}
    if not new_full:
        measured["full"] = stats(full)
    rows = []
    for name, s in measured.items():
        row = {
            "kind": "row",
            "shape": [out_features, in_features],
            "tokens": tokens,
            "density": None if name == "full" else density,
            "k": k,
            "lora_rank": rank,
            "variant": name,
            "auto": name == auto_name,
            "auto_choice": auto_name,
            "full_measured_here": name != "full" or new_full,
            "other_cpu_share": other_share,
            **s,
        }
        for ref in ("lora", "full"):
            row[f"time_vs_{ref}"] = s["step_ms"] / measured[ref]["step_ms"]
            ref_mem = measured[ref]["peak_mib"]
            row[f"mem_vs_{ref}"] = None if s["peak_mib"] is None or not ref_mem else s["peak_mib"] / ref_mem
        rows.append(row)
    return rows, full


def parse_shapes(text: str) -> list[tuple[int, int, int | None]]:
    shapes = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        dims, _, tokens = item.partition(":")
        try:
            out_features, in_features = (int(d) for d in dims.lower().replace("×", "x").split("x"))
            shapes.append((out_features, in_features, int(tokens) if tokens else None))
        except ValueError:
            raise SystemExit(
                f"--shapes: cannot read {item!r}; write out x in, optionally :tokens, e.g. 576x1536:512"
            ) from None
    return shapes


def default_tokens(shape: tuple[int, int]) -> int:
    return SMOL_TOKENS if shape in SMOL_SHAPES else BIG_TOKENS


def run_meta(device: torch.device) -> dict:
    """`environment()` plus the rule constant and how peak memory is measured on this device."""
    return {
        "kind": "meta",
        **environment(device),
        "dtype": "float32",
        "SAMPLED_MAX_DENSITY": SAMPLED_MAX_DENSITY,
        "memory_method": "cuda.max_memory_allocated"
        if device.type == "cuda"
        else "torch.profiler CPU allocator events (peak of running sum)",
    }


def _pct(value: float | None) -> str:
    return "unknown" if value is None else f"{100 * value:.0f}%"


def _fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        header_lines(
            meta,
            f"fp32; memory: {meta['memory_method']}; other processes used {_pct(meta.get('other_cpu_share'))} of the "
            "machine's CPU during the run (per configuration in the last column below; above a few % absolute times "
            "are inflated, and the interleaved rounds keep ratios fairer).",
        ),
        f"Rule constant: SAMPLED_MAX_DENSITY={meta['SAMPLED_MAX_DENSITY']} (merged is used at every density). "
        "Step = forward + backward (dx and the trainable gradients); ratios are medians over medians from this run.",
        "",
    ]
    table = []
    for r in rows:
        table.append(
            [
                f"{r['shape'][0]}×{r['shape'][1]}",
                r["tokens"],
                "—" if r["density"] is None else f"{100 * r['density']:g}%",
                r["variant"] + (f" (r={r['lora_rank']})" if r["variant"] == "lora" else ""),
                "✓" if r["auto"] else "",
                _fmt(r["fwd_ms"]),
                _fmt(r["bwd_ms"]),
                f"{_fmt(r['step_ms'])} ({_fmt(r['step_p10_ms'])}–{_fmt(r['step_p90_ms'])})",
                r["repeats"],
                _fmt(r["peak_mib"], 1),
                _fmt(r["time_vs_lora"]),
                _fmt(r["time_vs_full"]),
                _fmt(r["mem_vs_lora"]),
                _fmt(r["mem_vs_full"]),
            ]
        )
    headers = ["shape (out×in)", "tokens", "density", "variant", "auto", "fwd ms", "bwd ms", "step ms (p10–p90)"]
    headers += ["n", "peak MiB", "time ×LoRA", "time ×full", "mem ×LoRA", "mem ×full"]
    lines.append(markdown_table(headers, table, align="lrrlcrrrrrrrrr"))
    lines += ["", "Rule check (step-time ratios; < 1 means the first named option is faster):", ""]
    configs: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if r["variant"].startswith("sparse-"):
            configs.setdefault((tuple(r["shape"]), r["tokens"], r["density"]), {})[r["variant"]] = r
    table = []
    for (shape, tokens, density), by in configs.items():
        t = {name: r["step_ms"] for name, r in by.items()}
        fastest = min(t, key=t.get)
        auto = next(r["auto_choice"] for r in by.values())
        table.append(
            [
                f"{shape[0]}×{shape[1]}",
                tokens,
                f"{100 * density:g}%",
                f"{t['sparse-merged-dense'] / t['sparse-additive-dense']:.2f}",
                f"{t['sparse-merged-sampled'] / t['sparse-additive-sampled']:.2f}",
                f"{t['sparse-additive-sampled'] / t['sparse-additive-dense']:.2f}",
                f"{t['sparse-merged-sampled'] / t['sparse-merged-dense']:.2f}",
                fastest.removeprefix("sparse-"),
                auto.removeprefix("sparse-"),
                f"{t[auto] / t[fastest]:.2f}",
                _pct(next(iter(by.values()))["other_cpu_share"]),
            ]
        )
    headers = ["shape", "tokens", "density", "merged÷additive (dense grad)", "merged÷additive (sampled grad)"]
    headers += ["sampled÷dense (additive)", "sampled÷dense (merged)", "fastest sparse", "auto", "auto÷fastest"]
    lines.append(markdown_table(headers + ["others' CPU"], table, align="lrrrrrrllrr"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="SmolLM2 shapes only (skips 4096×4096 and 4096×11008)")
    parser.add_argument("--shapes", help="comma-separated out x in[:tokens], e.g. 576x576,4096x4096:2048")
    parser.add_argument(
        "--tokens",
        type=int,
        help=f"tokens for every shape (default {SMOL_TOKENS} for SmolLM2 shapes, {BIG_TOKENS} for the others)",
    )
    parser.add_argument(
        "--densities", default=",".join(map(str, DENSITIES)), help="comma-separated fractions (default %(default)s)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up steps per variant (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds at most (default %(default)s)")
    parser.add_argument("--min-repeats", type=int, default=3, help="timed rounds at least (default %(default)s)")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=8.0,
        help="seconds of timed rounds per (shape, density) after which no new round starts once --min-repeats are done (default %(default)s)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory step")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice, one per core)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per line before the tables")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.warmup < 1 or args.min_repeats < 1 or args.repeats < args.min_repeats:
        parser.error("need --warmup >= 1 and --repeats >= --min-repeats >= 1")

    device = torch.device(args.device)
    if args.shapes:
        shapes = parse_shapes(args.shapes)
    else:
        shapes = [(o, i, None) for o, i in SMOL_SHAPES + ([] if args.quick else BIG_SHAPES)]
    densities = [float(d) for d in args.densities.split(",") if d.strip()]
    if not all(0 < d <= 1 for d in densities):
        parser.error(f"--densities must be fractions in (0, 1], got {args.densities!r}")

    meta = run_meta(device)
    if args.json:
        print(json.dumps(meta), flush=True)
    rows: list[dict] = []
    started = time.perf_counter()
    whole_run = OtherLoad()
    for out_features, in_features, tokens in shapes:
        tokens = tokens or args.tokens or default_tokens((out_features, in_features))
        full = None
        for density in densities:
            new_rows, full = run_config((out_features, in_features), tokens, density, device, args, full)
            if args.json:
                for row in new_rows:
                    print(json.dumps(row), flush=True)
            rows += new_rows
            print(
                f"# {out_features}×{in_features} T={tokens} d={density:g}: done at {time.perf_counter() - started:.0f} s",
                file=sys.stderr,
                flush=True,
            )
    meta["other_cpu_share"] = whole_run.share()
    if args.json:
        print(
            json.dumps(
                {"kind": "end", "seconds": time.perf_counter() - started, "other_cpu_share": meta["other_cpu_share"]}
            )
        )
    print()
    print(markdown(meta, rows))


if __name__ == "__main__":
    main()
