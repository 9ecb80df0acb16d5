"""Whole-model training step of SmolLM2-135M-Instruct: SpIEL, SMT, SIFT vs PEFT LoRA / DoRA / SHiRA / Super-Tuning
vs full fine-tuning.

One step = forward + backward + optimizer step + zero_grad on a fixed batch (4 × 128 random token ids, seed 0,
labels = ids, the same for every method), every linear layer except `lm_head` trained (methods: see
`methods.py`). Each method runs in its own subprocess (`bench_step --method X --json`), so its peak
memory is its own; the driver runs them one after another and prints one JSON object per method, then a
markdown table with ratios against `lora-r16`, `full`, `floor` and the LoRA of equal trainable count, all
measured in that one run.

Measured per method:

* step time: median and p10/p90 over `--steps` steps after `--warmup` steps; forward / backward /
  optimizer medians too. SpIEL's optimizer step includes its prune/regrow rounds; the round's own time is
  also reported (`reselect_s`, median per round; MA runs one round in the window at the default 20 steps).
* `spiel-ag` runs with `reselection_steps=4, selection_accumulation_steps=2`, so its window holds gathering
  steps (the backward forms each layer's dense dyᵀx; the first of each period also picks top-k candidates)
  and plain ones; they get separate rows (`gathering` / `non-gathering`, times excluding the round itself).
* `smt` and `sift` choose their positions on the first warm-up step (`warmup_steps=1` / `selection_steps=1`),
  so the window measures their steady state: SMT's block GEMMs over the chosen blocks, SIFT's element indices.
* `peak_mem_mb`: peak RSS during setup + training minus the RSS after the model was loaded (and every
  weight page touched); the kernel's high-water mark is reset after loading (`/proc/self/clear_refs`), so
  loading's transient peak is not counted. `peak_abs_mb` is that peak itself. RSS includes allocator slack
  and MKL scratch; all methods are measured the same way.
* `optimizer_state_bytes`: bytes of every tensor in `optimizer.state` after the last step;
  `state_vs_adamw` divides it by 8 bytes × trainable params (torch AdamW's two fp32 moments).
* `other_load`: share of the machine other processes used while the method ran (noise indicator).

Paired mode (`--pairs`): on a shared machine whose speed drifts by ±20% between processes, the robust
ratio is A and B in one process on two model copies, stepping alternately (A B B A ...); the table gives
the median of the per-step ratios A_i/B_i with p10/p90 (AG: by step kind). `--threads 1` keeps timings sane
when other processes load the cores (two OpenMP threads then stall each other, up to 6× slower);
`--max-other-load 0.1` reruns a method whose run saw other processes use over 10% of the machine.

Usage (from the repository root):

    .venv/bin/python -m tools.benchmarks.bench_step                      # all methods, ~6-8 min on 2 idle CPU cores
    .venv/bin/python -m tools.benchmarks.bench_step --json --rounds 2 --steps 12 --warmup 2 --max-other-load 0.1
    .venv/bin/python -m tools.benchmarks.bench_step --methods none --pairs default --steps 16 --warmup 2
    .venv/bin/python -m tools.benchmarks.bench_step --quick              # smoke run: 1 warm-up + 6 steps
    .venv/bin/python -m tools.benchmarks.bench_step --methods spiel-ma,lora-r16 --steps 30 --merge earlier.jsonl
    .venv/bin/python -m tools.benchmarks.bench_step --method spiel-ma --profile --warmup 2 --steps 3   # where the time goes
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from tools.benchmarks.common import OtherLoad, environment, header_lines, markdown_table, percentile, ratio
from tools.benchmarks.methods import (
    BENCH_METHODS,
    MATCHED_LORA,
    ROOT,
    build_method,
    load_base,
    maxrss_mb,
    optimizer_state_bytes,
    peak_rss_mb,
    reset_peak,
    rss_mb,
    run_child,
    trainable_params,
)

BATCH, SEQ = 4, 128
# Overrides that put each method's steady state in the measured window: AG both gathers and not; SMT and SIFT
# finish choosing on the first warm-up step (their selection steps cost a dense per-layer gradient each).
STEP_OVERRIDES = {
    "spiel-ag": {"reselection_steps": 4, "selection_accumulation_steps": 2},
    "smt": {"warmup_steps": 1},
    "sift": {"selection_steps": 1},
}
DEFAULT_PAIRS = [
    "spiel-ma:lora-r16",
    "spiel-ma:full",
    "spiel-ag:lora-r16",
    "spiel-ma-1pct:lora-1pct",
    "sift:lora-r16",
    "smt:lora-r16",
    "spiel-ma:shira",
    "spiel-ma:supertuning",
]
TOTAL_STEPS = 1000  # the schedule's horizon: long, so the reselection rate stays near its initial 0.2
STEP_LR = {
    "spiel-ma": 1e-3,
    "spiel-ma-1pct": 1e-3,
    "spiel-ag": 1e-3,
    "smt": 1e-3,
    "sift": 1e-3,
    "full": 1e-5,
}  # others 1e-4


def _sparse_layers(model):
    from sparse_plugin import iter_sparse_layers

    return [layer for _, layer in iter_sparse_layers(model)]


def setup(method: str):
    """Load, record the RSS, build the method; returns everything a step needs."""
    torch.manual_seed(0)
    model, _ = load_base()
    gc.collect()
    rss_load = rss_mb()
    peak_reset = reset_peak()
    ids = torch.randint(model.config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    model, optimizer, info = build_method(
        model,
        method,
        lr=STEP_LR.get(method, 1e-4),
        total_steps=TOTAL_STEPS,
        sparse_overrides=STEP_OVERRIDES.get(method),
    )
    model.train()
    info.update(rss_after_load_mb=rss_load, peak_reset=peak_reset)
    if method == "floor":
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        inputs = {"inputs_embeds": embeds, "labels": ids}
    else:
        inputs = {"input_ids": ids, "labels": ids}
    return model, optimizer, inputs, info


def one_step(model, optimizer, inputs, times: dict) -> None:
    if "inputs_embeds" in inputs:
        inputs["inputs_embeds"].grad = None
    t0 = time.perf_counter()
    with torch.profiler.record_function("bench::forward"):
        loss = model(**inputs).loss
    t1 = time.perf_counter()
    with torch.profiler.record_function("bench::backward"):
        loss.backward()
    t2 = time.perf_counter()
    if optimizer is not None:
        with torch.profiler.record_function("bench::optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    t3 = time.perf_counter()
    times.update(fwd=t1 - t0, bwd=t2 - t1, opt=t3 - t2, step=t3 - t0)


class Runner:
    """One method's model, optimizer and batch, stepping and recording per-step times.

    `kinds[i]` says what recorded step i was for SpIEL-AG: "gather" or "nongather" (else None), and
    `step_ex_round[i]` is its time without the prune/regrow round run inside it.
    """

    def __init__(self, method: str):
        self.method = method
        self.model, self.optimizer, self.inputs, self.info = setup(method)
        selector = getattr(self.optimizer, "selector", None)
        self.selector = selector if selector is not None and selector.config.method == "spiel" else None
        self.round_times: list[float] = []
        if self.selector is not None:  # time each prune/regrow round inside optimizer.step()
            original = self.selector.reselect

            @functools.wraps(original)
            def timed(*a, **k):
                t = time.perf_counter()
                try:
                    return original(*a, **k)
                finally:
                    self.round_times.append(time.perf_counter() - t)

            self.selector.reselect = timed
        self.ag = self.selector is not None and self.selector.config.regrow == "ag"
        self.layers = _sparse_layers(self.model) if self.selector is not None else []
        self.samples: dict[str, list[float]] = {
            k: [] for k in ("step", "fwd", "bwd", "opt", "reselect", "gather", "gather_first", "nongather")
        }
        self.kinds: list[str | None] = []
        self.step_ex_round: list[float] = []
        self.taken = 0

    def step(self, record: bool = True) -> None:
        gathering = any(layer.grad_collector is not None for layer in self.layers)
        first = gathering and all(g.candidates is None for g in self.selector.collectors.values())
        rounds_before = len(self.round_times)
        times: dict = {}
        one_step(self.model, self.optimizer, self.inputs, times)
        self.taken += 1
        if not record:
            return
        samples = self.samples
        for key in ("step", "fwd", "bwd", "opt"):
            samples[key].append(times[key])
        round_s = sum(self.round_times[rounds_before:])
        if len(self.round_times) > rounds_before:
            samples["reselect"].append(round_s)
        self.step_ex_round.append(times["step"] - round_s)
        self.kinds.append(("gather" if gathering else "nongather") if self.ag else None)
        if self.ag:
            samples["gather" if gathering else "nongather"].append(times["step"] - round_s)
            if gathering and first:
                samples["gather_first"].append(times["step"] - round_s)

    def finish(self, warmup: int) -> None:
        """Time one round after the window if none fell in it; check the gathering count against the schedule."""
        selector = self.selector
        if selector is None:
            return
        if not self.samples["reselect"]:  # MA reselects every 20 steps
            from sparse_plugin.selection.schedule import reselection_rate

            selector.reselect(reselection_rate(self.optimizer.completed_steps, selector.config, TOTAL_STEPS))
            self.samples["reselect"].append(self.round_times[-1])
            self.info["reselect_outside_window"] = True
        if self.ag:
            from sparse_plugin.selection.schedule import is_gathering_step

            expected = sum(is_gathering_step(s, selector.config) for s in range(warmup + 1, self.taken + 1))
            if expected != len(self.samples["gather"]):
                raise RuntimeError(f"gathering steps seen {len(self.samples['gather'])} != schedule's {expected}")


def measure(method: str, warmup: int, steps: int) -> dict:
    runner = Runner(method)
    info = runner.info
    info["rss_after_setup_mb"] = rss_mb()
    for i in range(warmup + steps):
        runner.step(record=i >= warmup)
    peak = peak_rss_mb()
    runner.finish(warmup)
    model, optimizer, samples = runner.model, runner.optimizer, runner.samples
    row = {
        "method": method,
        "trainable_params": trainable_params(model),
        **stats(samples),
        "peak_mem_mb": round(peak - info["rss_after_load_mb"], 1),
        "peak_abs_mb": round(peak, 1),
        "maxrss_lifetime_mb": round(maxrss_mb(), 1),
        "setup_mem_mb": round(info.pop("rss_after_setup_mb") - info["rss_after_load_mb"], 1),
        "optimizer_state_bytes": optimizer_state_bytes(optimizer),
        "optimizer": BENCH_METHODS[method][1],
        "batch": BATCH,
        "seq": SEQ,
        "steps": steps,
        "warmup": warmup,
        "threads": torch.get_num_threads(),
        "info": info,
        "samples": {k: [round(v, 5) for v in vals] for k, vals in samples.items() if vals},
    }
    row["state_vs_adamw"] = (
        (row["optimizer_state_bytes"] / (8 * row["trainable_params"])) if row["trainable_params"] else None
    )
    return row


def paired(a: str, b: str, warmup: int, steps: int) -> dict:
    """A and B in one process on two model copies, stepping alternately (A B B A A B ...), so drift in the
    machine's speed hits both alike; the ratio is the median of per-step ratios A_i / B_i."""
    ra, rb = Runner(a), Runner(b)
    for _ in range(warmup):
        ra.step(False)
        rb.step(False)
    for i in range(steps):
        for runner in (ra, rb) if i % 2 == 0 else (rb, ra):
            runner.step()
    ratios = [x / y for x, y in zip(ra.samples["step"], rb.samples["step"])]
    row = {
        "pair": f"{a} / {b}",
        "a": a,
        "b": b,
        "steps": steps,
        "warmup": warmup,
        "threads": torch.get_num_threads(),
        "a_step_s": round(statistics.median(ra.samples["step"]), 5),
        "b_step_s": round(statistics.median(rb.samples["step"]), 5),
        "ratio": round(statistics.median(ratios), 4),
        "ratio_p10": round(percentile(ratios, 10), 4),
        "ratio_p90": round(percentile(ratios, 90), 4),
        "ratios": [round(r, 4) for r in ratios],
        # prune/regrow rounds inside the window: each costs a spike in its step, so say whether one is there
        "rounds_in_window": len(ra.samples["reselect"]) + len(rb.samples["reselect"]),
    }
    for kind in ("gather", "nongather"):
        sel = [x / y for x, y, k in zip(ra.step_ex_round, rb.samples["step"], ra.kinds) if k == kind]
        if sel:
            row[f"ratio_{kind}"] = round(statistics.median(sel), 4)
            row[f"ratio_{kind}_p10"] = round(percentile(sel, 10), 4)
            row[f"ratio_{kind}_p90"] = round(percentile(sel, 90), 4)
    return row


