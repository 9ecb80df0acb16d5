"""Two CPU processes on gloo (torchrun): every rank ends with the same indices and values, equal to one process
training on the whole global batch (within fp tolerance), for each selection method."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

JOB = Path(__file__).with_name("ddp_job.py")


def _run(out: Path, method: str, *extra: str, processes: int = 2) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command = (launcher if processes > 1 else [sys.executable]) + [str(JOB), str(out), method, *extra]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]


def _layers(path: Path) -> dict:
    return torch.load(path)["layers"]


@pytest.mark.parametrize("method", ["ma", "ag", "sift", "smt"])
def test_ranks_agree_and_match_one_process(tmp_path, method):
    _run(tmp_path / "ddp", method)
    _run(tmp_path / "single", method, processes=1)
    rank0, rank1 = _layers(tmp_path / "ddp" / "rank0.pt"), _layers(tmp_path / "ddp" / "rank1.pt")
    single = _layers(tmp_path / "single" / "rank0.pt")
    for key, (indices, values) in single.items():
        assert torch.equal(rank0[key][0], rank1[key][0]) and torch.equal(rank0[key][1], rank1[key][1]), key
        assert torch.equal(rank0[key][0], indices), key
        torch.testing.assert_close(rank0[key][1], values, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(v, torch.zeros_like(v)) for _, v in single.values())


def test_trainer_under_ddp_saves_one_adapter_from_rank_zero(tmp_path):
    _run(tmp_path, "ag", "--trainer")
    rank0, rank1 = _layers(tmp_path / "rank0.pt"), _layers(tmp_path / "rank1.pt")
    assert all(torch.equal(rank0[k][0], rank1[k][0]) and torch.equal(rank0[k][1], rank1[k][1]) for k in rank0)
    assert sorted(p.name for p in tmp_path.glob("sparse_*")) == ["sparse_adapter.safetensors", "sparse_config.json"]
