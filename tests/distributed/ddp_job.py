"""Training job for the multi-process tests: a tiny Llama, the same global batches split over the ranks.

    torchrun --nproc_per_node 2 ddp_job.py OUT METHOD          # DDP on gloo, each rank trains on its half
    python ddp_job.py OUT METHOD                               # one process, whole batches (the reference)
    torchrun --nproc_per_node 2 ddp_job.py OUT METHOD --trainer  # the HF Trainer under DDP + SparseCallback

Each rank writes OUT/rank{R}.pt with every layer's indices and values (and the plain loop's losses).
"""

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import tiny_llama  # noqa: E402

from sparse_plugin import SM3, SparseAdamW, SparseCallback, SparseConfig, iter_sparse_layers, prepare_model  # noqa: E402

METHODS = {
    "ma": ({"method": "spiel", "regrow": "ma", "density": 0.05, "reselection_steps": 2, "initial_reselection_rate": 0.5}, SM3),
    "ag": ({"method": "spiel", "regrow": "ag", "density": 0.05, "reselection_steps": 2, "selection_accumulation_steps": 1,
            "initial_reselection_rate": 0.5}, SparseAdamW),
    "sift": ({"method": "sift", "density": 0.05, "selection_steps": 2}, SparseAdamW),
    "smt": ({"method": "smt", "density": 0.2, "block_size": 16, "warmup_steps": 2, "target_modules": "all-linear"}, SparseAdamW),
}
STEPS, GLOBAL_BATCH = int(os.environ.get("DDP_JOB_STEPS", "8")), 4


def plain_loop(model, method, rank, world):
    fields, cls = METHODS[method]
    optimizer = cls(model, lr=1e-2, total_steps=STEPS)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(STEPS):
        batch = torch.randint(3, 97, (GLOBAL_BATCH, 12), generator=gen)
        mine = batch.chunk(world)[rank]
        loss = ddp(input_ids=mine, labels=mine).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    return losses


def trainer_run(model, method, out):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    ids = torch.randint(3, 97, (32, 12), generator=torch.Generator().manual_seed(0)).tolist()
    optim = "spiel_sm3" if METHODS[method][1] is SM3 else "spiel_adamw"
    args = TrainingArguments(output_dir=str(out), optim=optim, learning_rate=1e-2, max_steps=STEPS,
                             per_device_train_batch_size=2, save_strategy="no", report_to=[], use_cpu=True,
                             ddp_backend="gloo", seed=0, data_seed=0, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}),
            callbacks=[SparseCallback()]).train()
    return []


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("method", choices=list(METHODS))
    parser.add_argument("--trainer", action="store_true")
    args = parser.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not args.trainer:
        dist.init_process_group("gloo")
    rank = int(os.environ.get("RANK", "0"))
    model = prepare_model(tiny_llama(), SparseConfig(**METHODS[args.method][0]))
    losses = trainer_run(model, args.method, args.out) if args.trainer else plain_loop(model, args.method, rank, world)
    layers = {key: (layer.indices.clone(), layer.values.detach().clone()) for key, layer in iter_sparse_layers(model)}
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save({"losses": losses, "layers": layers}, args.out / f"rank{rank}.pt")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