def stats(samples: dict[str, list[float]]) -> dict:
    """Medians (and step p10/p90) of the per-step samples, in seconds."""
    out = {}
    for key, vals in samples.items():
        if not vals:
            continue
        name = "step_time_s" if key == "step" else f"{key}_s"
        out[name] = round(statistics.median(vals), 5)
        if key in ("step", "gather", "nongather"):
            out[f"{key}_p10_s"] = round(percentile(vals, 10), 5)
            out[f"{key}_p90_s"] = round(percentile(vals, 90), 5)
    return out


# ---------------------------------------------------------------- profile


@contextlib.contextmanager
def labelled_regions():
    """Wrap our layer's pieces in `record_function` labels (this process only; the library is unchanged)."""
    from sparse_plugin import layer
    from sparse_plugin.kernels import blocks, pattern, sddmm
    from sparse_plugin.optim.sm3 import SM3
    from sparse_plugin.optim.sparse_adamw import SparseAdamW
    from sparse_plugin.selection import spiel

    def label(owner, name, tag):
        original = getattr(owner, name)

        @functools.wraps(original)
        def wrapped(*a, **k):
            with torch.profiler.record_function(tag):
                return original(*a, **k)

        setattr(owner, name, wrapped)
        return owner, name, original

    patches = [
        label(layer.SparseDeltaLinear, "_hold_delta", "sp::layer._hold_delta (rewrite W0 + Δ entries)"),
        label(pattern.SparsePattern, "matmul", "sp::pattern.matmul (CSR x·Δᵀ)"),
        label(pattern.SparsePattern, "matmul_t", "sp::pattern.matmul_t (CSR dy·Δ)"),
        label(pattern.SparsePattern, "values_grad", "sp::pattern.values_grad"),
        label(blocks.BlockPattern, "matmul", "sp::blocks.matmul (block GEMMs x·Δᵀ)"),
        label(blocks.BlockPattern, "matmul_t", "sp::blocks.matmul_t (block GEMMs dy·Δ)"),
        label(blocks.BlockPattern, "values_grad", "sp::blocks.values_grad (block GEMMs dyᵀx)"),
        label(sddmm, "values_grad_sampled", "sp::values_grad_sampled (sampled_addmm)"),
        label(sddmm, "values_grad_dense", "sp::values_grad_dense (dyᵀx + gather)"),
        label(pattern.SparsePattern, "csr", "sp::pattern.csr"),
        label(layer.SparseDeltaLinear, "pattern", "sp::layer.pattern"),
        label(layer.SparseDeltaLinear, "strategy", "sp::layer.strategy"),
        label(SM3, "_update", "sp::SM3._update"),
        label(SparseAdamW, "_update", "sp::SparseAdamW._update"),
        label(spiel.GradientGatherer, "__call__", "sp::AG gather (top-k, sums, norms)"),
        label(spiel.SpielSelector, "reselect", "sp::prune/regrow round"),
    ]
    try:
        yield
    finally:
        for owner, name, original in reversed(patches):
            setattr(owner, name, original)


