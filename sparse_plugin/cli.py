"""`sparse-merge`: merge, unmerge, inspect and export sparse adapters from the command line.

Every refusal is one line on stderr and exit code 2, with no output directory left behind. SIGTERM, SIGINT and
SIGHUP are refusals too: the run unwinds, removes what it had written, and exits the same way. Models and
adapters may be Hub repo ids (`org/name`), found through huggingface_hub's cache as `from_pretrained` finds them;
an existing local directory always wins.
"""

from __future__ import annotations

import argparse
import json
import sys

_HUB_HELP = "Hub revision (branch, tag or commit) when {} is a repo id; tokens come from `hf auth login` or HF_TOKEN"
_ROUNDING_FIX = "to keep them, merge into an fp32 copy of the base or serve the adapter unmerged (load_adapter)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparse-merge", description="Fold sparse adapters into safetensors checkpoints and back."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    merge = sub.add_parser(
        "merge",
        help="write BASE + adapter as a new model directory",
        description="Stream BASE shard by shard, add the adapter's deltas, write OUTPUT atomically.",
    )
    merge.add_argument(
        "--base", required=True, metavar="MODEL_DIR", help="base checkpoint directory (safetensors) or Hub repo id"
    )
    merge.add_argument("--base-revision", metavar="REV", help=_HUB_HELP.format("--base"))
    unmerge = sub.add_parser(
        "unmerge",
        help="restore the base from a merged model directory",
        description="Remove the adapter from MERGED: bit-exact with stored base values, else by subtraction.",
    )
    unmerge.add_argument(
        "--merged", required=True, metavar="MODEL_DIR", help="merged checkpoint directory or Hub repo id"
    )
    unmerge.add_argument("--merged-revision", metavar="REV", help=_HUB_HELP.format("--merged"))
    for command in (merge, unmerge):
        command.add_argument(
            "--adapter",
            required=True,
            metavar="ADAPTER_DIR",
            help="directory written by save_adapter, a PEFT SHiRA or Super-Tuning adapter directory, or a Hub repo id",
        )
        command.add_argument("--adapter-revision", metavar="REV", help=_HUB_HELP.format("--adapter"))
        command.add_argument(
            "--output", required=True, metavar="OUT_DIR", help="new directory to write (must not exist)"
        )
        command.add_argument(
            "--device",
            choices=("auto", "cpu", "cuda"),
            default="auto",
            help="where to scatter: cuda uses the Triton kernel (default: auto)",
        )
        command.add_argument(
            "--force", action="store_true", help="accept a base whose dtypes or weights differ from training"
        )
        command.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
        command.add_argument("--quiet", action="store_true", help="no progress bar")

    inspect = sub.add_parser(
        "inspect",
        help="summarise an adapter",
        description="Per target: shape, count, density, deltas a merge into the base would round away, |delta| mean/max.",
    )
    inspect.add_argument("adapter", metavar="ADAPTER_DIR")
    inspect.add_argument("--json", action="store_true", help="print one JSON object instead of a table")

    export = sub.add_parser(
        "export-peft",
        help="write the adapter as a stock PEFT adapter",
        description="Write ADAPTER as a PEFT Super-Tuning or SHiRA adapter directory that "
        "PeftModel.from_pretrained loads without sparse_plugin, with the same logits.",
    )
    export.add_argument("adapter", metavar="ADAPTER_DIR")
    export.add_argument("output", metavar="OUT_DIR", help="new PEFT adapter directory (must not exist)")
    export.add_argument(
        "--format",
        choices=("supertuning", "shira"),
        default="supertuning",  # peft_interop.FORMATS
        help="supertuning: one sparsity for all targets; shira: one rank r, r*(in+out) positions per target "
        "(default: supertuning)",
    )
    export.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    for command in (inspect, export):
        command.add_argument("--revision", metavar="REV", help=_HUB_HELP.format("ADAPTER_DIR"))
    return parser


