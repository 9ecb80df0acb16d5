"""Benchmark the training-path kernels against the torch paths they replace, all in one run on one machine.

Values' gradient (SDDMM: Σ_t dy[t, i]·x[t, j] at k = density·out·in sorted positions, T tokens):

* `dense_grad`: dyᵀx alone, the weight gradient full fine-tuning pays; the floor of any dense path.
* `dense_gather`: dyᵀx, then gathered at the positions (`values_grad_dense`, the reference).
* `sampled`: `torch.sparse.sampled_addmm` (`values_grad_sampled`, the CPU path below 5% density).
* `triton`: `values_grad_triton` (CUDA only), what `grad_path_rule` picks on CUDA below `TRITON_MAX_DENSITY`.

Merged weight (W = W0.to(dtype) + scatter(Δ), built for each merged forward and again in backward):

* `copy`: `W0.to(dtype, copy=True)` alone, the memory-bound floor.
* `torch`: `merged_weight_reference` (copy + torch index scatter, the CPU path).
* `copy_scatter`: copy + the Triton scatter kernel, the CUDA path before the fused kernel (CUDA only).
* `fused`: `merged_weight` with the fused Triton kernel (CUDA only).
  GB/s counts the copy's bytes (read W0, write W) over the time, so it compares with the device bandwidth
  (`meta`: the peak from the device properties where torch exposes them, and a measured copy).

Timing: a warm-up call per variant (it also compiles the Triton kernels), then rounds in which every
variant runs once in a shuffled order (load from neighbours spreads over all of them); medians and
p10/p90 per call, CUDA synchronised around each call. On CUDA, `peak_mib` is the memory allocated by one
call above what existed before it (the dense paths allocate out × in; Triton only transposed token chunks).

Usage (from the repository root):

    .venv/bin/python -m tools.benchmarks.bench_kernels --quick            # CPU: ~20 s; CUDA: bf16, 2k and 8k tokens
    .venv/bin/python -m tools.benchmarks.bench_kernels --json             # CUDA: 4096×4096 and 4096×11008, 0.5-5%, 2k-16k
    .venv/bin/python -m tools.benchmarks.bench_kernels --shapes 4096x4096 --tokens 4096 --densities 0.01 --dtypes bf16

On CPU only the torch paths run (Triton kernels need CUDA; the interpreter is for tests, not timing), at
smaller default sizes (1024×1024 and 1024×2752, i.e. the Llama shapes / 4) so a run takes about a minute.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch

from sparse_plugin.kernels._triton import triton
from sparse_plugin.kernels.merged_weight import merged_weight, merged_weight_reference
from sparse_plugin.kernels.pattern import SparsePattern
from sparse_plugin.kernels.scatter import scatter_add_
from sparse_plugin.kernels.sddmm import (
    TRITON_MAX_DENSITY,
    grad_path_rule,
    values_grad_dense,
    values_grad_sampled,
    values_grad_triton,
)
from sparse_plugin.model import random_indices
from tools.benchmarks.common import (
    OtherLoad,
    environment,
    header_lines,
    interleaved_rounds,
    markdown_table,
    percentile,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DENSITIES = [0.005, 0.01, 0.02, 0.05]
# (shapes, tokens, dtypes) per device, full and --quick.
DEFAULTS = {
    "cuda": ([(4096, 4096), (4096, 11008)], [2048, 8192, 16384], ["bf16", "fp32"]),
    "cpu": ([(1024, 1024), (1024, 2752)], [512, 2048], ["fp32"]),
}
QUICK = {
    "cuda": ([(4096, 4096), (4096, 11008)], [2048, 8192], ["bf16"]),
    "cpu": ([(1024, 1024)], [512, 2048], ["fp32"]),
}
MIB = 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mib(call: Callable[[], object], device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    call()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / MIB


def time_variants(calls: dict[str, Callable[[], object]], device: torch.device, args, seed: int) -> dict[str, dict]:
    """Warm-up (and peak memory) per variant, then interleaved rounds; per-call statistics in ms."""
    peaks = {}
    for name, call in calls.items():
        call()
        peaks[name] = _peak_mib(call, device)
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for name in interleaved_rounds(list(calls), args.repeats, args.min_repeats, args.budget_s, seed):
        _sync(device)
        t0 = time.perf_counter()
        calls[name]()
        _sync(device)
        samples[name].append(1e3 * (time.perf_counter() - t0))
    return {
        name: {
            "ms": statistics.median(s),
            "p10_ms": percentile(s, 10),
            "p90_ms": percentile(s, 90),
            "repeats": len(s),
            "peak_mib": peaks[name],
        }
        for name, s in samples.items()
    }


def _pattern(shape: tuple[int, int], density: float, device: torch.device, seed: int) -> SparsePattern:
    count = max(1, round(density * shape[0] * shape[1]))
    indices = random_indices(shape[0] * shape[1], count, torch.Generator().manual_seed(seed))
    return SparsePattern(indices.to(device), shape)


def sddmm_rows(shape, tokens, density, dtype_name, device, args) -> list[dict]:
    """Every values'-gradient variant at one (shape, tokens, density, dtype)."""
    dtype = DTYPES[dtype_name]
    seed = shape[0] * 31 + shape[1] + tokens
    pattern = _pattern(shape, density, device, seed)
    generator = torch.Generator(device=device).manual_seed(seed)
    dy = torch.randn(tokens, shape[0], device=device, generator=generator).to(dtype)
    x = torch.randn(tokens, shape[1], device=device, generator=generator).to(dtype)
    calls = {
        "dense_grad": lambda: dy.t() @ x,
        "dense_gather": lambda: values_grad_dense(dy, x, pattern.indices),
        "sampled": lambda: values_grad_sampled(dy, x, pattern),
    }
    if device.type == "cuda" and triton is not None:
        calls["triton"] = lambda: values_grad_triton(dy, x, pattern)
    stats = time_variants(calls, device, args, seed)
    common = {
        "kind": "sddmm",
        "shape": list(shape),
        "tokens": tokens,
        "density": density,
        "dtype": dtype_name,
        "k": pattern.indices.numel(),
        "rule": grad_path_rule(density, device),
    }
    return [
        {**common, "variant": name, **s, "vs_dense_grad": s["ms"] / stats["dense_grad"]["ms"]}
        for name, s in stats.items()
    ]