def profile(method: str, warmup: int, steps: int, rows: int) -> str:
    from torch.profiler import ProfilerActivity

    with labelled_regions():
        model, optimizer, inputs, _ = setup(method)
        times: dict = {}
        for _ in range(warmup):
            one_step(model, optimizer, inputs, times)
        with torch.profiler.profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
            for _ in range(steps):
                one_step(model, optimizer, inputs, times)
    events = prof.key_averages()
    ours = [e for e in events if e.key.startswith(("sp::", "bench::"))]
    total = sum(e.cpu_time_total for e in events if e.key == "bench::forward") + sum(
        e.cpu_time_total for e in events if e.key in ("bench::backward", "bench::optimizer")
    )
    lines = [
        f"## profile of `{method}`: {steps} steps after {warmup} warm-up, per-step times",
        "",
        "Labelled regions (inclusive wall time of the region, per step):",
        "",
    ]
    table = []
    for e in sorted(ours, key=lambda e: -e.cpu_time_total):
        table.append(
            [
                e.key,
                e.count // steps,
                f"{e.cpu_time_total / steps / 1e3:.1f}",
                f"{100 * e.cpu_time_total / total:.1f}%" if total else "–",
            ]
        )
    lines.append(markdown_table(["region", "calls/step", "ms/step", "share of step"], table))
    lines += ["", "Inside each sp:: region: self time of the ops it ran (per step, top 6):", ""]
    inside: dict[str, dict[str, float]] = {}

    def walk(event, into):
        for child in event.cpu_children:
            if child.name.startswith("sp::"):
                continue  # nested labelled regions are reported on their own
            into[child.name] = into.get(child.name, 0.0) + child.self_cpu_time_total
            walk(child, into)

    for event in prof.events():
        if event.name.startswith("sp::"):
            into = inside.setdefault(event.name, {})
            into["(own python)"] = into.get("(own python)", 0.0) + event.self_cpu_time_total
            walk(event, into)
    table = []
    for region, ops in sorted(inside.items(), key=lambda kv: -sum(kv[1].values())):
        top = sorted(ops.items(), key=lambda kv: -kv[1])[:6]
        table.append([region, "; ".join(f"{name} {value / steps / 1e3:.1f}" for name, value in top)])
    lines.append(markdown_table(["region", "op: self ms/step"], table))
    lines += ["", f"Top {rows} aten ops by self CPU time (per step):", ""]
    table = []
    aten = [e for e in events if not e.key.startswith(("sp::", "bench::", "ProfilerStep"))]
    for e in sorted(aten, key=lambda e: -e.self_cpu_time_total)[:rows]:
        table.append(
            [
                e.key,
                e.count // steps,
                f"{e.self_cpu_time_total / steps / 1e3:.1f}",
                f"{100 * e.self_cpu_time_total / total:.1f}%" if total else "–",
            ]
        )
    lines.append(markdown_table(["op", "calls/step", "self ms/step", "share of step"], table))
    return "\n".join(lines)


