"""Test-split loss after equal steps on two real corpora: our methods vs PEFT LoRA / DoRA / SHiRA / Super-Tuning and full fine-tuning.

Protocol (choose on validation, report test; see `tools/corpora/` for the data and splits):

- Corpora: `wordnet` ("Define the word 'X'." → gloss, grouped by word) and `pydocs` ("Describe the Python
  function `f(...)`." → prose, grouped by module). Train / validation / test are disjoint groups (80/10/10).
- A run = (corpus, method, lr, seed): `--steps` optimizer steps (default 60) of batch 8 from the corpus's train
  split in a seed-dependent order, chat-formatted by `demo.collate` with the corpus's system prompt (answer tokens
  only are learned, at most the corpus's `MAX_LENGTH` tokens). The seed also draws the method's random parts
  (SpIEL's initial positions, SHiRA's mask, LoRA's A). Schedule: linear warm-up over 10% of the steps then linear
  decay to 0 (`--schedule constant`: a flat rate); gradient-norm clipping at 1.0.
- After training, the token-weighted mean cross-entropy of the answers over fixed samples (`random.Random(0)`,
  the same for every run) of `--eval-pairs` validation and as many test pairs; "before" (every adapter starts as
  the identity) is the base model's and a check of that.
- Each method's learning rate is the one with the lowest mean validation loss over the seeds run; the table
  reports that rate's test loss (mean ± sample standard deviation over seeds), and the transfer check: the test
  loss here at the rate the *other* corpus's validation chose.

Each run is its own subprocess (`bench_quality.py --method X --lr LR --corpus C --seed S --json`). Grids (default in
the middle) are centred on the best rate of wider sweeps at 60 steps (2026-11, SmolLM2, batch 8, WordNet):

    lora-r16, dora-r16, lora-1pct   1e-3, [2e-3], 4e-3       (torch AdamW, alpha = 2r)
    shira, supertuning              1e-3, [3e-3], 1e-2       (torch AdamW)
    spiel-ma, spiel-ma-1pct         5e-3, [1e-2], 2e-2       (SM3)
    spiel-ag                        5e-4, [1e-3], 2e-3       (SparseAdamW)
    smt, sift                       2.5e-4, [5e-4], 1e-3     (SparseAdamW)
    full                            5e-5, [1e-4], 2e-4       (torch AdamW)

Follow-ups and GPUs: `--best-seeds 1,2` adds those seeds at each (corpus, method)'s validation-chosen rate as
soon as its sweep is complete (the coarse one-seed sweep, then three seeds at the best point), and
`--long-steps 1000` one long run per method (not per variant) on `--long-corpus` at that rate, its validation
loss every `--long-eval-every` steps (`--plot curves.png` draws them). `--device cuda --jobs 16` runs on a GPU;
`--budget-s` starts no run after that many seconds and `--out` keeps each finished run, so a cut-off sweep still
leaves its table (`--methods "" --merge runs.jsonl`).

Usage (from the repository root; a 60-step run takes 2-4 min on 2 idle cores):

    python -m tools.benchmarks.bench_quality                     # default rates, WordNet, seed 0
    python -m tools.benchmarks.bench_quality --sweep --corpora wordnet,pydocs --json --jobs 2 --threads 1 > sweep.jsonl
    python -m tools.benchmarks.bench_quality --methods spiel-ma,lora-r16 --lrs spiel-ma=1e-2 --seeds 0,1,2
    python -m tools.benchmarks.bench_quality --methods "" --merge a.jsonl --merge b.jsonl   # table of earlier runs
    python -m tools.benchmarks.bench_quality --quick             # 6 steps, 32 evaluation pairs: a smoke run
    python3 -m tools.benchmarks.bench_quality --device cuda --jobs 16 --threads 1 --sweep --wide --corpora wordnet,pydocs \
        --steps 150 --best-seeds 1,2 --long-steps 1000 --out runs.jsonl       # what the README's table ran
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

from tools.benchmarks.common import environment, header_lines, markdown_table
from tools.benchmarks.methods import (
    SPIEL_VARIANTS,
    build_method,
    load_base,
    optimizer_state_bytes,
    run_child,
    trainable_params,
)

BATCH = 8
EVAL_BATCH = 16
EVAL_SEED = 0
GRIDS = {
    "lora-r16": (1e-3, 2e-3, 4e-3),
    "dora-r16": (1e-3, 2e-3, 4e-3),
    "lora-1pct": (1e-3, 2e-3, 4e-3),
    "shira": (1e-3, 3e-3, 1e-2),
    "supertuning": (1e-3, 3e-3, 1e-2),
    "spiel-ma": (5e-3, 1e-2, 2e-2),
    "spiel-ma-1pct": (5e-3, 1e-2, 2e-2),
    "spiel-ag": (5e-4, 1e-3, 2e-3),
    "smt": (2.5e-4, 5e-4, 1e-3),
    "sift": (2.5e-4, 5e-4, 1e-3),
    "full": (5e-5, 1e-4, 2e-4),
}
# Each SpIEL variant (methods.SPIEL_VARIANTS) starts from its base method's grid.
GRIDS |= {name: GRIDS[base] for name, (base, _, _) in SPIEL_VARIANTS.items()}
DEFAULT_LR = {m: grid[1] for m, grid in GRIDS.items()}
QUALITY_METHODS = [m for m in GRIDS if m not in SPIEL_VARIANTS]


def wide_grid(method: str) -> tuple[float, ...]:
    """`--wide`: five rates a factor of 2 apart around the grid's middle, for a first sweep at new settings."""
    middle = GRIDS[method][1]
    return tuple(middle * f for f in (0.25, 0.5, 1.0, 2.0, 4.0))


