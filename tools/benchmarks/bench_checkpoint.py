"""Checkpoint size and save time of a Trainer run on the bundled SmolLM2-135M: adapter-only (the default) vs
`SparseCallback(save_full_checkpoints=True)`, the demo's setting (every linear layer but the head, LoRA-rank-16
budget, `spiel_sm3`).

    python -m tools.benchmarks.bench_checkpoint [--steps 3] [--output-dir runs/bench_checkpoint]

Each save is timed by the Trainer's own path (`_save_checkpoint`, from the end of a step to `on_save`); the
size is what `checkpoint-N` holds on disk. Random token ids stand in for data: neither number depends on them.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

import sparse_plugin  # registers optim="spiel_sm3"
from sparse_plugin import SparseCallback, SparseConfig
from tools.benchmarks.common import environment, header_lines
from tools.bundled_model import load_model


class SaveTimer(TrainerCallback):
    """Seconds from each step's end to its checkpoint's `on_save` (logging and evaluation are off)."""

    def __init__(self):
        self.started, self.seconds = 0.0, []

    def on_step_end(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_save(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self.started)


def measure(directory: Path, full: bool, steps: int) -> dict:
    model, tokenizer = load_model()
    sparse_plugin.prepare_model(model, SparseConfig(lora_rank_equivalent=16))
    ids = torch.randint(0, tokenizer.vocab_size, (4 * steps, 64), generator=torch.Generator().manual_seed(0)).tolist()
    args = TrainingArguments(
        str(directory),
        optim="spiel_sm3",
        learning_rate=1e-2,
        max_steps=steps,
        per_device_train_batch_size=4,
        save_strategy="steps",
        save_steps=1,
        logging_steps=1000,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    timer = SaveTimer()
    Trainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}),
        callbacks=[SparseCallback(save_full_checkpoints=full), timer],
    ).train()
    checkpoint = directory / f"checkpoint-{steps}"
    files = {p.name: p.stat().st_size for p in checkpoint.iterdir()}
    return {"bytes": sum(files.values()), "files": files, "save_s": statistics.median(timer.seconds)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="steps, one checkpoint each (median save time)")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/bench_checkpoint"))
    args = parser.parse_args(argv)
    print("# " + header_lines(environment()))
    results = {}
    for name, full in (("adapter-only", False), ("full", True)):
        shutil.rmtree(args.output_dir / name, ignore_errors=True)
        results[name] = measure(args.output_dir / name, full, args.steps)
        print(
            f"{name:>12}: {results[name]['bytes'] / 2**20:8.1f} MiB per checkpoint, save {results[name]['save_s']:.2f} s "
            f"(median of {args.steps}); files: {results[name]['files']}",
            flush=True,
        )
    small, big = results["adapter-only"], results["full"]
    print(
        f"adapter-only / full: size {small['bytes'] / big['bytes']:.3f}, save time {small['save_s'] / big['save_s']:.3f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
