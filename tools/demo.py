"""The main job: a real sparse fine-tune of SmolLM2-135M-Instruct on WordNet definitions, then a merge.

Steps: load the bundled model; wrap every linear layer (not the head) with a sparse delta at the
LoRA-rank-16-equivalent budget; train with the stock HF `Trainer` (by default `optim="spiel_sm3"`, SpIEL-MA:
prune/regrow every 20 steps by SM3's accumulators; `--method` picks SpIEL-AG, SMT or SIFT with
`optim="spiel_adamw"`); report held-out loss before/after; the callback saves the adapter; fold it into a new
model directory with the `sparse-merge` CLI; reload that directory with plain transformers and check its logits
against the adapter model; show one generation before and after.

    python -m tools.demo [--method spiel-ma|spiel-ag|smt|sift] [--steps 100] [--output-dir runs/demo]
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import sparse_plugin  # importing it registers optim="spiel_sm3"
from sparse_plugin import SparseCallback, SparseConfig
from tools.bundled_model import load_model, model_dir
from tools.corpora.wordnet import SYSTEM, load_pairs

# --method: SparseConfig fields, optimizer, and learning rate (the best of tools/benchmarks/bench_quality.py's grid). SMT
# targets every linear layer here (its paper: Q/K/V) so all methods train the same layers at the same budget.
DEMO_RECIPES = {
    "spiel-ma": ({"method": "spiel", "regrow": "ma"}, "spiel_sm3", 1e-2),
    "spiel-ag": ({"method": "spiel", "regrow": "ag"}, "spiel_adamw", 1e-3),
    "smt": ({"method": "smt", "target_modules": "all-linear"}, "spiel_adamw", 5e-4),
    "sift": ({"method": "sift"}, "spiel_adamw", 5e-4),
}


def encode(tokenizer, pair: dict, system: str = SYSTEM) -> tuple[list[int], list[int]]:
    """Chat-formatted ids and labels; only the answer (and its end token) is learned."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": pair["prompt"]}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(pair["answer"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids


def collate(tokenizer, pairs: list[dict], max_length: int, system: str = SYSTEM) -> dict[str, torch.Tensor]:
    """Right-padded batch; padding is masked by attention and labels, never by token id (pad == eos here)."""
    rows = [encode(tokenizer, p, system) for p in pairs]
    width = min(max_length, max(len(ids) for ids, _ in rows))
    batch = {"input_ids": [], "attention_mask": [], "labels": []}
    for ids, labels in rows:
        ids, labels = ids[:width], labels[:width]
        pad = width - len(ids)
        batch["input_ids"].append(ids + [tokenizer.pad_token_id] * pad)
        batch["attention_mask"].append([1] * len(ids) + [0] * pad)
        batch["labels"].append(labels + [-100] * pad)
    return {k: torch.tensor(v) for k, v in batch.items()}


@torch.no_grad()
def generate(model, tokenizer, prompt: str) -> str:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=40, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def make_trainer(model, tokenizer, train_pairs: list[dict], heldout: list[dict], args) -> Trainer:
    training_args = TrainingArguments(
        output_dir=str(args.output_dir / "adapter"),
        optim=DEMO_RECIPES[args.method][1],
        learning_rate=args.lr,
        lr_scheduler_type="linear",
        warmup_steps=10,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=16,
        max_grad_norm=1.0,
        logging_steps=20,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=args.seed,
        remove_unused_columns=False,
    )
    return Trainer(
        model=model,
        args=training_args,
        train_dataset=train_pairs,
        eval_dataset=heldout,
        data_collator=lambda pairs: collate(tokenizer, pairs, args.max_length),
        callbacks=[SparseCallback()],
    )


def merge_with_cli(base: Path, adapter: Path, output: Path) -> None:
    cli = Path(sys.executable).with_name("sparse-merge")
    command = [
        str(cli),
        "merge",
        "--base",
        str(base),
        "--adapter",
        str(adapter),
        "--output",
        str(output),
        "--overwrite",
    ]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--method", choices=list(DEMO_RECIPES), default="spiel-ma")
    parser.add_argument(
        "--lr", type=float, help="learning rate (default: the method's best in tools/benchmarks/bench_quality.py)"
    )
    parser.add_argument(
        "--rank", type=int, default=16, help="LoRA rank whose parameter count the sparse budget matches"
    )
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--heldout", type=int, default=128, help="held-out pairs used for the loss")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=Path("runs/demo"))
    args = parser.parse_args(argv)
    fields, _, default_lr = DEMO_RECIPES[args.method]
    args.lr = default_lr if args.lr is None else args.lr
    torch.manual_seed(args.seed)
    started = time.perf_counter()

    model, tokenizer = load_model()
    train_pairs = load_pairs("train")
    heldout = random.Random(args.seed).sample(load_pairs("test"), args.heldout)
    probe = heldout[0]["prompt"]
    print(f"data: {len(train_pairs):,d} train pairs, {args.heldout} held-out pairs used for evaluation")
    before_text = generate(model, tokenizer, probe)

    config = SparseConfig(**fields, lora_rank_equivalent=args.rank, seed=args.seed)
    model = sparse_plugin.prepare_model(model, config)
    sparse_plugin.print_trainable_parameters(model)
    trainer = make_trainer(model, tokenizer, train_pairs, heldout, args)
    loss_before = trainer.evaluate()["eval_loss"]
    print(f"held-out loss before: {loss_before:.4f}")
    trainer.train()
    loss_after = trainer.evaluate()["eval_loss"]
    print(f"held-out loss after:  {loss_after:.4f}  ({loss_after - loss_before:+.4f})")
    trained = sum(layer.values.numel() for _, layer in sparse_plugin.iter_sparse_layers(model))
    if config.method == "spiel":
        regrown = sum(row.get("sparse/regrown", 0) for row in trainer.state.log_history)
        print(f"{args.method} moved {regrown:,d} of {trained:,d} positions while training")
    else:
        chosen = next((row["step"] for row in trainer.state.log_history if "sparse/trained_values" in row), None)
        print(f"{args.method} chose its {trained:,d} positions at step {chosen}")

    adapter_dir, merged_dir = args.output_dir / "adapter", args.output_dir / "merged"  # the callback saved the adapter
    print(f"saved adapter to {adapter_dir} ({sum(f.stat().st_size for f in adapter_dir.iterdir()) / 1e6:.1f} MB)")
    merge_with_cli(model_dir(), adapter_dir, merged_dir)

    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    model.eval()
    batch = collate(tokenizer, heldout[:8], args.max_length)
    with torch.no_grad():
        diff = (merged(**batch).logits - model(**batch).logits).abs().max().item()
    print(f"max |logit difference| merged vs adapter model: {diff:.2e}")
    print(
        f"prompt: {probe}\n  expected: {heldout[0]['answer']}\n  before:   {before_text}\n  after:    {generate(merged, tokenizer, probe)}"
    )
    print(f"done in {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
