"""Training job for the kill-and-resume test: a tiny Llama under the HF Trainer, a checkpoint every step.

    python kill_and_resume_job.py OUT METHOD [--kill-after N] [--resume CHECKPOINT]

With --kill-after N the process SIGKILLs itself right after checkpoint-N is written (no clean shutdown).
At the end it writes OUT/result.pt: per-step losses and every layer's indices and values.
"""

import argparse
import os
import signal
import sys
from pathlib import Path

import torch
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import tiny_llama

from sparse_plugin import SparseCallback, SparseConfig, iter_sparse_layers, prepare_model

# MA and AG regrow at steps 4 and 8, AG gathering on steps 3-4; SMT warms up for 3 steps; SIFT chooses on micro-batch 5
# (step 3 of 2 micro-batches each). Killing after step 3 (AG) or 2 (SMT, SIFT) lands between gathering and deciding.
# name -> (SparseConfig fields, Trainer optim)
RESUME_RECIPES = {
    "ma": ({"method": "spiel", "regrow": "ma", "density": 0.05, "reselection_steps": 4}, "spiel_sm3"),
    "ag": (
        {
            "method": "spiel",
            "regrow": "ag",
            "density": 0.05,
            "reselection_steps": 4,
            "selection_accumulation_steps": 2,
        },
        "spiel_adamw",
    ),
    "smt": (
        {"method": "smt", "density": 0.2, "block_size": 16, "warmup_steps": 3, "target_modules": "all-linear"},
        "spiel_adamw",
    ),
    "sift": ({"method": "sift", "density": 0.05, "selection_steps": 5}, "spiel_adamw"),
}


class KillAfter(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("method", choices=list(RESUME_RECIPES))
    parser.add_argument("--kill-after", type=int)
    parser.add_argument("--resume")
    args = parser.parse_args()
    fields, optim = RESUME_RECIPES[args.method]
    model = prepare_model(tiny_llama(), SparseConfig(**fields))
    ids = torch.randint(3, 97, (24, 12), generator=torch.Generator().manual_seed(0)).tolist()
    training = TrainingArguments(
        output_dir=str(args.out),
        optim=optim,
        learning_rate=1e-2,
        max_steps=8,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        save_strategy="steps",
        save_steps=1,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
    )
    callbacks = [SparseCallback()] + ([KillAfter(args.kill_after)] if args.kill_after else [])
    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}),
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=args.resume)
    losses = {row["step"]: row["loss"] for row in trainer.state.log_history if "loss" in row}
    layers = {key: (layer.indices.clone(), layer.values.detach().clone()) for key, layer in iter_sparse_layers(model)}
    torch.save({"losses": losses, "layers": layers}, args.out / "result.pt")


if __name__ == "__main__":
    main()