@torch.no_grad()
def answer_loss(model, tokenizer, pairs: list[dict], corpus) -> float:
    """Token-weighted mean cross-entropy of the answer tokens (labels != -100) over `pairs`."""
    from tools.demo import collate

    was_training = model.training
    model.eval()
    total = count = 0.0
    for start in range(0, len(pairs), EVAL_BATCH):
        batch = collate(tokenizer, pairs[start : start + EVAL_BATCH], corpus.MAX_LENGTH, corpus.SYSTEM)
        batch = {k: v.to(model.device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum"
        )
        total += float(loss)
        count += int((labels != -100).sum())
    model.train(was_training)
    return total / count


def schedule(steps: int, shape: str):
    """`linear`: warm-up over the first 10% of steps (at least one), then linear decay to 0; `constant`: flat."""
    warmup = max(1, steps // 10)

    def factor(step: int) -> float:  # step = optimizer steps already taken
        if shape == "constant":
            return 1.0
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))

    return factor


def train(
    method: str,
    lr: float,
    *,
    corpus_name: str,
    seed: int,
    steps: int,
    eval_pairs: int,
    shape: str,
    device: str = "cpu",
    eval_every: int = 0,
) -> dict:
    from tools.corpora import corpus_module
    from tools.demo import collate

    started = time.perf_counter()
    corpus = corpus_module(corpus_name)
    torch.manual_seed(seed)
    model, tokenizer = load_base()
    model.to(device)
    train_pairs = corpus.load_pairs("train")
    order = random.Random(seed).sample(range(len(train_pairs)), steps * BATCH)
    evaluation = {
        split: random.Random(EVAL_SEED).sample(corpus.load_pairs(split), eval_pairs)
        for split in ("validation", "test")
    }
    model, optimizer, info = build_method(model, method, lr=lr, total_steps=steps, seed=seed)
    model.train()
    before = {split: answer_loss(model, tokenizer, pairs, corpus) for split, pairs in evaluation.items()}
    params = [p for p in model.parameters() if p.requires_grad]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(steps, shape))
    losses, curve, evaluation_seconds = [], [], 0.0
    train_started = time.perf_counter()
    for step in range(steps):
        pairs = [train_pairs[i] for i in order[step * BATCH : (step + 1) * BATCH]]
        batch = collate(tokenizer, pairs, corpus.MAX_LENGTH, corpus.SYSTEM)
        loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            break
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            evaluated = time.perf_counter()
            curve.append([step + 1, round(answer_loss(model, tokenizer, evaluation["validation"], corpus), 5)])
            evaluation_seconds += time.perf_counter() - evaluated
    train_seconds = time.perf_counter() - train_started - evaluation_seconds
    after = {split: answer_loss(model, tokenizer, pairs, corpus) for split, pairs in evaluation.items()}
    if eval_every:
        curve.append([len(losses), round(after["validation"], 5)])
    selector = getattr(optimizer, "selector", None)
    return {
        "corpus": corpus_name,
        "method": method,
        "lr": lr,
        "seed": seed,
        "schedule": shape,
        "validation_before": round(before["validation"], 5),
        "test_before": round(before["test"], 5),
        "validation_after": round(after["validation"], 5),
        "test_after": round(after["test"], 5),
        "train_loss_last10": round(sum(losses[-10:]) / len(losses[-10:]), 5),
        "trainable_params": trainable_params(model),
        "optimizer_state_bytes": optimizer_state_bytes(optimizer),
        "steps": len(losses),
        "batch": BATCH,
        "eval_pairs": eval_pairs,
        "seconds": round(time.perf_counter() - started, 1),
        "train_seconds": round(train_seconds, 1),
        "device": device,
        **({"validation_curve": curve} if eval_every else {}),
        "info": {**info, **({"last_round": selector.last_round} if selector is not None else {})},
    }


