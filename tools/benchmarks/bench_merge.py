"""Benchmark `merge_checkpoint` (streaming merge into safetensors) against a plain copy of the same files.

On the bundled SmolLM2-135M fp32 checkpoint (`tools/bundled_model.py`, one 538 MB `model.safetensors`),
an adapter is built once: `prepare_model` with `SparseConfig(lora_rank_equivalent=16)` on every linear
layer, random nonzero values, `save_adapter` to a temporary directory. Then, in each of `--repeats` rounds
(the three cases in a shuffled order, so a busy neighbour process slows all of them alike):

* `merge`: `merge_checkpoint(base, adapter, out, device=--device)` into a fresh directory (copies the shard's
  untargeted bytes in the kernel, reads, scatters into and writes each targeted tensor once, copies
  config/tokenizer files, renames into place).
* `copy`: `shutil.copy` of `model.safetensors` and every other file into a fresh directory, the floor for
  any tool that writes a new checkpoint.
* `load_save`: `safetensors.torch.load_file` + `save_file` of the shard with nothing changed (metadata
  kept, as the merge keeps it): the cost of the file format alone, so merge − load_save is the scatter.

Medians over the rounds, and ratios of merge to the other two. Writes are not fsynced (nor are they in
`merge_checkpoint`), and after the first round the source shard is in the page cache for every case, so this
measures CPU and memory-bandwidth cost, not the disk. Output directories are deleted between cases,
outside the timed region.

Usage (from the repository root):

    .venv/bin/python -m tools.benchmarks.bench_merge [--device cpu|cuda|auto] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sparse_plugin.config import SparseConfig
from sparse_plugin.io import save_adapter
from sparse_plugin.merge import SINGLE_FILE, merge_checkpoint
from sparse_plugin.model import iter_sparse_layers, prepare_model
from tools.benchmarks.common import OtherLoad, environment, header_lines, markdown_table
from tools.bundled_model import model_dir

CASES = ("merge", "copy", "load_save")


def build_adapter(base_dir: Path, adapter_dir: Path, rank: int, seed: int) -> dict:
    """Prepare the base at LoRA-rank-`rank` budget, fill random nonzero values, save; return a summary."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    prepare_model(model, SparseConfig(lora_rank_equivalent=rank, seed=seed))
    generator = torch.Generator().manual_seed(seed)
    layers = list(iter_sparse_layers(model))
    values = 0
    with torch.no_grad():
        for _, layer in layers:
            layer.values.copy_(torch.randn(layer.values.shape, generator=generator) * 1e-3)
            values += layer.values.numel()
    save_adapter(model, adapter_dir, base_model_name_or_path=str(base_dir))
    return {"targets": len(layers), "values": values}


def run_merge(base_dir: Path, adapter_dir: Path, out: Path, device: str) -> None:
    merge_checkpoint(base_dir, adapter_dir, out, device=device, progress=False)


def run_copy(base_dir: Path, out: Path) -> None:
    out.mkdir()
    for entry in sorted(base_dir.iterdir()):
        if entry.is_file():
            shutil.copy(entry, out / entry.name)


def run_load_save(base_dir: Path, out: Path) -> None:
    out.mkdir()
    shard = base_dir / SINGLE_FILE
    with safe_open(shard, framework="pt") as fh:
        metadata = fh.metadata()
    save_file(load_file(shard), out / SINGLE_FILE, metadata=metadata)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="merge_checkpoint's device (default %(default)s)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="rounds (default %(default)s)")
    parser.add_argument(
        "--rank", type=int, default=16, help="lora_rank_equivalent of the adapter (default %(default)s)"
    )
    parser.add_argument(
        "--model-dir", type=Path, help="a safetensors checkpoint directory (default: the bundled SmolLM2 cache)"
    )
    parser.add_argument(
        "--workdir", type=Path, help="where adapter and outputs are written (default: a new temporary directory)"
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice, one per core)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per line before the table")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    base_dir = (args.model_dir or model_dir()).resolve()
    if not (base_dir / SINGLE_FILE).is_file():
        parser.error(f"{base_dir}: no {SINGLE_FILE}; this benchmark times a single-shard checkpoint")
    # "auto" resolved as merge_checkpoint resolves it
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    meta = {"kind": "meta", **environment(device)}
    meta.update(base=str(base_dir), shard_bytes=(base_dir / SINGLE_FILE).stat().st_size)
    work = Path(tempfile.mkdtemp(prefix="bench_merge.", dir=args.workdir))
    try:
        adapter_dir = work / "adapter"
        started = time.perf_counter()
        meta.update(build_adapter(base_dir, adapter_dir, args.rank, seed=0), rank=args.rank)
        meta["adapter_build_s"] = time.perf_counter() - started
        meta["adapter_bytes"] = sum(p.stat().st_size for p in adapter_dir.iterdir())
        if args.json:
            print(json.dumps(meta), flush=True)

        runners = {
            "merge": lambda out: run_merge(base_dir, adapter_dir, out, args.device),
            "copy": lambda out: run_copy(base_dir, out),
            "load_save": lambda out: run_load_save(base_dir, out),
        }
        times: dict[str, list[float]] = {case: [] for case in CASES}
        neighbours = OtherLoad()
        order = list(CASES)
        rng = random.Random(0)
        for round_ in range(args.repeats):
            rng.shuffle(order)
            for case in order:
                out = work / f"out-{case}-{round_}"
                t0 = time.perf_counter()
                runners[case](out)
                seconds = time.perf_counter() - t0
                times[case].append(seconds)
                shutil.rmtree(out)
                if args.json:
                    print(
                        json.dumps({"kind": "sample", "case": case, "round": round_, "seconds": seconds}), flush=True
                    )
        meta["other_cpu_share"] = neighbours.share()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    medians = {case: statistics.median(t) for case, t in times.items()}
    rows = []
    for case in CASES:
        rows.append(
            {
                "kind": "row",
                "case": case,
                "median_s": medians[case],
                "min_s": min(times[case]),
                "max_s": max(times[case]),
                "repeats": len(times[case]),
                "merge_vs_this": medians["merge"] / medians[case],
                "MB_per_s": meta["shard_bytes"] / 1e6 / medians[case],
            }
        )
    if args.json:
        for row in rows:
            print(json.dumps(row))
        print(json.dumps({"kind": "end", "other_cpu_share": meta["other_cpu_share"]}))
    share = meta["other_cpu_share"]
    others = "an unknown share" if share is None else f"{100 * share:.0f}%"
    print()
    print(
        header_lines(
            meta,
            f"Other processes used {others} of the CPU while timing. Base {base_dir.name}: "
            f"{meta['shard_bytes'] / 1e6:.0f} MB fp32 shard; adapter rank-{args.rank} equivalent: {meta['targets']} "
            f"tensors, {meta['values']:,d} values, {meta['adapter_bytes'] / 1e6:.1f} MB. Page cache warm, no fsync.",
        )
    )
    print()
    table = [
        [
            r["case"],
            f"{r['median_s']:.3f}",
            f"{r['min_s']:.3f}–{r['max_s']:.3f}",
            r["repeats"],
            f"{r['MB_per_s']:.0f}",
            f"{r['merge_vs_this']:.2f}",
        ]
        for r in rows
    ]
    headers = ["case", "median s", "min–max s", "n", "MB/s of shard", "merge ÷ case"]
    print(markdown_table(headers, table, align="lrrrrr"))


if __name__ == "__main__":
    main()
