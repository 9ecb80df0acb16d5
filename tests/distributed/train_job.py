"""Training job for the multi-process tests: a tiny Llama, the same global batches split over the ranks.

    torchrun --nproc_per_node 2 train_job.py OUT METHOD [--wrap ddp|fsdp1|fsdp2]   # each rank trains on its half
    python train_job.py OUT METHOD                                                # one process, whole batches
    torchrun --nproc_per_node 2 train_job.py OUT METHOD --trainer [--wrap ...] [--resume CHECKPOINT]   # HF Trainer
    ... --model qwen3-moe|gpt2   # a tiny Qwen3-MoE (fused experts targeted) or GPT-2 (Conv1D), plain loop under DDP

The plain loop clips the values' gradient norm as the Trainer does, so averaging after clipping would show.
`fsdp1` is FullyShardedDataParallel (FULL_SHARD, use_orig_params, one unit per decoder layer), `fsdp2` is
`fully_shard` per decoder layer and on the root; both shard the frozen base and leave the deltas whole
(`keep_deltas_replicated`). Each rank writes OUT/rank{R}.pt with every layer's indices and values (and the plain
loop's losses); the plain FSDP runs also save an adapter to OUT/adapter from rank 0.
"""

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import tiny_llama
from test_targets import tiny_gpt2, tiny_qwen3_moe

from sparse_plugin import (
    SM3,
    SparseAdamW,
    SparseCallback,
    SparseConfig,
    iter_sparse_layers,
    prepare_model,
    save_adapter,
)
from sparse_plugin.distributed import keep_deltas_replicated
from sparse_plugin.fsdp import gathered_base_values, is_fsdp_wrapped

# name -> (SparseConfig fields, optimizer class)
JOB_RECIPES = {
    "ma": (
        {"method": "spiel", "regrow": "ma", "density": 0.05, "reselection_steps": 2, "initial_reselection_rate": 0.5},
        SM3,
    ),
    "ag": (
        {
            "method": "spiel",
            "regrow": "ag",
            "density": 0.05,
            "reselection_steps": 2,
            "selection_accumulation_steps": 1,
            "initial_reselection_rate": 0.5,
        },
        SparseAdamW,
    ),
    "sift": ({"method": "sift", "density": 0.05, "selection_steps": 2}, SparseAdamW),
    "smt": (
        {"method": "smt", "density": 0.2, "block_size": 16, "warmup_steps": 2, "target_modules": "all-linear"},
        SparseAdamW,
    ),
}
# name -> (model builder, SparseConfig fields for its targets): non-Linear weights (`SparseDeltaParameter`)
JOB_MODELS = {
    "llama": (tiny_llama, {}),
    "qwen3-moe": (tiny_qwen3_moe, {"target_parameters": ["experts.gate_up_proj", "experts.down_proj"]}),
    "gpt2": (tiny_gpt2, {"target_modules": "all-linear"}),  # its Conv1D projections
}
STEPS, GLOBAL_BATCH, CLIP, RESTART_AT = int(os.environ.get("DDP_JOB_STEPS", "8")), 4, 0.05, 1


def wrap(model, how):
    """The model as the training loop calls it, and a function clipping the gradient norm to CLIP."""
    values = [layer.values for _, layer in iter_sparse_layers(model)]
    if how == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model), lambda: torch.nn.utils.clip_grad_norm_(values, CLIP)
    kept_whole = keep_deltas_replicated(model)
    if how == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        wrapped = FullyShardedDataParallel(
            model,
            sharding_strategy=ShardingStrategy.FULL_SHARD,
            auto_wrap_policy=ModuleWrapPolicy({type(model.model.layers[0])}),  # the decoder layer
            use_orig_params=True,
            ignored_modules=kept_whole,
            device_id=torch.device("cpu"),
        )
        return wrapped, lambda: wrapped.clip_grad_norm_(CLIP)
    from torch.distributed.fsdp import fully_shard

    ignored = {p for module in kept_whole for p in module.parameters()}
    for block in model.model.layers:
        fully_shard(block, ignored_params=ignored)
    fully_shard(model, ignored_params=ignored)
    return model, lambda: torch.nn.utils.clip_grad_norm_(values, CLIP)


def optimizer_state(optimizer, forward, how):
    """The optimizer's state dict as an FSDP checkpoint takes it (accelerate's save_fsdp_optimizer)."""
    if how == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel.optim_state_dict(forward, optimizer)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(forward, optimizer, options=StateDictOptions(full_state_dict=True))


def load_optimizer_state(optimizer, forward, how, state) -> None:
    if how == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel

        optimizer.load_state_dict(FullyShardedDataParallel.optim_state_dict_to_load(forward, optimizer, state))
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(forward, optimizer, state, options=StateDictOptions(full_state_dict=True))


def start(method, world, how, deltas=None, arch="llama"):
    """A prepared model (with `deltas` copied in), its optimizer, the wrapped forward and the clipping function."""
    fields, cls = JOB_RECIPES[method]
    build, targets = JOB_MODELS[arch]
    model = prepare_model(build(), SparseConfig(**(fields | targets)))
    for key, layer in iter_sparse_layers(model):
        if deltas is not None:
            layer.set_indices(deltas[key][0])
            layer.values.data.copy_(deltas[key][1])
    optimizer = cls(model, lr=1e-2, total_steps=STEPS)
    if world > 1:
        forward, clip = wrap(model, how)
    else:
        values = [layer.values for _, layer in iter_sparse_layers(model)]
        forward, clip = model, lambda: torch.nn.utils.clip_grad_norm_(values, CLIP)
    return model, optimizer, forward, clip