# ---------------------------------------------------------------- driver


def merge_rounds(rows: list[dict]) -> dict:
    """One row per method from several rounds: samples pooled, memory the largest seen."""
    if len(rows) == 1:
        return rows[0]
    pooled: dict[str, list[float]] = {}
    for row in rows:
        for key, vals in row.get("samples", {}).items():
            pooled.setdefault(key, []).extend(vals)
    merged = dict(rows[-1])
    for key in [k for k in merged if k.endswith("_s")]:
        del merged[key]
    merged.update(stats(pooled))
    merged["samples"] = pooled
    for key in ("peak_mem_mb", "peak_abs_mb", "setup_mem_mb", "maxrss_lifetime_mb"):
        merged[key] = max(r[key] for r in rows)
    merged["rounds"] = len(rows)
    loads = [r["other_load"] for r in rows if r.get("other_load") is not None]
    merged["other_load"] = round(max(loads), 2) if loads else None
    return merged


def expand(rows: list[dict]) -> list[dict]:
    """Add `spiel-ag (gathering)` / `(non-gathering)` rows next to `spiel-ag`."""
    out = []
    for row in rows:
        out.append(row)
        if row.get("gather_s") is not None:
            for key, label in (("gather", "gathering"), ("nongather", "non-gathering")):
                out.append(
                    {
                        **row,
                        "method": f"{row['method']} ({label})",
                        "step_time_s": row[f"{key}_s"],
                        "step_p10_s": row[f"{key}_p10_s"],
                        "step_p90_s": row[f"{key}_p90_s"],
                        "derived": True,
                    }
                )
    return out


