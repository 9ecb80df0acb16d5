"""Running `sparse-merge` in tests: argv builders, an in-process runner, and the one check every refusal must pass,
in-process or in a subprocess: exit code 2, nothing on stdout, exactly one stderr line naming the problem."""

from __future__ import annotations

import re
import select
import subprocess
import sys
from pathlib import Path

import pytest

from sparse_plugin.cli import main


def run(capsys, *argv) -> tuple[int, str, str]:
    """`sparse-merge *argv` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()  # drop what the setup printed (save_pretrained's progress bar)
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def merge_argv(base, adapter, out, *extra) -> list:
    return ["merge", "--base", base, "--adapter", adapter, "--output", out, "--device", "cpu", *extra]


def unmerge_argv(merged, adapter, out, *extra) -> list:
    return ["unmerge", "--merged", merged, "--adapter", adapter, "--output", out, "--device", "cpu", *extra]


def assert_refused(code: int, out: str, err: str, message: str) -> None:
    """A refusal: exit code 2, no stdout, one `sparse-merge: error: ` line on stderr matching regex `message`."""
    assert code == 2, (code, err)
    assert out == ""
    lines = err.splitlines()  # splits on "\r" too, so a stray progress bar would show up here
    assert len(lines) == 1 and err.endswith("\n"), err
    assert lines[0].startswith("sparse-merge: error: "), err
    assert re.search(message, lines[0]), (message, err)


# `sparse-merge` in a subprocess whose shard writer writes half of the second shard and then stalls, so the test can
# signal or SIGKILL it mid-merge at a known point, with no hook in the package itself.
_STALLING_MERGE = """
import sys, time
sys.path.insert(0, {tests!r})
import sparse_plugin.merge
from adapter_utils import rewrite_failing_at
from sparse_plugin.cli import main

def stall():
    print("stalled", flush=True)
    time.sleep(600)

sparse_plugin.merge.rewrite_shard = rewrite_failing_at(2, stall)
sys.exit(main(sys.argv[1:]))
"""


def start_stalled_merge(argv) -> subprocess.Popen:
    """`sparse-merge *argv` in a subprocess, returned once it stalls half-way through writing its second shard."""
    script = _STALLING_MERGE.format(tests=str(Path(__file__).parent))
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *map(str, argv)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    ready, _, _ = select.select([proc.stdout], [], [], 300)  # a crash gives EOF at once; 300 s only bounds a hang
    line = proc.stdout.readline() if ready else ""
    if line != "stalled\n":
        proc.kill()
        pytest.fail(f"the merge did not reach its second shard: {proc.communicate()[1]}")
    return proc
