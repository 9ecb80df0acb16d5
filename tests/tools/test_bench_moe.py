"""tools/benchmarks/bench_moe.py, smoke: two paired steps of a tiny Qwen3-MoE per method, equal trainable counts for
SpIEL-MA and LoRA on the fused experts, the peak-memory child, the table."""

import json

import pytest

from tools.benchmarks import bench_moe

TINY = ["--hidden", "64", "--layers", "1", "--heads", "2", "--kv-heads", "1", "--head-dim", "32", "--experts", "4"]
TINY += ["--moe-intermediate", "32", "--vocab", "128", "--batch", "2", "--seq", "16", "--rank", "2"]


def test_two_paired_steps(capsys):
    assert bench_moe.main([*TINY, "--steps", "2", "--warmup", "1", "--threads", "1", "--json"]) == 0
    out = capsys.readouterr().out
    result = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    methods = result["methods"]
    assert list(methods) == ["spiel-ma", "lora", "full"] and result["threads"] == 1
    # r·E·(in + out) per expert tensor, both ways: gate_up [4, 64, 64], down [4, 64, 32]
    assert methods["spiel-ma"]["trainable"] == methods["lora"]["trainable"] == 2 * 4 * (128 + 96)
    assert methods["full"]["trainable"] > methods["lora"]["trainable"]
    assert set(result["ratios"]) == {"spiel-ma / lora", "spiel-ma / full", "lora / full"}
    assert all(r["median"] > 0 for r in result["ratios"].values())
    assert "| SpIEL-MA (SM3) | 1,792 |" in out and "1 torch threads" in out


def test_memory_child_reports_a_peak(capsys):
    assert bench_moe.main([*TINY, "--memory-child", "lora", "--memory-steps", "1"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["method"] == "lora" and row["peak_mem_mb"] >= 0


def test_unknown_method_is_refused(capsys):
    with pytest.raises(SystemExit):
        bench_moe.main(["--methods", "dora"])
    assert "unknown --methods ['dora']" in capsys.readouterr().err