def markdown(env: dict, rows: list[dict], note: str) -> str:
    by = {r["method"]: r for r in rows if "error" not in r}

    def get(name, key):
        return by.get(name, {}).get(key)

    table = []
    for r in rows:
        if "error" in r:
            table.append([r["method"], "error: " + r["error"]] + [""] * 13)
            continue
        m, t = r["method"], r["step_time_s"]
        matched = MATCHED_LORA.get(m.split(" ")[0])

        def ms(v):
            return f"{1e3 * v:.0f}" if v is not None else "–"

        table.append(
            [
                m,
                f"{r['trainable_params']:,}",
                f"{ms(t)} ({ms(r['step_p10_s'])}–{ms(r['step_p90_s'])})",
                ms(r.get("fwd_s")) if not r.get("derived") else "",
                ms(r.get("bwd_s")) if not r.get("derived") else "",
                ms(r.get("opt_s")) if not r.get("derived") else "",
                ratio(t, get("lora-r16", "step_time_s")),
                ratio(t, get("full", "step_time_s")),
                ratio(t, get("floor", "step_time_s")),
                f"{ratio(t, get(matched, 'step_time_s'))} ({matched})" if matched and matched in by else "–",
            ]
            + (
                ["", "", "", "", ""]
                if r.get("derived")
                else [
                    f"{r['peak_mem_mb']:.0f}",
                    ratio(r["peak_mem_mb"], get("lora-r16", "peak_mem_mb")),
                    ratio(r["peak_mem_mb"], get("full", "peak_mem_mb")),
                    f"{r['peak_abs_mb']:.0f}",
                    f"{r['optimizer_state_bytes'] / 2**20:.2f}"
                    + (f" ({100 * r['state_vs_adamw']:.1f}%)" if r.get("state_vs_adamw") is not None else ""),
                ]
            )
        )
    headers = [
        "method",
        "trainable",
        "step ms (p10–p90)",
        "fwd ms",
        "bwd ms",
        "opt ms",
        "×LoRA-r16",
        "×full",
        "×floor",
        "×matched LoRA",
        "peak Δ MB",
        "mem ×LoRA-r16",
        "mem ×full",
        "peak abs MB",
        "opt state MiB (% of AdamW 8 B/param)",
    ]
    extra = []
    for r in rows:
        if r.get("derived") or "error" in r:
            continue
        if r.get("reselect_s") is not None:
            where = "timed once after the window" if r["info"].get("reselect_outside_window") else "in the window"
            extra.append(
                f"- `{r['method']}` prune/regrow round: median {1e3 * r['reselect_s']:.0f} ms "
                f"({len(r['samples']['reselect'])} rounds, {where})"
            )
        if r.get("gather_first_s") is not None:
            extra.append(
                f"- `{r['method']}` first gathering step of a period (top-k candidates): median "
                f"{1e3 * r['gather_first_s']:.0f} ms"
            )
        if r.get("info", {}).get("strategies"):
            extra.append(
                f"- `{r['method']}` forward {r['info']['strategies']}, values-grad path {r['info']['grad_paths']}"
            )
        if r.get("other_load") is not None and r["other_load"] > 0.1:
            extra.append(
                f"- `{r['method']}`: other processes used {100 * r['other_load']:.0f}% of the machine meanwhile"
            )
    return "\n".join([header_lines(env, note), "", markdown_table(headers, table), ""] + extra)


