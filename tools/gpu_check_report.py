"""Summarise a tools/gpu_check.sh output folder as one markdown page (printed), from whatever the steps left.

Reads `steps.txt` (exit status and seconds of each step), `junit.xml` (pytest counts and failures),
`kernels.log` (tools/benchmarks/bench_kernels.py JSON lines, so a benchmark cut short by its time limit still gives the
rows it finished), `merge.log` (bench_merge.py JSON lines) and `bnb_smoke.log`. The merge line compares
the streaming merge's throughput (shard bytes ÷ median seconds) with the device's memory bandwidth
measured by bench_kernels.py: the merge reads and writes files through host memory, so it is bounded by
the host, and the ratio says how far from the device's limit that leaves it.

Usage: python -m tools.gpu_check_report OUT_DIR > OUT_DIR/summary.md
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from tools.benchmarks.bench_kernels import markdown as kernels_markdown


def json_lines(path: Path) -> list[dict]:
    rows = []
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return rows


def pytest_section(out: Path) -> list[str]:
    junit = out / "junit.xml"
    if not junit.is_file():
        return ["pytest: no junit.xml (the step did not finish; see pytest.log)."]
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    lines = [
        f"pytest -m gpu: {counts['tests']} tests, {counts['failures']} failed, {counts['errors']} errors, "
        f"{counts['skipped']} skipped, {float(suite.get('time', 0)):.0f} s."
    ]
    for case in suite.iter("testcase"):
        problem = case.find("failure") if case.find("failure") is not None else case.find("error")
        if problem is not None:
            lines.append(
                f"- FAILED {case.get('classname')}::{case.get('name')}: {(problem.get('message') or '')[:200]}"
            )
    return lines


def merge_section(out: Path, kernels_meta: dict | None) -> list[str]:
    rows = json_lines(out / "merge.log")
    meta = next((r for r in rows if r.get("kind") == "meta"), None)
    cases = {r["case"]: r for r in rows if r.get("kind") == "row"}
    if meta is None or "merge" not in cases:
        return ["Merge benchmark: no result (see merge.log)."]
    gbps = meta["shard_bytes"] / 1e9 / cases["merge"]["median_s"]
    line = (
        f"Merge ({meta['device']}, {meta['shard_bytes'] / 1e6:.0f} MB shard, {meta['values']:,d} values): "
        f"{cases['merge']['median_s']:.2f} s, {gbps:.2f} GB/s of shard; plain file copy {cases['copy']['median_s']:.2f} s, "
        f"load+save {cases['load_save']['median_s']:.2f} s (merge ÷ copy {cases['copy']['merge_vs_this']:.2f})."
    )
    if kernels_meta:
        device_gbps = kernels_meta.get("peak_GB_per_s") or kernels_meta["copy_GB_per_s"]
        kind = "peak" if kernels_meta.get("peak_GB_per_s") else "measured copy"
        line += f" Device memory bandwidth ({kind}): {device_gbps:.0f} GB/s, so the merge runs at {100 * gbps / device_gbps:.2f}% of it."
    return [line]


def main(out: Path) -> None:
    lines = ["# GPU check", ""]
    steps = out / "steps.txt"
    lines += [
        "Steps:",
        "",
        *(f"- {s}" for s in (steps.read_text().splitlines() if steps.is_file() else ["(no steps.txt)"])),
        "",
    ]
    env = out / "env.txt"
    if env.is_file():
        lines += ["```", env.read_text().strip(), "```", ""]
    lines += pytest_section(out) + [""]
    rows = json_lines(out / "kernels.log")
    meta = next((r for r in rows if r.get("kind") == "meta"), None)
    if meta is not None:
        meta.setdefault(
            "other_cpu_share", next((r.get("other_cpu_share") for r in rows if r.get("kind") == "end"), None)
        )
        lines += [
            "## Kernels",
            "",
            kernels_markdown(
                meta, [r for r in rows if r.get("kind") == "sddmm"], [r for r in rows if r.get("kind") == "merged"]
            ),
            "",
        ]
    else:
        lines += ["Kernel benchmark: no result (see kernels.log).", ""]
    lines += ["## Merge throughput", "", *merge_section(out, meta), ""]
    smoke = [r for r in json_lines(out / "bnb_smoke.log") if r.get("kind") == "bnb_smoke"]
    lines += ["## bitsandbytes 4-bit smoke test", ""]
    if smoke:
        s = smoke[-1]
        lines.append(
            f"{s['device']}, bitsandbytes {s['bitsandbytes']}, {s['features']}² NF4 base, {s['tokens']} tokens, "
            f"{100 * s['density']:g}%: values' grad relative error {s['values_grad_rel_error']:.1e}; step "
            f"{s['step_ms']:.2f} ms vs {s['base_only_step_ms']:.2f} ms for the bare 4-bit layer "
            f"({s['step_vs_base_only']:.2f}×); checks: {', '.join(k for k, ok in s['checks'].items() if ok)}"
            + "".join(f"; FAILED {k}" for k, ok in s["checks"].items() if not ok)
            + "."
        )
    else:
        lines.append("No result (bitsandbytes not installed, or see bnb_smoke.log).")
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m tools.gpu_check_report OUT_DIR")
    main(Path(sys.argv[1]))