def summarize(adapter_dir: str) -> dict:
    """Per-target and total statistics of an adapter (what `inspect` prints).

    `rounded_away` counts the deltas a merge into the base's own (bf16/fp16) weights would lose, from the stored
    base values; it is None when the adapter has none, as the base's entries are then unknown. A target of stacked
    matrices (fused MoE experts, `[E, out, in]`) also has `per_matrix_counts`: the trained values in each expert.
    """
    import math

    import torch

    from .io import read_adapter
    from .merge import rounded_away

    adapter = read_adapter(adapter_dir)
    targets, total_count, total_size, abs_sum, abs_max, total_lost = [], 0, 0, 0.0, 0.0, 0
    for key, target in adapter.targets.items():
        size = math.prod(target.shape)
        magnitude = target.values.float().abs()
        count = target.indices.numel()
        lost = None if target.base_values is None else rounded_away(target.base_values, target.values)
        targets.append(
            {
                "name": key,
                "shape": list(target.shape),
                "count": count,
                "density": count / size,
                "rounded_away": lost,
                "abs_mean": float(magnitude.mean()) if count else 0.0,
                "abs_max": float(magnitude.max()) if count else 0.0,
            }
        )
        if len(target.shape) > 2:
            matrix = target.shape[-2] * target.shape[-1]
            per_matrix = torch.bincount(target.indices // matrix, minlength=size // matrix)
            targets[-1]["per_matrix_counts"] = per_matrix.tolist()
        total_count, total_size, total_lost = total_count + count, total_size + size, total_lost + (lost or 0)
        abs_sum, abs_max = abs_sum + float(magnitude.sum()), max(abs_max, targets[-1]["abs_max"])
    return {
        "adapter": str(adapter.path),
        "base_model": adapter.base_model,
        "method": adapter.config.method,
        "format": adapter.meta["format"],
        "has_base_values": adapter.has_base_values,
        "targets": targets,
        "total": {
            "count": total_count,
            "size": total_size,
            "density": total_count / total_size if total_size else 0.0,
            "rounded_away": total_lost if adapter.has_base_values else None,
            "abs_mean": abs_sum / total_count if total_count else 0.0,
            "abs_max": abs_max,
        },
    }


def _print_summary(summary: dict) -> None:
    print(f"adapter: {summary['adapter']}  method: {summary['method']}  base model: {summary['base_model']}")
    print(f"{'target':<60} {'shape':>13} {'count':>10} {'density':>8} {'rounded':>8} {'|d| mean':>10} {'|d| max':>10}")
    for t in summary["targets"] + [dict(summary["total"], name="total", shape=None)]:
        shape = "x".join(map(str, t["shape"])) if t["shape"] else ""
        lost = "n/a" if t["rounded_away"] is None else f"{t['rounded_away']:,d}"
        print(
            f"{t['name']:<60} {shape:>13} {t['count']:>10,d} {t['density']:>8.4f} {lost:>8} {t['abs_mean']:>10.3e} {t['abs_max']:>10.3e}"
        )
        if "per_matrix_counts" in t:
            print(f"  per expert: {' '.join(f'{c:,d}' for c in t['per_matrix_counts'])}")
    total = summary["total"]
    if total["rounded_away"] is None:
        print(
            "note: `rounded` cannot be computed without the base's values at the indices, which this adapter does "
            "not store (store_base_values=False); sparse-merge merge counts them against the base"
        )
    elif total["rounded_away"]:
        print(
            f"note: {total['rounded_away']:,d} of {total['count']:,d} deltas round away when merged into the base's "
            f"16-bit weights; {_ROUNDING_FIX}"
        )


def rounded_away_warning(result: dict) -> str | None:
    """What to warn of when the base's bf16/fp16 rounding swallowed deltas (the merge succeeds, but lacks them)."""
    lost = result["rounded_away"]
    if not lost:
        return None
    worst = max(lost, key=lost.get)
    return (
        f"{sum(lost.values()):,d} of {result['values']:,d} deltas rounded away in the base's 16-bit weights "
        f"(most in `{worst}`: {lost[worst]:,d}); {_ROUNDING_FIX}"
    )


def run_merge(model_dir, adapter_dir, output_dir, **options) -> dict:
    """`merge.merge_checkpoint` as `sparse-merge` runs it (and Axolotl's `sparse_merge_on_finish`): on one thread,
    with SIGTERM/SIGINT/SIGHUP raising `Interrupted` so that they unwind through the output's cleanup."""
    import torch

    from .atomic import signals_as_errors
    from .merge import merge_checkpoint

    # One thread while merging: the CPU scatter is a few million indexed writes, too little work to share,
    # and OpenMP's spinning threads lose badly to any other load on the cores (see tools/benchmarks/bench_merge.py).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # Armed before anything is written, so a signal at any point unwinds through the output's cleanup; once
    # the output is in place, the defaults are back (a signal then can only cut the summary short).
    try:
        with signals_as_errors():
            return merge_checkpoint(model_dir, adapter_dir, output_dir, **options)
    finally:
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Imported once the arguments are parsed: `--help` and usage errors then answer without loading torch.
    from .atomic import Interrupted, signals_as_errors
    from .hub import resolve_adapter, resolve_model
    from .io import AdapterError
    from .peft_interop import export_peft

    try:
        if args.command == "inspect":
            summary = summarize(resolve_adapter(args.adapter, revision=args.revision))
            print(json.dumps(summary, indent=2)) if args.json else _print_summary(summary)
            return 0
        if args.command == "export-peft":
            with signals_as_errors():
                result = export_peft(
                    resolve_adapter(args.adapter, revision=args.revision), args.output, args.format, args.overwrite
                )
            setting = f"sparsity={result['sparsity']!r}" if args.format == "supertuning" else f"r={result['r']}"
            print(
                f"exported {result['positions']:,d} positions ({result['padding']:,d} of them padding at 0) as PEFT "
                f"{args.format} with {setting} -> {args.output}"
            )
            return 0
        unmerge = args.command == "unmerge"
        model = resolve_model(
            args.merged if unmerge else args.base, revision=args.merged_revision if unmerge else args.base_revision
        )
        adapter = resolve_adapter(args.adapter, revision=args.adapter_revision)
        result = run_merge(
            model,
            adapter,
            args.output,
            unmerge=unmerge,
            device=args.device,
            force=args.force,
            overwrite=args.overwrite,
            progress=not args.quiet,
        )
    except (AdapterError, OSError, Interrupted) as err:
        print(f"sparse-merge: error: {err}", file=sys.stderr)
        return 2
    how = ""
    if unmerge:
        how = (
            " exactly, from stored base values"
            if result["exact"]
            else " by subtraction (approximate: the adapter has no base values)"
        )
    print(
        f"{args.command}d {result['values']:,d} values in {result['tensors']} tensors over {result['shards']} shard(s){how} "
        f"on {result['device']} in {result['seconds']:.1f}s -> {args.output}"
    )
    if warning := rounded_away_warning(result):
        print(f"sparse-merge: warning: {args.output}: {warning}", file=sys.stderr)
    for name in result["skipped_files"]:
        print(f"note: {name} (another weight format) was not copied; it would hold unmerged weights")
    return 0


if __name__ == "__main__":
    sys.exit(main())
