"""Exact resume after a real SIGKILL from adapter-only checkpoints: the resumed run's losses, indices and values
equal an uninterrupted run's, for every selection method."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

JOB = Path(__file__).with_name("kill_and_resume_job.py")
REPO = Path(__file__).resolve().parents[2]
# What a checkpoint holds: the adapter (with its model card) and the Trainer's state, no copy of the model.
CHECKPOINT_FILES = {
    "sparse_config.json",
    "sparse_adapter.safetensors",
    "README.md",
    "optimizer.pt",
    "scheduler.pt",
    "rng_state.pth",
    "trainer_state.json",
    "training_args.bin",
}


def _run(out: Path, method: str, *extra: str) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(REPO)}  # the checkout under test, not another installed copy
    return subprocess.run(
        [sys.executable, str(JOB), str(out), method, *extra],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


@pytest.mark.parametrize("method, kill_after", [("ma", 3), ("ag", 3), ("smt", 2), ("sift", 2)])
def test_killed_run_resumes_bit_exact(tmp_path, method, kill_after):
    full = _run(tmp_path / "full", method)
    assert full.returncode == 0, full.stderr[-2000:]
    killed = _run(tmp_path / "killed", method, "--kill-after", str(kill_after))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    checkpoint = tmp_path / "killed" / f"checkpoint-{kill_after}"
    assert {p.name for p in checkpoint.iterdir()} == CHECKPOINT_FILES
    resumed = _run(tmp_path / "killed", method, "--resume", str(checkpoint))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected, got = (torch.load(d / "result.pt") for d in (tmp_path / "full", tmp_path / "killed"))
    later = {step: loss for step, loss in expected["losses"].items() if step > kill_after}
    assert {step: got["losses"][step] for step in later} == later  # bit for bit on CPU fp32
    for key, (indices, values) in expected["layers"].items():
        assert torch.equal(got["layers"][key][0], indices), key
        assert torch.equal(got["layers"][key][1], values), key