def merged_rows(shape, density, dtype_name, device, args) -> list[dict]:
    """Every merged-weight variant at one (shape, density, dtype); W0 is in the same dtype as W."""
    dtype = DTYPES[dtype_name]
    seed = shape[0] * 31 + shape[1]
    pattern = _pattern(shape, density, device, seed)
    base = torch.randn(shape, device=device).to(dtype)
    values = torch.randn(pattern.indices.numel(), device=device) * 1e-3
    calls = {
        "copy": lambda: base.to(dtype, copy=True),
        "torch": lambda: merged_weight_reference(base, values, pattern, dtype),
    }
    if device.type == "cuda" and triton is not None:
        calls["copy_scatter"] = lambda: scatter_add_(
            base.to(dtype, copy=True), pattern.indices, values, backend="triton"
        )
        calls["fused"] = lambda: merged_weight(base, values, pattern, dtype, backend="triton")
    stats = time_variants(calls, device, args, seed)
    moved = 2 * base.numel() * base.element_size()  # read W0, write W
    common = {
        "kind": "merged",
        "shape": list(shape),
        "density": density,
        "dtype": dtype_name,
        "k": pattern.indices.numel(),
    }
    return [
        {**common, "variant": name, **s, "GB_per_s": moved / 1e6 / s["ms"], "vs_copy": s["ms"] / stats["copy"]["ms"]}
        for name, s in stats.items()
    ]


def device_bandwidth(device: torch.device) -> dict:
    """Peak memory bandwidth from the device properties (where this torch exposes clock and bus width) and a
    measured device-to-device copy of 1 GiB (256 MiB on CPU), both in GB/s (10^9 bytes)."""
    peak = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        clock_khz, bus_bits = getattr(props, "memory_clock_rate", None), getattr(props, "memory_bus_width", None)
        if clock_khz and bus_bits:
            peak = 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9  # double data rate
    numel = (2**30 if device.type == "cuda" else 2**28) // 4
    src = torch.ones(numel, device=device)
    dst = torch.empty_like(src)
    seconds = []
    for _ in range(5):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        seconds.append(time.perf_counter() - t0)
    return {"peak_GB_per_s": peak, "copy_GB_per_s": 2 * src.numel() * 4 / 1e9 / min(seconds[1:])}