def _mean_sd(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, sd


def summarize(runs: list[dict]) -> dict:
    """{corpus: {method: {lr: {"validation": [...], "test": [...], "seeds": [...]}}}} over the successful runs."""
    table: dict = {}
    for r in runs:
        if "error" in r or r.get("phase") == "long":
            continue
        cell = table.setdefault(r["corpus"], {}).setdefault(r["method"], {}).setdefault(r["lr"], {})
        for key, value in (("validation", r["validation_after"]), ("test", r["test_after"]), ("seeds", r["seed"])):
            cell.setdefault(key, []).append(value)
    return table


def chosen_lr(by_lr: dict) -> float:
    """The rate with the lowest mean validation loss (ties: the smaller rate)."""
    return min(by_lr, key=lambda lr: (_mean_sd(by_lr[lr]["validation"])[0], lr))


def markdown(env: dict, runs: list[dict], note: str) -> str:
    table = summarize(runs)
    sections = [header_lines(env, note)]
    for corpus, methods in table.items():
        others = [c for c in table if c != corpus]
        lora = methods.get("lora-r16")
        lora_test = _mean_sd(lora[chosen_lr(lora)]["test"])[0] if lora else None
        rows = []
        for method, by_lr in methods.items():
            lr = chosen_lr(by_lr)
            mean, sd = _mean_sd(by_lr[lr]["test"])
            transfer = "–"
            if others and method in table[others[0]]:
                other_lr = chosen_lr(table[others[0]][method])
                if other_lr in by_lr:
                    transfer = f"{other_lr:g}: {_mean_sd(by_lr[other_lr]['test'])[0]:.4f}"
            tried = "; ".join(f"{x:g}: {_mean_sd(c['validation'])[0]:.4f}" for x, c in sorted(by_lr.items()))
            rows.append(
                [
                    method,
                    f"{lr:g}",
                    f"{mean:.4f} ± {sd:.4f}",
                    str(len(by_lr[lr]["test"])),
                    f"{mean - lora_test:+.4f}" if lora_test is not None else "–",
                    transfer,
                    tried,
                ]
            )
        rows.sort(key=lambda row: float(row[2].split()[0]))
        headers = [
            "method",
            "lr (validation)",
            "test loss, mean ± sd",
            "seeds",
            "− LoRA r16",
            "test at the other corpus's lr",
            "validation mean per lr",
        ]
        sections += ["", f"**{corpus}**", "", markdown_table(headers, rows)]
    errors = [f"- `{r['method']}` on {r.get('corpus')} lr {r.get('lr')}: {r['error']}" for r in runs if "error" in r]
    return "\n".join(sections + ([""] + errors if errors else []))


def parse_lrs(items: list[str]) -> dict[str, list[float]]:
    out = {}
    for item in items:
        method, _, values = item.partition("=")
        if method not in GRIDS or not values:
            raise SystemExit(f"--lrs wants METHOD=lr[,lr...] with METHOD in {', '.join(GRIDS)}; got {item!r}")
        out[method] = [float(v) for v in values.split(",")]
    return out


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def plot_curves(runs: list[dict], path: Path) -> None:
    """Validation loss against optimizer steps of every run that recorded a curve (`--eval-every`), to a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib") from None
    curves = [r for r in runs if r.get("validation_curve") and "error" not in r]
    if not curves:
        raise SystemExit("--plot: no run with a validation curve (run with --eval-every or --long-steps)")
    figure, axis = plt.subplots(figsize=(9, 5.5))
    for r in sorted(curves, key=lambda r: r["validation_curve"][-1][1]):
        steps, losses = zip(*r["validation_curve"])
        ours = r["method"].startswith(("spiel", "smt", "sift"))
        axis.plot(steps, losses, "-" if ours else "--", label=f"{r['method']} (lr {r['lr']:g})")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel(f"validation loss ({curves[0]['corpus']})")
    axis.legend(fontsize=7, ncol=2)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


class Driver:
    """Runs (corpus, method, lr, seed) tasks in subprocesses, `jobs` at once, and adds follow-up runs as soon as a
    (corpus, method) sweep is complete: more seeds at the rate its validation chose (`best_seeds`) and one long
    run with a validation curve (`long_steps`). Starts nothing after `budget_s`; appends each run to `out`."""

    def __init__(self, args, extra: list[str], out: Path | None):
        self.args, self.extra, self.out = args, extra, out
        self.started = time.perf_counter()
        self.runs: list[dict] = []
        self.pending_sweep: dict[tuple[str, str], int] = {}

    def run(self, task: tuple) -> list[dict]:
        corpus, method, lr, seed, phase = task
        extra = [*self.extra, "--lr", repr(lr), "--corpus", corpus, "--seed", str(seed)]
        if phase == "long":  # the later --steps wins
            extra = [*extra, "--steps", str(self.args.long_steps), "--eval-every", str(self.args.long_eval_every)]
        rows, _ = run_child(__spec__.name, method, extra, timeout=self.args.run_timeout)
        for row in rows:
            row.update({"lr": lr, "corpus": corpus, "seed": seed} if "error" in row else {})
            row["phase"] = phase
        last = rows[-1]
        print(
            f"[{time.perf_counter() - self.started:6.0f}s] {phase} {corpus} {method} lr {lr:g} seed {seed}: "
            + (
                last.get("error")
                or f"validation {last['validation_before']:.4f} -> {last['validation_after']:.4f}, "
                f"test -> {last['test_after']:.4f} ({last['train_seconds']:.0f} s training)"
            ),
            file=sys.stderr,
            flush=True,
        )
        return rows

    def follow_ups(self, task: tuple) -> list[tuple]:
        corpus, method, _, _, phase = task
        if phase != "sweep":
            return []
        self.pending_sweep[corpus, method] -= 1
        if self.pending_sweep[corpus, method]:
            return []
        by_lr = summarize(self.runs).get(corpus, {}).get(method)
        if not by_lr:
            return []
        lr = chosen_lr(by_lr)
        tasks = [(corpus, method, lr, seed, "seeds") for seed in self.args.best_seed_list]
        if self.args.long_steps and corpus == self.args.long_corpus and method not in SPIEL_VARIANTS:
            tasks.insert(0, (corpus, method, lr, 0, "long"))
        return tasks

    def drive(self, tasks: list[tuple]) -> list[dict]:
        from collections import deque
        from concurrent.futures import FIRST_COMPLETED, wait

        for corpus, method, _, _, _ in tasks:
            self.pending_sweep[corpus, method] = self.pending_sweep.get((corpus, method), 0) + 1
        queue, running = deque(tasks), {}
        with ThreadPoolExecutor(max_workers=max(1, self.args.jobs)) as pool:
            while queue or running:
                in_budget = self.args.budget_s is None or time.perf_counter() - self.started < self.args.budget_s
                while queue and in_budget and len(running) < max(1, self.args.jobs):
                    task = queue.popleft()
                    running[pool.submit(self.run, task)] = task
                if not running:
                    break
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    task = running.pop(future)
                    rows = future.result()
                    self.runs += rows
                    if self.out is not None:
                        with self.out.open("a") as sink:
                            sink.writelines(json.dumps(row) + "\n" for row in rows)
                    queue.extendleft(reversed(self.follow_ups(task)))
        skipped = len(queue)
        if skipped:
            print(f"budget spent: {skipped} queued runs not started", file=sys.stderr)
        return self.runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(QUALITY_METHODS), help="comma-separated (default %(default)s)")
    parser.add_argument("--corpora", default="wordnet", help="comma-separated: wordnet, pydocs (default %(default)s)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default %(default)s)")
    parser.add_argument("--method", help="run one method in this process (what the driver calls)")
    parser.add_argument("--corpus", default="wordnet", help="with --method: its corpus")
    parser.add_argument("--seed", type=int, default=0, help="with --method: its seed")
    parser.add_argument("--lr", type=float, help="with --method: its learning rate (default: the grid's middle)")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run (default %(default)s)")
    parser.add_argument(
        "--eval-pairs", type=int, default=128, help="validation and test pairs each (default %(default)s)"
    )
    parser.add_argument("--eval-every", type=int, default=0, help="with --method: validation loss every N steps")
    parser.add_argument("--schedule", choices=("linear", "constant"), default="linear")
    parser.add_argument("--device", default="cpu", help="torch device of each run: cpu or cuda (default %(default)s)")
    parser.add_argument("--sweep", action="store_true", help="run every rate of each method's grid")
    parser.add_argument("--wide", action="store_true", help="with --sweep: five rates a factor of 2 apart")
    parser.add_argument(
        "--lrs", action="append", default=[], help="METHOD=lr,lr,...: rates to run for METHOD (repeatable)"
    )
    parser.add_argument(
        "--best-seeds", default="", help="seeds to add at each (corpus, method)'s validation-chosen rate"
    )
    parser.add_argument("--long-steps", type=int, default=0, help="one long run per method at its chosen rate")
    parser.add_argument("--long-corpus", default="wordnet", help="the long runs' corpus (default %(default)s)")
    parser.add_argument("--long-eval-every", type=int, default=100, help="the long runs' curve interval")
    parser.add_argument(
        "--jobs", type=int, default=1, help="runs at once (losses do not depend on it; use with --threads 1)"
    )
    parser.add_argument("--budget-s", type=float, help="start no run after this many seconds")
    parser.add_argument("--run-timeout", type=float, help="stop a run after this many seconds")
    parser.add_argument("--out", type=Path, help="append each finished run's JSON line to this file")
    parser.add_argument(
        "--merge", action="append", default=[], help="JSON-lines file of earlier runs to include in the table"
    )
    parser.add_argument("--plot", type=Path, help="PNG of the validation curves of the runs that have one")
    parser.add_argument("--quick", action="store_true", help="6 steps and 32 evaluation pairs: a smoke run")
    parser.add_argument("--threads", type=int, help="torch threads in each run (default: torch's, one per core)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per run before the table")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.eval_pairs = 6, 32

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.method:
        if args.method not in GRIDS:
            parser.error(f"--method must be one of {', '.join(GRIDS)}")
        row = train(
            args.method,
            args.lr if args.lr is not None else DEFAULT_LR[args.method],
            corpus_name=args.corpus,
            seed=args.seed,
            steps=args.steps,
            eval_pairs=args.eval_pairs,
            shape=args.schedule,
            device=args.device,
            eval_every=args.eval_every,
        )
        print(json.dumps(row) if args.json else json.dumps(row, indent=1))
        return 0

    methods, corpora, seeds = _csv(args.methods), _csv(args.corpora), [int(x) for x in _csv(args.seeds)]
    args.best_seed_list = [int(x) for x in _csv(args.best_seeds)]
    unknown = [m for m in methods if m not in GRIDS]
    if unknown:
        parser.error(f"unknown or untrainable method(s) {unknown}; choose from {', '.join(GRIDS)}")
    explicit = parse_lrs(args.lrs)
    env = environment(args.device)

    def rates(method: str):
        if method in explicit:
            return explicit[method]
        if args.sweep:
            return wide_grid(method) if args.wide else GRIDS[method]
        return (DEFAULT_LR[method],)

    tasks = [  # method by method, both corpora each, so a spent budget cuts whole methods, not a corpus
        (corpus, method, lr, seed, "sweep")
        for method in methods
        for corpus in corpora
        for lr in rates(method)
        for seed in seeds
    ]
    extra = ["--steps", str(args.steps), "--eval-pairs", str(args.eval_pairs), "--schedule", args.schedule]
    extra += ["--device", args.device] + (["--threads", str(args.threads)] if args.threads else [])
    driver = Driver(args, extra, args.out)
    runs = driver.drive(tasks) if tasks else []
    for path in args.merge:  # earlier runs' JSON lines, e.g. the rest of a sweep
        runs += [json.loads(line) for line in Path(path).read_text().splitlines() if line.startswith("{")]
    if args.json:
        for row in runs:
            print(json.dumps({"env": env, **row}))
    if args.plot:
        plot_curves(runs, args.plot)
    note = (
        f"{args.steps} steps × batch {BATCH}, {args.schedule} schedule, clip 1.0; lr chosen by mean validation "
        f"loss over {args.eval_pairs} pairs, test loss over {args.eval_pairs} others; total "
        f"{time.perf_counter() - driver.started:.0f} s"
    )
    print(markdown(env, runs, note))
    return 0


if __name__ == "__main__":
    sys.exit(main())
