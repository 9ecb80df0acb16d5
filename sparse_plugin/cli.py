"""`sparse-merge`: merge, unmerge and inspect sparse adapters from the command line.

Every refusal is one line on stderr and exit code 2, with no output directory left behind.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from .io import AdapterError, read_adapter
from .merge import apply_adapter


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparse-merge", description="Fold sparse adapters into safetensors checkpoints and back.")
    sub = parser.add_subparsers(dest="command", required=True)

    merge = sub.add_parser("merge", help="write BASE + adapter as a new model directory",
                           description="Stream BASE shard by shard, add the adapter's deltas, write OUTPUT atomically.")
    merge.add_argument("--base", required=True, metavar="MODEL_DIR", help="base checkpoint directory (safetensors)")
    unmerge = sub.add_parser("unmerge", help="restore the base from a merged model directory",
                             description="Remove the adapter from MERGED: bit-exact with stored base values, else by subtraction.")
    unmerge.add_argument("--merged", required=True, metavar="MODEL_DIR", help="merged checkpoint directory")
    for command in (merge, unmerge):
        command.add_argument("--adapter", required=True, metavar="ADAPTER_DIR", help="directory written by save_adapter")
        command.add_argument("--output", required=True, metavar="OUT_DIR", help="new directory to write (must not exist)")
        command.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                             help="where to scatter: cuda uses the Triton kernel (default: auto)")
        command.add_argument("--force", action="store_true", help="accept a base whose dtypes or weights differ from training")
        command.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
        command.add_argument("--quiet", action="store_true", help="no progress bar")

    inspect = sub.add_parser("inspect", help="summarise an adapter", description="Per target: shape, count, density, |delta| mean/max.")
    inspect.add_argument("adapter", metavar="ADAPTER_DIR")
    inspect.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return parser


def summarize(adapter_dir: str) -> dict:
    """Per-target and total statistics of an adapter (what `inspect` prints)."""
    adapter = read_adapter(adapter_dir)
    targets, total_count, total_size, abs_sum, abs_max = [], 0, 0, 0.0, 0.0
    for key, target in adapter.targets.items():
        size = target.shape[0] * target.shape[1]
        magnitude = target.values.float().abs()
        count = target.indices.numel()
        targets.append({
            "name": key, "shape": list(target.shape), "count": count, "density": count / size,
            "abs_mean": float(magnitude.mean()) if count else 0.0, "abs_max": float(magnitude.max()) if count else 0.0,
        })
        total_count, total_size = total_count + count, total_size + size
        abs_sum, abs_max = abs_sum + float(magnitude.sum()), max(abs_max, targets[-1]["abs_max"])
    return {
        "adapter": str(adapter.path), "base_model": adapter.base_model, "method": adapter.config.method,
        "format": adapter.meta["format"], "has_base_values": adapter.has_base_values, "targets": targets,
        "total": {"count": total_count, "size": total_size, "density": total_count / total_size if total_size else 0.0,
                  "abs_mean": abs_sum / total_count if total_count else 0.0, "abs_max": abs_max},
    }


def _print_summary(summary: dict) -> None:
    print(f"adapter: {summary['adapter']}  method: {summary['method']}  base model: {summary['base_model']}")
    print(f"{'target':<60} {'shape':>13} {'count':>10} {'density':>8} {'|d| mean':>10} {'|d| max':>10}")
    for t in summary["targets"] + [dict(summary["total"], name="total", shape=None)]:
        shape = "x".join(map(str, t["shape"])) if t["shape"] else ""
        print(f"{t['name']:<60} {shape:>13} {t['count']:>10,d} {t['density']:>8.4f} {t['abs_mean']:>10.3e} {t['abs_max']:>10.3e}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "inspect":
            summary = summarize(args.adapter)
            print(json.dumps(summary, indent=2)) if args.json else _print_summary(summary)
            return 0
        unmerge = args.command == "unmerge"
        # The CPU scatter is a few million indexed writes, too little work to share between threads: with one
        # core busy elsewhere, OpenMP's spinning made the SmolLM2 merge 14.6 s instead of 1.1 s single-threaded
        # (tools/bench_merge.py, 2 cores); so one thread while merging.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            result = apply_adapter(
                args.merged if unmerge else args.base, args.adapter, args.output, unmerge=unmerge,
                device=args.device, force=args.force, overwrite=args.overwrite, progress=not args.quiet,
            )
        finally:
            torch.set_num_threads(threads)
    except (AdapterError, OSError) as err:
        print(f"sparse-merge: error: {err}", file=sys.stderr)
        return 2
    how = ""
    if unmerge:
        how = " exactly, from stored base values" if result["exact"] else " by subtraction (approximate: the adapter has no base values)"
    print(f"{args.command}d {result['values']:,d} values in {result['tensors']} tensors over {result['shards']} shard(s){how} "
          f"on {result['device']} in {result['seconds']:.1f}s -> {args.output}")
    for name in result["skipped_files"]:
        print(f"note: {name} (another weight format) was not copied; it would hold unmerged weights")
    return 0


if __name__ == "__main__":
    sys.exit(main())
