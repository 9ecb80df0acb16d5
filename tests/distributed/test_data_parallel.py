"""Two CPU processes on gloo (torchrun) under DDP, FSDP1 (FULL_SHARD, use_orig_params) and FSDP2: every rank ends
with the same indices and values, equal to one process training on the whole global batch (within fp tolerance),
for each selection method; under FSDP the adapter saved from rank 0 carries the base entries gathered from the shards.
Under DDP the same holds for non-Linear targets (fused MoE experts, GPT-2's Conv1D)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama

from sparse_plugin import AdapterError, iter_sparse_layers, load_adapter, read_adapter
from sparse_plugin.integrations.checkpoints import holds_model_weights
from tools.benchmarks import memory_model as mm

JOB = Path(__file__).with_name("train_job.py")
sys.path.insert(0, str(JOB.parent))
import train_job  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
# tests/conftest.py's tiny Llama, for the memory model
TINY = mm.Arch("tiny", hidden=48, intermediate=80, layers=2, heads=4, kv_heads=2, vocab=97)
JOB_METHODS = ["ma", "ag", "sift", "smt"]  # train_job.JOB_RECIPES' names


def _run(out: Path, method: str, *extra: str, processes: int = 2) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command = (launcher if processes > 1 else [sys.executable]) + [str(JOB), str(out), method, *extra]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}  # the checkout under test
    run = subprocess.run(command, check=False, capture_output=True, text=True, timeout=600, env=env)
    # torchrun's summary fills the tail of stderr: show the first rank's traceback, which names the cause.
    first = run.stderr.find("Traceback")
    assert run.returncode == 0, run.stderr[first : first + 6000] if first >= 0 else run.stderr[-3000:]


def _result(path: Path) -> dict:
    return torch.load(path)


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """One process on whole batches, per method: the reference every multi-process run must equal."""
    root = tmp_path_factory.mktemp("single")
    cache = {}

    def layers(method: str, model: str = "llama") -> dict:
        if (method, model) not in cache:
            _run(root / f"{method}-{model}", method, "--model", model, processes=1)
            cache[method, model] = _result(root / f"{method}-{model}" / "rank0.pt")["layers"]
        return cache[method, model]

    return layers


def _assert_ranks_agree_with(reference: dict, rank0: dict, rank1: dict) -> None:
    for key, (indices, values) in reference.items():
        assert torch.equal(rank0[key][0], rank1[key][0]) and torch.equal(rank0[key][1], rank1[key][1]), key
        assert torch.equal(rank0[key][0], indices), key
        torch.testing.assert_close(rank0[key][1], values, rtol=1e-5, atol=1e-6)
    assert any(v.count_nonzero() for _, v in reference.values())


@pytest.mark.parametrize("wrap", ["ddp", "fsdp1", "fsdp2"])
@pytest.mark.parametrize("method", JOB_METHODS)
def test_ranks_agree_and_match_one_process(tmp_path, single_process, method, wrap):
    _run(tmp_path, method, "--wrap", wrap)
    rank0, rank1 = _result(tmp_path / "rank0.pt"), _result(tmp_path / "rank1.pt")
    assert rank0["fsdp"] == rank1["fsdp"] == wrap.startswith("fsdp")
    _assert_ranks_agree_with(single_process(method), rank0["layers"], rank1["layers"])
    # What each rank holds of the frozen base: all of it under DDP, half under FSDP (plus shard padding), as the
    # memory model's `weights` term says.
    whole = mm.weight_bytes(TINY, mm.Setting(dtype="fp32"), "spiel-ma")  # the same for every sparse method
    predicted = mm.estimate(TINY, "spiel-ma", mm.Setting(dtype="fp32", device="cpu", shards=2)).components["weights"]
    for rank in (rank0, rank1):
        assert rank["base_bytes"] == whole if wrap == "ddp" else abs(rank["base_bytes"] - predicted) <= 0.01 * whole
    if wrap.startswith("fsdp"):  # load_adapter checks the stored base entries against an unsharded base
        loaded = dict(iter_sparse_layers(load_adapter(tiny_llama(), tmp_path / "adapter")))
        assert all(torch.equal(loaded[k].values.detach(), v) for k, (_, v) in rank0["layers"].items())


@pytest.mark.parametrize(("method", "model"), [("ma", "qwen3-moe"), ("ag", "qwen3-moe"), ("sift", "gpt2")])
def test_ddp_on_non_linear_targets_agrees_with_one_process(tmp_path, single_process, method, model):
    """Fused experts `[E, out, in]` (target_parameters) and Conv1D weights: merged-resident weights whose values get
    their gradient through `SparseParameterFunction`; DDP reduces it, the selection statistics are summed over
    ranks, so both ranks pick the positions one process picks on the whole batch."""
    _run(tmp_path, method, "--wrap", "ddp", "--model", model)
    rank0, rank1 = _result(tmp_path / "rank0.pt"), _result(tmp_path / "rank1.pt")
    reference = single_process(method, model)
    assert reference and all(("experts" in k) if model == "qwen3-moe" else (".c_" in k) for k in reference)
    _assert_ranks_agree_with(reference, rank0["layers"], rank1["layers"])
    initial = dict(iter_sparse_layers(train_job.start(method, 1, "ddp", arch=model)[0]))
    assert any(not torch.equal(initial[k].indices, indices) for k, (indices, _) in reference.items())  # reselected


@pytest.mark.parametrize("wrap", ["fsdp1", "fsdp2"])
def test_fsdp_keeps_fused_experts_whole_and_agrees_with_one_process(tmp_path, single_process, wrap):
    """FSDP shards the rest of a Qwen3-MoE while the targeted expert tensors stay whole on every rank (the modules
    `keep_deltas_replicated` returns are ignored), so their weight can hold W0 + Δ as under DDP."""
    _run(tmp_path, "ma", "--wrap", wrap, "--model", "qwen3-moe")
    rank0, rank1 = _result(tmp_path / "rank0.pt"), _result(tmp_path / "rank1.pt")
    assert rank0["fsdp"] and rank1["fsdp"]
    _assert_ranks_agree_with(single_process("ma", "qwen3-moe"), rank0["layers"], rank1["layers"])


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory):
    """SpIEL-AG through the Trainer under DDP, FSDP1 and FSDP2: the output directory and both ranks' results."""
    root = tmp_path_factory.mktemp("trainer")
    runs = {}
    for wrap in ("ddp", "fsdp1", "fsdp2"):
        _run(root / wrap, "ag", "--trainer", "--wrap", wrap)
        runs[wrap] = root / wrap, [_result(root / wrap / f"rank{r}.pt") for r in (0, 1)]
    return runs


