"""The README's main job, shortened: SmolLM2 sparse fine-tune, save, `sparse-merge merge`, reload, compare."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.e2e
@pytest.mark.parametrize("method", ["spiel-ma", "smt"])
def test_demo_trains_saves_merges_and_reloads(tmp_path, method):
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.demo",
            "--method",
            method,
            "--steps",
            "3",
            "--heldout",
            "16",
            "--output-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    before = float(re.search(r"held-out loss before: ([\d.]+)", out).group(1))
    after = float(re.search(r"held-out loss after:\s+([\d.]+)", out).group(1))
    assert after < before  # three steps (SMT: one warm-up step, then two updates) already move the loss down
    assert float(re.search(r"merged vs adapter model: ([\d.e+-]+)", out).group(1)) < 1e-3
    assert (tmp_path / "adapter" / "sparse_adapter.safetensors").is_file()
    assert (tmp_path / "merged" / "model.safetensors").is_file() and (tmp_path / "merged" / "tokenizer.json").is_file()
    assert "trainable params: 4,884,480" in out  # LoRA r=16 on all 210 linear layers of SmolLM2-135M