def pairs_markdown(env: dict, rows: list[dict], args) -> str:
    table = []
    for r in rows:
        if "error" in r:
            table.append([r["pair"], "error: " + r["error"], "", "", "", "", "", ""])
            continue

        def cell(k, r=r):
            return f"{r[k]:.2f}× ({r[k + '_p10']:.2f}–{r[k + '_p90']:.2f})" if k in r else "–"

        table.append(
            [
                r["pair"],
                f"{1e3 * r['a_step_s']:.0f}",
                f"{1e3 * r['b_step_s']:.0f}",
                cell("ratio"),
                cell("ratio_gather"),
                cell("ratio_nongather"),
                str(r.get("rounds_in_window", "–")),
                f"{100 * r['other_load']:.0f}%" if r.get("other_load") is not None else "–",
            ]
        )
    note = (
        f"Paired runs: A and B in one process on two model copies, {args.warmup} warm-up + {args.steps} steps "
        "each, alternating A B B A ...; ratio = median of per-step A/B (p10–p90). Gathering / non-gathering: "
        "A's SpIEL-AG steps of that kind, without the prune/regrow round. Rounds in window: prune/regrow rounds "
        f"inside the measured steps (torch threads: {torch.get_num_threads() if args.threads is None else args.threads})."
    )
    return "\n".join(
        [
            "",
            note,
            "",
            markdown_table(
                [
                    "A / B",
                    "A ms",
                    "B ms",
                    "A/B step",
                    "A/B gathering steps",
                    "A/B non-gathering steps",
                    "rounds in window",
                    "other load",
                ],
                table,
            ),
        ]
    )


