"""Held-out loss after equal steps: SpIEL vs PEFT LoRA / DoRA / SHiRA vs full fine-tuning on WordNet glosses.

Every method (see `bench_common.py`; `floor` has nothing to train) fine-tunes SmolLM2-135M-Instruct for the
same `--steps` optimizer steps (default 60) of batch 8 from the WordNet "define the word" train split, in one
fixed order (seed 0), chat-formatted by `demo.encode` / `demo.collate` (answer tokens only are learned,
max 96 tokens). Schedule for all: linear warm-up over the first 10% of steps, then linear decay to 0;
gradient-norm clipping at 1.0. SpIEL keeps its defaults (prune/regrow every 20 steps; AG gathers over the
5 steps before each round). Held-out loss = token-weighted mean cross-entropy over a fixed sample of 128
held-out pairs (`random.Random(0).sample`, as in demo.py, whose words never occur in train), measured
right after the method is set up ("before": every adapter starts as the identity, so this is the base
model's loss and a check of that) and after training.

Each run is its own subprocess (`bench_quality.py --method X --lr LR --json`). Without `--sweep` each
method runs at its default learning rate; with `--sweep` at each rate of its grid, and the table shows
the best (lowest held-out loss after) with every rate's result beside it. Grids (default in brackets),
centred on the best rate of a wider sweep at 60 steps (2026-11, SmolLM2, batch 8; tried: LoRA r16 5e-4..4e-3,
SM3 2e-3..2e-2, SparseAdamW 5e-4..5e-3, full 5e-5..2e-4, SHiRA 1e-3..3e-3, DoRA 5e-4..2e-3):

    lora-r16, dora-r16, lora-1pct   1e-3, [2e-3], 4e-3       (torch AdamW, alpha = 2r)
    shira                           1e-3, [3e-3], 1e-2       (torch AdamW)
    spiel-ma, spiel-ma-1pct         5e-3, [1e-2], 2e-2       (SM3)
    spiel-ag                        5e-4, [1e-3], 2e-3       (SparseAdamW)
    full                            5e-5, [1e-4], 2e-4       (torch AdamW)

Usage (from the repository root):

    .venv/bin/python tools/bench_quality.py                     # default rates, ~20 min on 2 CPU cores
    .venv/bin/python tools/bench_quality.py --sweep --json --jobs 2 --threads 1   # 3 rates per method, ~1 h
    .venv/bin/python tools/bench_quality.py --methods "" --merge a.jsonl --merge b.jsonl   # table of earlier runs
    .venv/bin/python tools/bench_quality.py --methods spiel-ma,lora-r16 --steps 100 --lrs spiel-ma=3e-3,4e-3
    .venv/bin/python tools/bench_quality.py --quick             # 6 steps, 32 held-out pairs: a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (  # noqa: E402
    METHODS,
    build_method,
    environment,
    header_lines,
    load_base,
    markdown_table,
    optimizer_state_bytes,
    ratio,
    run_child,
    trainable_params,
)

BATCH = 8
EVAL_BATCH = 16
MAX_LENGTH = 96
SEED = 0
GRIDS = {
    "lora-r16": (1e-3, 2e-3, 4e-3),
    "dora-r16": (1e-3, 2e-3, 4e-3),
    "lora-1pct": (1e-3, 2e-3, 4e-3),
    "shira": (1e-3, 3e-3, 1e-2),
    "spiel-ma": (5e-3, 1e-2, 2e-2),
    "spiel-ma-1pct": (5e-3, 1e-2, 2e-2),
    "spiel-ag": (5e-4, 1e-3, 2e-3),
    "smt": (2.5e-4, 5e-4, 1e-3),
    "sift": (2.5e-4, 5e-4, 1e-3),
    "full": (5e-5, 1e-4, 2e-4),
}
DEFAULT_LR = {m: grid[1] for m, grid in GRIDS.items()}
QUALITY_METHODS = list(GRIDS)


@torch.no_grad()
def heldout_loss(model, tokenizer, pairs: list[dict]) -> float:
    """Token-weighted mean cross-entropy of the answer tokens (labels != -100) over `pairs`."""
    from demo import collate

    was_training = model.training
    model.eval()
    total = count = 0.0
    for start in range(0, len(pairs), EVAL_BATCH):
        batch = collate(tokenizer, pairs[start:start + EVAL_BATCH], MAX_LENGTH)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                                 ignore_index=-100, reduction="sum")
        total += float(loss)
        count += int((labels != -100).sum())
    model.train(was_training)
    return total / count


def schedule(steps: int):
    """Linear warm-up over the first 10% of steps (at least one), then linear decay to 0."""
    warmup = max(1, steps // 10)

    def factor(step: int) -> float:  # step = optimizer steps already taken
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))

    return factor


def train(method: str, lr: float, steps: int, heldout_n: int) -> dict:
    from corpora.wordnet import load_pairs
    from demo import collate

    started = time.perf_counter()
    torch.manual_seed(SEED)
    model, tokenizer = load_base()
    train_pairs = load_pairs("train")
    order = random.Random(SEED).sample(range(len(train_pairs)), steps * BATCH)
    heldout = random.Random(SEED).sample(load_pairs("test"), heldout_n)
    model, optimizer, info = build_method(model, method, lr=lr, total_steps=steps)
    model.train()
    before = heldout_loss(model, tokenizer, heldout)
    params = [p for p in model.parameters() if p.requires_grad]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(steps))
    losses = []
    train_started = time.perf_counter()
    for step in range(steps):
        pairs = [train_pairs[i] for i in order[step * BATCH:(step + 1) * BATCH]]
        loss = model(**collate(tokenizer, pairs, MAX_LENGTH)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
        if not math.isfinite(losses[-1]):
            break
    train_seconds = time.perf_counter() - train_started
    after = heldout_loss(model, tokenizer, heldout)
    selector = getattr(optimizer, "selector", None)
    return {
        "method": method,
        "lr": lr,
        "heldout_loss_before": round(before, 5),
        "heldout_loss_after": round(after, 5),
        "train_loss_last10": round(sum(losses[-10:]) / len(losses[-10:]), 5),
        "trainable_params": trainable_params(model),
        "optimizer_state_bytes": optimizer_state_bytes(optimizer),
        "steps": len(losses),
        "batch": BATCH,
        "heldout_pairs": heldout_n,
        "seconds": round(time.perf_counter() - started, 1),
        "train_seconds": round(train_seconds, 1),
        "info": {**info, **({"last_round": selector.last_round} if selector is not None else {})},
    }


def markdown(env: dict, runs: list[dict], note: str) -> str:
    best: dict[str, dict] = {}
    tried: dict[str, list[str]] = {}
    errors = []
    for r in runs:
        if "error" in r:
            errors.append(f"- `{r['method']}` lr {r.get('lr')}: {r['error']}")
            continue
        tried.setdefault(r["method"], []).append(f"{r['lr']:g}: {r['heldout_loss_after']:.4f}")
        if r["method"] not in best or r["heldout_loss_after"] < best[r["method"]]["heldout_loss_after"]:
            best[r["method"]] = r
    lora = best.get("lora-r16", {}).get("heldout_loss_after")
    full = best.get("full", {}).get("heldout_loss_after")
    rows = []
    for m, r in best.items():
        after = r["heldout_loss_after"]
        rows.append([m, f"{r['trainable_params']:,}", f"{r['lr']:g}", f"{r['heldout_loss_before']:.4f}", f"{after:.4f}",
                     f"{after - r['heldout_loss_before']:+.4f}",
                     f"{after - lora:+.4f}" if lora is not None else "–", f"{after - full:+.4f}" if full is not None else "–",
                     f"{r['train_loss_last10']:.3f}", f"{r['train_seconds']:.0f}", "; ".join(tried[m])])
    headers = ["method", "trainable", "best lr", "held-out before", "held-out after", "Δ", "after − LoRA-r16",
               "after − full", "train loss (last 10)", "train s", "lr: held-out after (all tried)"]
    return "\n".join([header_lines(env, note), "", markdown_table(headers, rows)] + ([""] + errors if errors else []))


def parse_lrs(items: list[str]) -> dict[str, list[float]]:
    out = {}
    for item in items:
        method, _, values = item.partition("=")
        if method not in GRIDS or not values:
            raise SystemExit(f"--lrs wants METHOD=lr[,lr...] with METHOD in {', '.join(GRIDS)}; got {item!r}")
        out[method] = [float(v) for v in values.split(",")]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(QUALITY_METHODS), help="comma-separated (default %(default)s)")
    parser.add_argument("--method", help="run one method in this process (what the driver calls)")
    parser.add_argument("--lr", type=float, help="with --method: its learning rate (default: the grid's middle)")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run (default %(default)s)")
    parser.add_argument("--heldout", type=int, default=128, help="held-out pairs (default %(default)s)")
    parser.add_argument("--sweep", action="store_true", help="run every rate of each method's grid, report the best")
    parser.add_argument("--lrs", action="append", default=[], help="METHOD=lr,lr,...: rates to run for METHOD (repeatable)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (losses do not depend on it; use with --threads 1)")
    parser.add_argument("--merge", action="append", default=[], help="JSON-lines file of earlier runs to include in the table")
    parser.add_argument("--quick", action="store_true", help="6 steps and 32 held-out pairs: a smoke run")
    parser.add_argument("--threads", type=int, help="torch threads in each run (default: torch's, one per core)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per run before the table")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.heldout = 6, 32

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.method:
        if args.method not in GRIDS:
            parser.error(f"--method must be one of {', '.join(GRIDS)}")
        row = train(args.method, args.lr if args.lr is not None else DEFAULT_LR[args.method], args.steps, args.heldout)
        print(json.dumps(row) if args.json else json.dumps(row, indent=1))
        return 0

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in GRIDS]
    if unknown:
        parser.error(f"unknown or untrainable method(s) {unknown}; choose from {', '.join(GRIDS)}")
    explicit = parse_lrs(args.lrs)
    env = environment()
    started = time.perf_counter()
    tasks = [(method, lr) for method in methods
             for lr in explicit.get(method) or (GRIDS[method] if args.sweep else (DEFAULT_LR[method],))]
    extra = ["--steps", str(args.steps), "--heldout", str(args.heldout)] + (["--threads", str(args.threads)] if args.threads else [])

    def run(task):
        method, lr = task
        rows, load = run_child(Path(__file__), method, ["--lr", repr(lr), *extra])
        for row in rows:
            row.setdefault("lr", lr)
            row["other_load"] = round(load, 2) if load is not None and args.jobs == 1 else None
        last = rows[-1]
        print(f"[{time.perf_counter() - started:6.0f}s] {method} lr {lr:g}: "
              + (last.get("error") or f"held-out {last['heldout_loss_before']:.4f} -> {last['heldout_loss_after']:.4f} "
                 f"({last['train_seconds']:.0f} s training)"), file=sys.stderr, flush=True)
        return rows

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        runs = [row for rows in pool.map(run, tasks) for row in rows]
    for path in args.merge:  # earlier runs' JSON lines, e.g. the rest of a sweep
        runs += [json.loads(line) for line in Path(path).read_text().splitlines() if line.startswith("{")]
    if args.json:
        for row in runs:
            print(json.dumps({"env": env, **row}))
    note = (f"{args.steps} steps × batch {BATCH} of WordNet train pairs (same order for all), warm-up 10% + linear "
            f"decay, clip 1.0; held-out = {args.heldout} pairs; best lr of those tried shown; "
            f"total {time.perf_counter() - started:.0f} s")
    print(markdown(env, runs, note))
    return 0


if __name__ == "__main__":
    sys.exit(main())
