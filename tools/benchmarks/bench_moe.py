"""Training step of a small Qwen3-MoE built in code, fused experts targeted: SpIEL-MA (SM3) vs PEFT LoRA with
`target_parameters` (rank chosen so the trainable count equals ours) vs full fine-tuning.

Model (default): hidden 256, 4 layers, 4 heads of 64 over 2 kv heads, 8 experts of intermediate 256, top-2, vocab
4096, transformers' `grouped_mm` experts; batch 4 × 128 random token ids (seed 0, labels = ids), fp32 on CPU. The
targets are the fused `mlp.experts.gate_up_proj` [E, 2i, h] and `mlp.experts.down_proj` [E, h, i] of every layer:
ours with `SparseConfig(target_parameters=..., lora_rank_equivalent=r)`, LoRA with `LoraConfig(r=r,
target_parameters=...)` (one A, B pair per expert: r·E·(in + out) per tensor, the same count), full fine-tuning
every parameter with torch's AdamW.

Timing is paired: the three models live in one process and step in turn, the order rotating every step (A B C,
B C A, C A B, ...), so the machine's drift (it is shared with other jobs) hits all alike; a ratio is the median of
the per-step ratios with p10/p90. One step = forward + backward + optimizer step + zero_grad. SpIEL-MA's prune/regrow
rounds (every `reselection_steps`, 20 by default) fall inside the window when it is long enough; the row says how
many. `--memory` also measures each method's peak RSS over the loaded model in its own subprocess (glibc's mmap
threshold fixed at 128 KiB, so freed buffers leave RSS), for `--memory-steps` steps.

Usage (from the repository root):

    .venv/bin/python -m tools.benchmarks.bench_moe                     # 20 steps after 3 warm-up, paired
    .venv/bin/python -m tools.benchmarks.bench_moe --memory --json     # + peak RSS per method, JSON lines too
    .venv/bin/python -m tools.benchmarks.bench_moe --threads 1 --steps 40 --experts-impl batched_mm
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from tools.benchmarks.common import OtherLoad, environment, header_lines, markdown_table, percentile

METHODS = ("spiel-ma", "lora", "full")
LABELS = {"spiel-ma": "SpIEL-MA (SM3)", "lora": "PEFT LoRA (target_parameters)", "full": "full FT (AdamW)"}
TARGETS = ["experts.gate_up_proj", "experts.down_proj"]
DEFAULTS = {
    "hidden": 256,
    "layers": 4,
    "heads": 4,
    "kv_heads": 2,
    "head_dim": 64,
    "experts": 8,
    "moe_intermediate": 256,
    "top_k": 2,
    "vocab": 4096,
}


def build_model(sizes: dict, experts_impl: str = "grouped_mm", seed: int = 0):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    config = Qwen3MoeConfig(
        vocab_size=sizes["vocab"],
        hidden_size=sizes["hidden"],
        intermediate_size=4 * sizes["hidden"],
        moe_intermediate_size=sizes["moe_intermediate"],
        num_hidden_layers=sizes["layers"],
        num_attention_heads=sizes["heads"],
        num_key_value_heads=sizes["kv_heads"],
        head_dim=sizes["head_dim"],
        num_experts=sizes["experts"],
        num_experts_per_tok=sizes["top_k"],
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    model = Qwen3MoeForCausalLM(config).train()
    model.set_experts_implementation(experts_impl)
    return model


def build_method(model, method: str, rank: int, total_steps: int):
    """`method` on `model`: (trainable model, optimizer)."""
    if method == "spiel-ma":
        import sparse_plugin

        config = sparse_plugin.SparseConfig(lora_rank_equivalent=rank, target_parameters=TARGETS)
        model = sparse_plugin.prepare_model(model, config)
        return model, sparse_plugin.SM3(model, lr=1e-3, total_steps=total_steps)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_parameters=TARGETS))
    elif method == "full":
        model.requires_grad_(True)
    else:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class Stepper:
    def __init__(self, method: str, sizes: dict, args):
        self.method = method
        self.model, self.optimizer = build_method(
            build_model(sizes, args.experts_impl), method, args.rank, args.warmup + args.steps
        )
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(sizes["vocab"], (args.batch, args.seq), generator=gen)
        self.times: list[float] = []
        self.rounds = 0
        selector = getattr(self.optimizer, "selector", None)
        if selector is not None:  # count the prune/regrow rounds that fall in the timed window
            original = selector.reselect

            def counted(*a, **k):
                self.rounds += 1
                return original(*a, **k)

            selector.reselect = counted

    def step(self, record: bool = True) -> None:
        start = time.perf_counter()
        self.model(input_ids=self.ids, labels=self.ids).loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if record:
            self.times.append(time.perf_counter() - start)


def paired(args, sizes: dict) -> dict:
    """All methods in one process, stepping in a rotating order; per-step ratios against each other."""
    steppers = [Stepper(m, sizes, args) for m in args.methods]
    for _ in range(args.warmup):
        for s in steppers:
            s.step(record=False)
    for s in steppers:
        s.rounds = 0
    load = OtherLoad()
    for i in range(args.steps):
        k = i % len(steppers)
        for s in steppers[k:] + steppers[:k]:
            s.step()
    by = {s.method: s for s in steppers}
    result = {
        "methods": {
            s.method: {
                "trainable": trainable(s.model),
                "step_s": round(statistics.median(s.times), 5),
                "rounds_in_window": s.rounds,
            }
            for s in steppers
        },
        "ratios": {},
        "steps": args.steps,
        "warmup": args.warmup,
        "threads": torch.get_num_threads(),
        "other_load": load.share(),
    }
    for a, b in (("spiel-ma", "lora"), ("spiel-ma", "full"), ("lora", "full")):
        if a in by and b in by:
            ratios = [x / y for x, y in zip(by[a].times, by[b].times)]
            result["ratios"][f"{a} / {b}"] = {
                "median": round(statistics.median(ratios), 4),
                "p10": round(percentile(ratios, 10), 4),
                "p90": round(percentile(ratios, 90), 4),
            }
    return result


# ---------------------------------------------------------------- peak memory, one subprocess per method


def _status_mb(key: str) -> float:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(key))
    return int(line.split()[1]) / 1024


def memory_child(method: str, args, sizes: dict) -> dict:
    """In the subprocess: warm up on a 1-layer copy (imports, code pages, thread pools), load the model, reset the
    RSS high-water mark, build the method and train `--memory-steps` steps; the peak over the loaded model."""
    tiny = dict(sizes, layers=1, vocab=256)
    warm = Stepper(method, tiny, args)
    warm.step(record=False)
    del warm
    gc.collect()
    model = build_model(sizes, args.experts_impl)
    start = _status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    model, optimizer = build_method(model, method, args.rank, args.memory_steps)
    ids = torch.randint(sizes["vocab"], (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    for _ in range(args.memory_steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"method": method, "peak_mem_mb": round(_status_mb("VmHWM") - start, 1)}


def memory(args, argv: list[str]) -> dict[str, float]:
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "131072"}
    out = {}
    for method in args.methods:
        command = [sys.executable, "-m", "tools.benchmarks.bench_moe", *argv, "--memory-child", method]
        root = Path(__file__).resolve().parents[2]
        done = subprocess.run(command, capture_output=True, text=True, cwd=root, env=env, check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode or not lines:
            raise RuntimeError(f"memory run of {method} failed: {done.stderr.strip()[-600:]}")
        out[method] = json.loads(lines[-1])["peak_mem_mb"]
    return out


# ---------------------------------------------------------------- CLI


def markdown(env: dict, result: dict, peaks: dict | None, note: str) -> str:
    rows = []
    for method, row in result["methods"].items():
        cells = [LABELS[method], f"{row['trainable']:,}", f"{1000 * row['step_s']:.1f}", row["rounds_in_window"]]
        rows.append(cells + ([f"{peaks[method]:.0f}"] if peaks else []))
    headers = ["method", "trainable", "step ms (median)", "MA rounds in window"] + (["peak MiB"] if peaks else [])
    table = markdown_table(headers, rows, align="lrrr" + ("r" if peaks else ""))
    pairs = [[pair, f"{r['median']:.2f}×", f"{r['p10']:.2f}–{r['p90']:.2f}"] for pair, r in result["ratios"].items()]
    ratio_table = markdown_table(["paired step ratio", "median", "p10–p90"], pairs, align="lrr")
    return f"{header_lines(env, note)}\n\n{table}\n\n{ratio_table}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, value in DEFAULTS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=value)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank = our lora_rank_equivalent (equal counts)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--experts-impl", default="grouped_mm", choices=["grouped_mm", "batched_mm", "eager"])
    parser.add_argument("--memory", action="store_true", help="also peak RSS per method, one subprocess each")
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        parser.error(f"unknown --methods {bad}; choose from {', '.join(METHODS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = {name: getattr(args, name) for name in DEFAULTS}
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args, sizes)))
        return 0
    result = paired(args, sizes)
    peaks = memory(args, [a for a in argv if a not in ("--memory", "--json")]) if args.memory else None
    env = environment()
    if args.json:
        print(json.dumps({**result, "peak_mem_mb": peaks, "sizes": sizes, "batch": args.batch, "seq": args.seq}))
    note = (
        f"Qwen3-MoE in code: hidden {sizes['hidden']}, {sizes['layers']} layers, {sizes['experts']} experts of "
        f"{sizes['moe_intermediate']}, top-{sizes['top_k']}, vocab {sizes['vocab']}; batch {args.batch} × "
        f"{args.seq}; {args.experts_impl} experts, fused expert tensors targeted (r = {args.rank}); "
        f"{args.steps} paired steps after {args.warmup} warm-up, rotating order; other load "
        f"{result['other_load'] if result['other_load'] is None else round(result['other_load'], 2)}"
    )
    print(markdown(env, result, peaks, note))
    return 0


if __name__ == "__main__":
    sys.exit(main())
