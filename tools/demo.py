"""The main job: a real sparse fine-tune of SmolLM2-135M-Instruct on WordNet definitions, then a merge.

Steps: load the bundled model; wrap every linear layer (not the head) with a sparse delta at the
LoRA-rank-16-equivalent budget; train the values with AdamW; report held-out loss before/after; save the
adapter; fold it into a new model directory with the `sparse-merge` CLI; reload that directory with plain
transformers and check its logits against the adapter model; show one generation before and after.

    python tools/demo.py [--steps 100] [--output-dir runs/demo]
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bundled_model import load_model, model_dir  # noqa: E402
from data import load_pairs  # noqa: E402

import sparse_plugin  # noqa: E402
from sparse_plugin import SparseConfig  # noqa: E402

SYSTEM = "You are a concise dictionary."


def encode(tokenizer, pair: dict) -> tuple[list[int], list[int]]:
    """Chat-formatted ids and labels; only the answer (and its end token) is learned."""
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": pair["prompt"]}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(pair["answer"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids


def collate(tokenizer, pairs: list[dict], max_length: int) -> dict[str, torch.Tensor]:
    rows = [encode(tokenizer, p) for p in pairs]
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
def heldout_loss(model, tokenizer, pairs: list[dict], batch_size: int, max_length: int) -> float:
    """Token-weighted mean loss over the answers of `pairs`."""
    model.eval()
    total = tokens = 0.0
    for start in range(0, len(pairs), batch_size):
        batch = collate(tokenizer, pairs[start : start + batch_size], max_length)
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += float(model(**batch).loss) * n
        tokens += n
    return total / tokens


@torch.no_grad()
def generate(model, tokenizer, prompt: str) -> str:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=40, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def train(model, tokenizer, pairs: list[dict], args) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 10) * (1 - s / args.steps))
    rng = random.Random(args.seed)
    model.train()
    bar = tqdm(range(args.steps), desc="train", unit="step")
    for step in bar:
        batch = collate(tokenizer, rng.sample(pairs, args.batch_size), args.max_length)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")


def merge_with_cli(base: Path, adapter: Path, output: Path) -> None:
    cli = Path(sys.executable).with_name("sparse-merge")
    command = [str(cli), "merge", "--base", str(base), "--adapter", str(adapter), "--output", str(output), "--overwrite"]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank whose parameter count the sparse budget matches")
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--heldout", type=int, default=128, help="held-out pairs used for the loss")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=Path("runs/demo"))
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    started = time.perf_counter()

    model, tokenizer = load_model()
    train_pairs = load_pairs("train")
    heldout = random.Random(args.seed).sample(load_pairs("heldout"), args.heldout)
    probe = heldout[0]["prompt"]
    print(f"data: {len(train_pairs):,d} train pairs, {args.heldout} held-out pairs used for evaluation")
    before_text = generate(model, tokenizer, probe)

    model = sparse_plugin.prepare_model(model, SparseConfig(lora_rank_equivalent=args.rank, seed=args.seed))
    sparse_plugin.print_trainable_parameters(model)
    loss_before = heldout_loss(model, tokenizer, heldout, 16, args.max_length)
    print(f"held-out loss before: {loss_before:.4f}")
    train(model, tokenizer, train_pairs, args)
    loss_after = heldout_loss(model, tokenizer, heldout, 16, args.max_length)
    print(f"held-out loss after:  {loss_after:.4f}  ({loss_after - loss_before:+.4f})")

    adapter_dir, merged_dir = args.output_dir / "adapter", args.output_dir / "merged"
    sparse_plugin.save_adapter(model, adapter_dir, base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")
    print(f"saved adapter to {adapter_dir} ({sum(f.stat().st_size for f in adapter_dir.iterdir()) / 1e6:.1f} MB)")
    merge_with_cli(model_dir(), adapter_dir, merged_dir)

    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    model.eval()
    batch = collate(tokenizer, heldout[:8], args.max_length)
    with torch.no_grad():
        diff = (merged(**batch).logits - model(**batch).logits).abs().max().item()
    print(f"max |logit difference| merged vs adapter model: {diff:.2e}")
    print(f"prompt: {probe}\n  expected: {heldout[0]['answer']}\n  before:   {before_text}\n  after:    {generate(merged, tokenizer, probe)}")
    print(f"done in {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