def test_trainer_under_ddp_fsdp1_and_fsdp2_trains_alike_and_saves_one_adapter_from_rank_zero(trainer_runs):
    """Two micro-batches per step, so averaging over ranks meets gradient accumulation, with gradient checkpointing;
    the Trainer's clipping (`max_grad_norm`) sees averaged gradients under all three."""
    runs = {wrap: results for wrap, (_, results) in trainer_runs.items()}
    for wrap, (out, _) in trainer_runs.items():
        assert sorted(p.name for p in out.glob("sparse_*")) == ["sparse_adapter.safetensors", "sparse_config.json"]
        assert [r["fsdp"] for r in runs[wrap]] == [wrap != "ddp"] * 2
    for wrap in ("fsdp1", "fsdp2"):
        _assert_ranks_agree_with(runs["ddp"][0]["layers"], *(r["layers"] for r in runs[wrap]))
        loaded = dict(iter_sparse_layers(load_adapter(tiny_llama(), trainer_runs[wrap][0])))
        assert all(torch.equal(loaded[k].values.detach(), v) for k, (_, v) in runs[wrap][0]["layers"].items())


def test_trainer_under_fsdp_without_base_values_records_the_base_digests(tmp_path):
    """With store_base_values=False the adapter still checks its base: the entries FSDP shards are gathered for the
    sha256 digests alone, so the adapter loads onto its own base and refuses another one."""
    _run(tmp_path, "ag", "--trainer", "--wrap", "fsdp2", "--no-base-values")
    adapter = read_adapter(tmp_path)
    assert not adapter.has_base_values
    assert all(t.base_sha256 is not None for t in adapter.targets.values())
    load_adapter(tiny_llama(), tmp_path)
    with pytest.raises(AdapterError):
        load_adapter(tiny_llama(seed=1), tmp_path)


@pytest.mark.parametrize("wrap", ["fsdp1", "fsdp2"])
def test_trainer_under_fsdp_resumes_bit_exact_from_an_adapter_only_checkpoint(tmp_path, trainer_runs, wrap):
    """The checkpoint halfway holds the adapter (rank 0 wrote it, with base entries gathered from the shards) and the
    Trainer's state, no model; resuming from a copy of it ends where the uninterrupted run ended."""
    out, (rank0, _) = trainer_runs[wrap]
    checkpoint = out / "checkpoint-4"
    assert not holds_model_weights(checkpoint) and (checkpoint / "sparse_adapter.safetensors").is_file()
    assert read_adapter(checkpoint).has_base_values
    copy = shutil.copytree(checkpoint, tmp_path / "checkpoint-4")
    _run(tmp_path, "ag", "--trainer", "--wrap", wrap, "--resume", str(copy))
    resumed = _result(tmp_path / "rank0.pt")["layers"]
    for key, (indices, values) in rank0["layers"].items():
        assert torch.equal(resumed[key][0], indices) and torch.equal(resumed[key][1], values), key