def wait_quiet(max_share: float, limit_s: float, sample_s: float = 5.0) -> bool:
    """Sleep until other processes use at most `max_share` of the machine over `sample_s`, or `limit_s` passes."""
    deadline = time.perf_counter() + limit_s
    while time.perf_counter() < deadline:
        load = OtherLoad()
        time.sleep(sample_s)
        share = load.share()
        if share is None or share <= max_share:
            return True
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--methods", default=",".join(BENCH_METHODS), help="comma-separated (default: all, %(default)s)"
    )
    parser.add_argument("--method", help="run one method in this process (what the driver calls)")
    parser.add_argument("--steps", type=int, default=20, help="measured steps per method (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up steps (default %(default)s)")
    parser.add_argument("--quick", action="store_true", help="1 warm-up + 6 measured steps: a smoke run")
    parser.add_argument(
        "--rounds", type=int, default=1, help="passes over the methods, alternating order; samples pooled"
    )
    parser.add_argument("--threads", type=int, help="torch threads in each run (default: torch's, one per core)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per method before the table")
    parser.add_argument(
        "--max-other-load",
        type=float,
        help="rerun a method whose run saw other processes use more "
        "than this share of the machine (e.g. 0.1), after waiting for a quiet machine",
    )
    parser.add_argument(
        "--retries", type=int, default=2, help="reruns per method under --max-other-load (default %(default)s)"
    )
    parser.add_argument("--wait-quiet-s", type=float, default=300, help="longest wait for a quiet machine per retry")
    parser.add_argument(
        "--merge",
        action="append",
        default=[],
        help="JSON-lines file of an earlier --json run whose "
        "samples are pooled with this run's (e.g. to add rounds for some methods)",
    )
    parser.add_argument(
        "--pairs",
        help="also run these A:B pairs, each in one process stepping alternately "
        f"(robust ratios on a noisy machine); 'default' = {','.join(DEFAULT_PAIRS)}",
    )
    parser.add_argument("--pair", help="A,B: run one pair in this process (what the driver calls)")
    parser.add_argument("--profile", action="store_true", help="with --method: torch.profiler table of a few steps")
    parser.add_argument("--profile-rows", type=int, default=25)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup = 6, 1

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.pair:
        a, b = args.pair.split(",")
        print(json.dumps(paired(a, b, args.warmup, args.steps)))
        return 0
    if args.method:
        if args.profile:
            print(profile(args.method, args.warmup, min(args.steps, 3), args.profile_rows))
            return 0
        row = measure(args.method, args.warmup, args.steps)
        print(json.dumps(row) if args.json else json.dumps({k: v for k, v in row.items() if k != "samples"}, indent=1))
        return 0

    methods = [m.strip() for m in args.methods.split(",") if m.strip() and m.strip() != "none"]
    pairs = []
    if args.pairs:
        pairs = [tuple(p.split(":")) for p in (DEFAULT_PAIRS if args.pairs == "default" else args.pairs.split(","))]
        if any(len(p) != 2 or p[0] not in BENCH_METHODS or p[1] not in BENCH_METHODS for p in pairs):
            parser.error(f"--pairs wants A:B[,C:D...] of methods {', '.join(BENCH_METHODS)}")
    unknown = [m for m in methods if m not in BENCH_METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {', '.join(BENCH_METHODS)}")
    env = environment()
    started = time.perf_counter()
    results: dict[str, list[dict]] = {m: [] for m in methods}
    for r in range(args.rounds):
        for method in methods if r % 2 == 0 else methods[::-1]:
            child_args = ["--steps", str(args.steps), "--warmup", str(args.warmup)] + (
                ["--threads", str(args.threads)] if args.threads else []
            )
            for attempt in range(1 + args.retries):
                rows, load = run_child(__spec__.name, method, child_args)
                if args.max_other_load is None or load is None or load <= args.max_other_load or "error" in rows[-1]:
                    break
                print(
                    f"[{time.perf_counter() - started:6.0f}s] {method}: other processes used {100 * load:.0f}% of the "
                    f"machine; rerunning once it is quiet (try {attempt + 2} of {1 + args.retries})",
                    file=sys.stderr,
                    flush=True,
                )
                wait_quiet(args.max_other_load, args.wait_quiet_s)
            for row in rows:
                row["other_load"] = round(load, 2) if load is not None else None
            results[method].extend(rows)
            print(
                f"[{time.perf_counter() - started:6.0f}s] {method}: "
                + (
                    rows[-1].get("error")
                    or f"{1e3 * rows[-1]['step_time_s']:.0f} ms/step, peak Δ {rows[-1]['peak_mem_mb']:.0f} MB"
                )
                + (f", other load {100 * load:.0f}%" if load is not None else ""),
                file=sys.stderr,
                flush=True,
            )
    for path in args.merge:  # earlier runs' JSON lines: their samples are pooled with this run's
        for line in Path(path).read_text().splitlines():
            row = json.loads(line) if line.startswith("{") else None
            if row and "error" not in row and row["method"] in BENCH_METHODS:
                row.pop("env", None)
                row.pop("rounds", None)
                results.setdefault(row["method"], []).append(row)
        methods = [m for m in BENCH_METHODS if m in results]
    final = []
    for method in methods:
        errors = [r for r in results[method] if "error" in r]
        final.append(errors[0] if errors else merge_rounds(results[method]))
    pair_rows = []
    for a, b in pairs:
        child_args = ["--steps", str(args.steps), "--warmup", str(args.warmup)] + (
            ["--threads", str(args.threads)] if args.threads else []
        )
        load = OtherLoad()
        done = subprocess.run(
            [sys.executable, "-m", __spec__.name, "--pair", f"{a},{b}", *child_args],
            capture_output=True,
            text=True,
            check=False,
            cwd=ROOT,
        )
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        row = (
            json.loads(lines[-1])
            if done.returncode == 0 and lines
            else {"pair": f"{a} / {b}", "error": " | ".join(done.stderr.strip().splitlines()[-2:])[-300:]}
        )
        share = load.share()
        row["other_load"] = round(share, 2) if share is not None else None
        pair_rows.append(row)
        print(
            f"[{time.perf_counter() - started:6.0f}s] pair {a} / {b}: "
            + (row.get("error") or f"ratio {row['ratio']:.2f} ({row['ratio_p10']:.2f}-{row['ratio_p90']:.2f})"),
            file=sys.stderr,
            flush=True,
        )
    if args.json:
        for row in final + pair_rows:
            print(json.dumps({**row, "env": env}))
    note = (
        f"batch {BATCH} × {SEQ} tokens, {args.warmup} warm-up + {args.steps} measured steps per method"
        f"{f' × {args.rounds} rounds (pooled)' if args.rounds > 1 else ''}; ratios are of medians in this run; "
        f"total {time.perf_counter() - started:.0f} s"
    )
    if final:
        print(markdown(env, expand(final), note))
    if pair_rows:
        print(pairs_markdown(env, pair_rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
