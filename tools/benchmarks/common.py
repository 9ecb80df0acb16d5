"""What every benchmark shares: the environment it ran in, the header line that states it, markdown tables, the
share of the machine other processes used meanwhile, and the timing statistics.

Imports no torch at module level, so the torch-free `memory_model` can use the tables too.
"""

from __future__ import annotations

import datetime
import os
import platform
import random
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

try:  # Linux only; OtherLoad degrades to None elsewhere
    import resource
except ImportError:  # pragma: no cover
    resource = None

ALIGNMENT = {"l": "---", "r": "---:", "c": ":-:"}


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else what `platform` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device="cpu") -> dict:
    """Versions, device and host of this run: one dict, stored with the results and stated by `header_lines`."""
    import torch

    device = torch.device(device)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "triton": _version("triton"),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }


def header_lines(env: dict, note: str = "") -> str:
    """One line stating `environment()`'s result, then `note` on its own line."""
    versions = " · ".join(f"{name} {env[name]}" for name in ("torch", "transformers", "peft", "triton") if env[name])
    host = f"{env['cpu']}, {env['cores']} cores, {env['threads']} torch threads"
    device = host if env["device"] == "cpu" else f"{env['device_name']}; host {host}"
    text = f"{env['date']} · {versions} · device {env['device']} ({device})"
    return text + (f"\n{note}" if note else "")


def markdown_table(headers: list[str], rows: list[list], align: str = "") -> str:
    """A markdown table; `align` has one letter per column, l(eft), r(ight) or c(entre) (default: left)."""
    marks = [ALIGNMENT[align[i]] if i < len(align) else ALIGNMENT["l"] for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(marks) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def ratio(a, b) -> str:
    if a is None or b is None or not b:
        return "–"
    return f"{a / b:.2f}×"


def percentile(samples: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    ordered = sorted(samples)
    if not ordered:
        return float("nan")
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def interleaved_rounds(items: list, repeats: int, min_repeats: int, budget_s: float, seed: int):
    """Yield `items` round after round, each round in a fresh seeded random order, for `repeats` rounds or until
    `budget_s` seconds have passed (never fewer than `min_repeats`): drift on a shared box hits every item alike."""
    order = list(items)
    rng = random.Random(seed)
    started = time.perf_counter()
    for done in range(repeats):
        if done >= min_repeats and time.perf_counter() - started > budget_s:
            return
        rng.shuffle(order)
        yield from order


class OtherLoad:
    """CPU share that other processes used while we ran: /proc/stat busy time minus our own rusage and that of
    our waited-for children (a driver's subprocesses), as a share of the machine (1.0 = every core busy with
    someone else's work). The load average would count our own work too; this counts only the neighbours.
    Linux only (None elsewhere).
    """

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        if resource is None:
            return None
        try:
            fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
        except (OSError, ValueError, IndexError):
            return None
        busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
        own = sum(
            u.ru_utime + u.ru_stime
            for u in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
        )
        return time.perf_counter(), busy, own

    def share(self) -> float | None:
        end = self._sample()
        if self.start is None or end is None or end[0] <= self.start[0]:
            return None
        other = (end[1] - self.start[1]) - (end[2] - self.start[2])
        return max(0.0, other) / ((end[0] - self.start[0]) * (os.cpu_count() or 1))