def plain_loop(method, rank, world, how, arch="llama"):
    """Train STEPS steps; FSDP runs restart after RESTART_AT steps from what an FSDP checkpoint holds (the deltas and
    the optimizer state through FSDP's state-dict APIs), mid-way through SMT's warm-up and SIFT's selection."""
    model, optimizer, forward, clip = start(method, world, how, arch=arch)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    losses = []
    for step in range(STEPS):
        if step == RESTART_AT and how.startswith("fsdp") and world > 1:
            state = optimizer_state(optimizer, forward, how)
            deltas = {
                key: (layer.indices.clone(), layer.values.detach().clone()) for key, layer in iter_sparse_layers(model)
            }
            model, optimizer, forward, clip = start(method, world, how, deltas, arch)
            load_optimizer_state(optimizer, forward, how, state)
        batch = torch.randint(3, vocab, (GLOBAL_BATCH, 12), generator=gen)
        mine = batch.chunk(world)[rank]
        loss = forward(input_ids=mine, labels=mine).loss
        loss.backward()
        clip()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    return model, losses


def let_accelerate_shard_on_cpu() -> None:
    """Accelerate turns FSDP on only for accelerator devices and trains `fsdp=True` on CPU as DDP; switch it to FSDP
    for CPU processes too, so the Trainer's real FSDP path (wrapping, clipping, adapter saving) runs on gloo."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin
            self.device = torch.device("cpu")  # FSDP1 compares its device_id with "cpu", not accelerate's "cpu:0"
            # As accelerate itself does for FSDP: a later `AcceleratorState()` copies PartialState's fields back in.
            PartialState._shared_state.update(distributed_type=self.distributed_type, device=self.device)

    AcceleratorState.__init__ = init


def trainer_run(model, method, out, how, resume=None):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    ids = torch.randint(3, 97, (32, 12), generator=torch.Generator().manual_seed(0)).tolist()
    optim = "spiel_sm3" if JOB_RECIPES[method][1] is SM3 else "spiel_adamw"
    fsdp = {}
    if how.startswith("fsdp"):
        let_accelerate_shard_on_cpu()
        # sync_module_states would look for an accelerator device; every rank builds the same model anyway.
        config = {
            "version": int(how[-1]),
            "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
            "sync_module_states": False,
        }
        fsdp = {"fsdp": True, "fsdp_config": config}
    # A checkpoint halfway: adapter-only, so FSDP saves no model (accelerate could not gather an FSDP model's full
    # state dict on CPU) and the stored base entries are gathered from the shards as for the final adapter.
    args = TrainingArguments(
        output_dir=str(out),
        optim=optim,
        learning_rate=1e-2,
        max_steps=STEPS,
        max_grad_norm=CLIP,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=2,
        gradient_checkpointing=True,
        save_strategy="steps",
        save_steps=STEPS // 2,
        report_to=[],
        use_cpu=True,
        ddp_backend="gloo",
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        **fsdp,
    )
    Trainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}),
        callbacks=[SparseCallback()],
    ).train(resume_from_checkpoint=resume)
    return []


def base_bytes_here(model) -> int:
    """Bytes of frozen-base storage this rank holds (FSDP1's flat shards, FSDP2's local DTensor shards, or whole)."""
    from torch.distributed.tensor import DTensor

    deltas = {id(layer.values) for _, layer in iter_sparse_layers(model)}
    storages = {}
    for param in model.parameters():
        if id(param) not in deltas:
            storage = (param.to_local() if isinstance(param, DTensor) else param).untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("method", choices=list(JOB_RECIPES))
    parser.add_argument("--trainer", action="store_true")
    parser.add_argument("--model", choices=list(JOB_MODELS), default="llama", help="without --trainer")
    parser.add_argument("--wrap", choices=["ddp", "fsdp1", "fsdp2"], default="ddp")
    parser.add_argument("--resume", help="a Trainer checkpoint to resume from (with --trainer)")
    parser.add_argument("--no-base-values", action="store_true", help="store_base_values=False (with --trainer)")
    args = parser.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not args.trainer:
        dist.init_process_group("gloo")
    rank = int(os.environ.get("RANK", "0"))
    if args.trainer:
        config = SparseConfig(**JOB_RECIPES[args.method][0], store_base_values=not args.no_base_values)
        model = prepare_model(tiny_llama(), config)
        losses = trainer_run(model, args.method, args.out, args.wrap, args.resume)
    else:
        model, losses = plain_loop(args.method, rank, world, args.wrap, args.model)
    layers = {key: (layer.indices.clone(), layer.values.detach().clone()) for key, layer in iter_sparse_layers(model)}
    sharded, base_bytes = is_fsdp_wrapped(model), base_bytes_here(model)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.trainer and args.wrap.startswith("fsdp"):
        base_values = gathered_base_values(model)  # every rank takes part
        if rank == 0:
            save_adapter(model, args.out / "adapter", base_values=base_values)
    torch.save(
        {"losses": losses, "layers": layers, "fsdp": sharded, "base_bytes": base_bytes}, args.out / f"rank{rank}.pt"
    )
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