def run_meta(device: torch.device) -> dict:
    """`environment()` plus what the kernels' speed depends on: the GPU's cache and SMs, and the bandwidth."""
    extra = {}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        extra = {"l2_mib": props.L2_cache_size / MIB, "sms": props.multi_processor_count}
    return {
        "kind": "meta",
        **environment(device),
        **extra,
        "TRITON_MAX_DENSITY": TRITON_MAX_DENSITY,
        **device_bandwidth(device),
    }


def _ratio(a: dict | None, b: dict | None) -> str:
    return "–" if a is None or b is None else f"{a['ms'] / b['ms']:.2f}"


def _ms(row: dict | None) -> str:
    return "–" if row is None else f"{row['ms']:.3f} ({row['p10_ms']:.3f}–{row['p90_ms']:.3f})"


def crossover(rows: list[dict]) -> dict[str, float | None]:
    """Per dtype, the largest density at which Triton beat `dense_grad` at every shape and token count."""
    by = {}
    for r in rows:
        by.setdefault((r["dtype"], r["density"]), {}).setdefault((tuple(r["shape"]), r["tokens"]), {})[
            r["variant"]
        ] = r["ms"]
    result: dict[str, float | None] = {}
    for (dtype, density), configs in sorted(by.items()):
        wins = all("triton" in c and c["triton"] < c["dense_grad"] for c in configs.values())
        result.setdefault(dtype, None)
        if wins and (result[dtype] is None or density > result[dtype]):
            result[dtype] = density
    return result


def markdown(meta: dict, sddmm: list[dict], merged: list[dict]) -> str:
    bandwidth = f"copy {meta['copy_GB_per_s']:.0f} GB/s measured" + (
        f", {meta['peak_GB_per_s']:.0f} GB/s peak" if meta.get("peak_GB_per_s") else ""
    )
    others = meta.get("other_cpu_share")
    lines = [
        header_lines(
            meta,
            f"{bandwidth}; other processes used {'an unknown share' if others is None else f'{100 * others:.0f}%'} "
            "of the CPU. Times: median ms per call (p10–p90).",
        )
    ]
    if meta["device"] == "cpu":
        lines.append(
            "Triton kernels need CUDA: only the torch paths ran here (tools/gpu_check.sh runs the rest on a GPU)."
        )
    lines += ["", "Values' gradient (SDDMM); ratios < 1: faster than full fine-tuning's dense dyᵀx.", ""]
    table = []
    groups: dict[tuple, dict[str, dict]] = {}
    for r in sddmm:
        groups.setdefault((tuple(r["shape"]), r["tokens"], r["density"], r["dtype"], r["rule"]), {})[r["variant"]] = r
    for (shape, tokens, density, dtype, rule), v in groups.items():
        best_torch = min((v[n] for n in ("dense_gather", "sampled")), key=lambda r: r["ms"])
        table.append(
            [
                f"{shape[0]}×{shape[1]}",
                tokens,
                f"{100 * density:g}%",
                dtype,
                _ms(v["dense_grad"]),
                _ms(v["dense_gather"]),
                _ms(v["sampled"]),
                _ms(v.get("triton")),
                _ratio(v["sampled"], v["dense_grad"]),
                _ratio(v.get("triton"), v["dense_grad"]),
                _ratio(v.get("triton"), best_torch),
                rule,
            ]
        )
    lines.append(
        markdown_table(
            [
                "shape",
                "tokens",
                "density",
                "dtype",
                "dense dyᵀx",
                "dyᵀx + gather",
                "sampled_addmm",
                "triton",
                "sampled ÷ dyᵀx",
                "triton ÷ dyᵀx",
                "triton ÷ best torch",
                "rule picks",
            ],
            table,
        )
    )
    if any(r["variant"] == "triton" for r in sddmm):
        found = ", ".join(f"{d}: {'none' if c is None else f'{100 * c:g}%'}" for d, c in crossover(sddmm).items())
        lines += [
            "",
            f"Largest density where Triton beat dense dyᵀx at every shape and token count: {found} "
            f"(TRITON_MAX_DENSITY = {100 * TRITON_MAX_DENSITY:g}%).",
        ]
    lines += ["", "Merged weight W0.to(dtype) + scatter(Δ); GB/s counts reading W0 and writing W once.", ""]
    table = []
    groups = {}
    for r in merged:
        groups.setdefault((tuple(r["shape"]), r["density"], r["dtype"]), {})[r["variant"]] = r
    for (shape, density, dtype), v in groups.items():
        fused = v.get("fused")
        table.append(
            [
                f"{shape[0]}×{shape[1]}",
                f"{100 * density:g}%",
                dtype,
                _ms(v["copy"]),
                _ms(v["torch"]),
                _ms(v.get("copy_scatter")),
                _ms(fused),
                _ratio(fused, v.get("copy_scatter")),
                _ratio(fused, v["copy"]),
                f"{v['copy']['GB_per_s']:.0f}",
                "–" if fused is None else f"{fused['GB_per_s']:.0f}",
            ]
        )
    lines.append(
        markdown_table(
            [
                "shape",
                "density",
                "dtype",
                "copy",
                "torch copy+scatter",
                "copy+Triton scatter",
                "fused",
                "fused ÷ copy+scatter",
                "fused ÷ copy",
                "copy GB/s",
                "fused GB/s",
            ],
            table,
        )
    )
    return "\n".join(lines)


def parse_shapes(text: str) -> list[tuple[int, int]]:
    try:
        return [
            tuple(int(d) for d in item.lower().replace("×", "x").split("x"))
            for item in text.split(",")
            if item.strip()
        ]
    except ValueError:
        raise SystemExit(
            f"--shapes: cannot read {text!r}; write out x in, comma-separated, e.g. 4096x4096,4096x11008"
        ) from None


def _csv(text: str, kind=float) -> list:
    return [kind(item) for item in text.split(",") if item.strip()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument(
        "--quick", action="store_true", help="fewer sizes: CUDA bf16 at 2k/8k tokens; CPU 1024×1024 only"
    )
    parser.add_argument("--shapes", help="comma-separated out x in (default: per device, see the module docstring)")
    parser.add_argument("--tokens", help="comma-separated token counts for the SDDMM")
    parser.add_argument(
        "--densities", default=",".join(map(str, DENSITIES)), help="comma-separated fractions (default %(default)s)"
    )
    parser.add_argument("--dtypes", help=f"comma-separated, from {', '.join(DTYPES)}")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds at most (default %(default)s)")
    parser.add_argument("--min-repeats", type=int, default=3, help="timed rounds at least (default %(default)s)")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=2.0,
        help="seconds of rounds per configuration, after which no new round starts once --min-repeats are done (default %(default)s)",
    )
    parser.add_argument("--skip-merged", action="store_true", help="only the SDDMM")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per line before the tables")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.min_repeats < 1 or args.repeats < args.min_repeats:
        parser.error("need --repeats >= --min-repeats >= 1")
    device = torch.device(args.device)
    shapes, tokens, dtypes = (QUICK if args.quick else DEFAULTS)[device.type]
    shapes = parse_shapes(args.shapes) if args.shapes else shapes
    tokens = _csv(args.tokens, int) if args.tokens else tokens
    dtypes = _csv(args.dtypes, str) if args.dtypes else dtypes
    densities = _csv(args.densities)
    if unknown := set(dtypes) - set(DTYPES):
        parser.error(f"--dtypes: unknown {sorted(unknown)}; choose from {', '.join(DTYPES)}")
    if not all(0 < d <= 1 for d in densities):
        parser.error(f"--densities must be fractions in (0, 1], got {args.densities!r}")

    meta = run_meta(device)
    if args.json:
        print(json.dumps(meta), flush=True)
    neighbours, started = OtherLoad(), time.perf_counter()
    sddmm, merged = [], []
    for shape in shapes:
        for dtype in dtypes:
            for density in densities:
                for count in tokens:
                    sddmm += _emit(sddmm_rows(shape, count, density, dtype, device, args), args)
                if not args.skip_merged:
                    merged += _emit(merged_rows(shape, density, dtype, device, args), args)
                done = f"{time.perf_counter() - started:.0f} s"
                print(f"# {shape[0]}×{shape[1]} {dtype} d={density:g}: done at {done}", file=sys.stderr, flush=True)
    meta["other_cpu_share"] = neighbours.share()
    if args.json:
        print(
            json.dumps(
                {
                    "kind": "end",
                    "seconds": time.perf_counter() - started,
                    "other_cpu_share": meta["other_cpu_share"],
                    "triton_crossover": crossover(sddmm),
                }
            )
        )
    print()
    print(markdown(meta, sddmm, merged))


def _emit(rows: list[dict], args) -> list[dict]:
    if args.json:
        for row in rows:
            print(json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    main()
