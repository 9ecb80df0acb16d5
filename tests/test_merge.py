"""In-memory merge/unmerge (sparse_plugin.model) and the streaming checkpoint merge (sparse_plugin.merge), against
plain torch references: a dense W0 + scatter(Δ) built in the test, and the base files themselves."""

import gc
import json
from pathlib import Path

import pytest
import torch
from adapter_utils import (
    IDX,
    KEY,
    TINY,
    base_state,
    dense_reference,
    hub_cache_layout,
    logits,
    read_checkpoint,
    rounded_away_reference,
    saved_setup,
    tiny_deltas,
    trained_model,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from sparse_plugin import iter_sparse_layers, merge_adapter, unmerge_adapter
from sparse_plugin.io import WEIGHTS_NAME
from sparse_plugin.kernels.scatter import scatter_add_reference
from sparse_plugin.merge import INDEX_FILE, merge_checkpoint

# Merged weights give y = x·(W0 + Δ)ᵀ in one fp32 GEMM; the adapter's additive path gives base(x) + x·Δᵀ, the same
# products summed in another order. That moves each activation by a few fp32 ulps; after 2 layers and the head, with
# logits of magnitude < 1, the measured gap is 1.6e-7, so 1e-5 leaves ~60x headroom, while dropping a single trained
# value moves logits by 3e-4. (The "merged" strategy computes the very same weight, so there they agree exactly.)
LOGITS_TOL = {"atol": 1e-5, "rtol": 1e-5}
STRATEGIES = ["additive", "merged"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _adapter_tensors(saved):
    return load_file(saved.adapter / WEIGHTS_NAME)


def _assert_tensors_equal(got: dict, expected: dict):
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key].dtype == expected[key].dtype, key
        assert torch.equal(got[key], expected[key]), key


# --------------------------------------------------------------------------------------------- in memory


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_in_memory_merge_matches_adapter_and_unmerge_restores_bits(strategy):
    model = trained_model(forward_strategy=strategy)
    base = base_state()
    adapter_logits = logits(model)
    reference = dense_reference(
        base,
        {
            f"{k}.{part}": getattr(layer, part).detach()
            for k, layer in iter_sparse_layers(model)
            for part in ("indices", "values")
        },
    )

    merge_adapter(model)
    for key, layer in iter_sparse_layers(model):
        assert layer.merged
        assert torch.equal(layer.base_layer.weight, reference[key])  # one fp32 add per entry, as in plain torch
    merged_logits = logits(model)
    if strategy == "merged":
        assert torch.equal(merged_logits, adapter_logits)
    torch.testing.assert_close(merged_logits, adapter_logits, **LOGITS_TOL)

    unmerge_adapter(model)
    for key, layer in iter_sparse_layers(model):
        assert not layer.merged
        assert torch.equal(layer.base_layer.weight, base[key])  # restored from copies, not by subtraction
    for name, param in model.state_dict().items():
        if not name.endswith((".values", ".indices")):
            assert torch.equal(param, base[name.replace(".base_layer", "")]), name
    assert torch.equal(logits(model), adapter_logits)


# --------------------------------------------------------------------------------------------- on disk


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_merged_checkpoint_reloads_with_the_adapters_logits(tmp_path, strategy):
    saved = saved_setup(tmp_path, forward_strategy=strategy)
    summary = merge_checkpoint(saved.base, saved.adapter, tmp_path / "out", device="cpu", progress=False)
    counts = sum(layer.indices.numel() for _, layer in iter_sparse_layers(saved.model))
    assert summary["tensors"] == 14 and summary["values"] == counts and summary["shards"] == 1
    assert summary["device"] == "cpu" and summary["exact"] is None and summary["skipped_files"] == []
    assert summary["rounded_away"] == {}

    # Tensor by tensor: bit for bit the plain torch W0 + scatter(Δ); untouched tensors are copied exactly.
    _assert_tensors_equal(
        read_checkpoint(tmp_path / "out"), dense_reference(saved.base_state, _adapter_tensors(saved))
    )
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(logits(merged), logits(saved.model), **LOGITS_TOL)


def test_sharded_base_keeps_shards_index_and_other_files(tmp_path):
    saved = saved_setup(tmp_path, max_shard_size="60KB")
    shards = sorted(p.name for p in saved.base.glob("model-*.safetensors"))
    assert len(shards) >= 2 and (saved.base / INDEX_FILE).is_file()
    (saved.base / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    torch.save({"stale": torch.zeros(1)}, saved.base / "pytorch_model.bin")

    summary = merge_checkpoint(saved.base, saved.adapter, tmp_path / "out", device="cpu", progress=False)
    out = tmp_path / "out"
    assert summary["shards"] == len(shards)
    assert summary["skipped_files"] == ["pytorch_model.bin"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        shards + [INDEX_FILE, "config.json", "generation_config.json", "tokenizer.json"]
    )
    for name in (INDEX_FILE, "config.json", "generation_config.json", "tokenizer.json"):
        assert (out / name).read_bytes() == (saved.base / name).read_bytes(), name
    for shard in shards:  # each shard holds the same tensors and header metadata as before
        with safe_open(saved.base / shard, framework="pt") as before, safe_open(out / shard, framework="pt") as after:
            assert sorted(before.keys()) == sorted(after.keys()) and before.metadata() == after.metadata()
    index = json.loads((out / INDEX_FILE).read_text())
    assert set(index["weight_map"].values()) == set(shards)

    _assert_tensors_equal(read_checkpoint(out), dense_reference(saved.base_state, _adapter_tensors(saved)))
    merged = LlamaForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(logits(merged), logits(saved.model), **LOGITS_TOL)

    summary = merge_checkpoint(out, saved.adapter, tmp_path / "restored", unmerge=True, device="cpu", progress=False)
    assert summary["exact"] is True
    _assert_tensors_equal(read_checkpoint(tmp_path / "restored"), read_checkpoint(saved.base))


def _status_mib(field: str) -> float:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's peak-RSS reset")
def test_merge_holds_one_tensor_in_memory_and_keeps_the_shard_layout(tmp_path):
    saved = saved_setup(tmp_path)
    shard = saved.base / "model.safetensors"
    with safe_open(shard, framework="pt") as fh:
        metadata = fh.metadata()
    tensors = load_file(shard)
    tensors["untouched.big"] = torch.ones(64 * 2**20 // 4)  # 64 MiB the adapter does not target
    save_file(tensors, shard, metadata=metadata)
    del tensors
    gc.collect()

    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := RSS now
    before = _status_mib("VmRSS")
    merge_checkpoint(saved.base, saved.adapter, tmp_path / "out", device="cpu", progress=False)
    assert _status_mib("VmHWM") - before < 16  # loading the shard whole would add > 64 MiB

    source, written = shard.read_bytes(), (tmp_path / "out" / "model.safetensors").read_bytes()
    header = 8 + int.from_bytes(source[:8], "little")
    assert written[:header] == source[:header]  # the same header: every tensor at its offset, metadata kept
    merged = read_checkpoint(tmp_path / "out")
    assert torch.equal(merged.pop("untouched.big"), torch.ones(64 * 2**20 // 4))
    _assert_tensors_equal(merged, dense_reference(saved.base_state, _adapter_tensors(saved)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merge_then_unmerge_is_bit_exact(tmp_path, dtype):
    saved = saved_setup(tmp_path, dtype=dtype)
    base_files = read_checkpoint(saved.base)
    summary = merge_checkpoint(saved.base, saved.adapter, tmp_path / "merged", device="cpu", progress=False)
    merged = read_checkpoint(tmp_path / "merged")
    # fp32 add, one rounding to the base dtype: exactly what the plain torch reference does.
    _assert_tensors_equal(merged, dense_reference(base_files, _adapter_tensors(saved)))
    assert summary["rounded_away"] == rounded_away_reference(base_files, _adapter_tensors(saved))  # bf16: 2 deltas
    assert not torch.equal(
        merged["model.layers.0.self_attn.q_proj.weight"], base_files["model.layers.0.self_attn.q_proj.weight"]
    )

    summary = merge_checkpoint(
        tmp_path / "merged", saved.adapter, tmp_path / "restored", unmerge=True, device="cpu", progress=False
    )
    assert summary["exact"] is True
    _assert_tensors_equal(read_checkpoint(tmp_path / "restored"), base_files)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merge_reports_the_deltas_a_16_bit_base_rounds_away(tmp_path, dtype):
    saved = saved_setup(tmp_path, dtype=dtype)
    tiny_deltas(saved.adapter)
    summary = merge_checkpoint(saved.base, saved.adapter, tmp_path / "merged", device="cpu", progress=False)
    merged, tensors = read_checkpoint(tmp_path / "merged"), _adapter_tensors(saved)
    _assert_tensors_equal(merged, dense_reference(saved.base_state, tensors))
    lost = {KEY: TINY} if dtype != torch.float32 else {}  # fp32 keeps the 1e-6 relative deltas
    assert summary["rounded_away"] == lost == rounded_away_reference(saved.base_state, tensors)
    tiny = tensors[IDX][:TINY].long()  # in the merged file, those entries are still the base's
    assert torch.equal(merged[KEY].flatten()[tiny], saved.base_state[KEY].flatten()[tiny]) == (dtype != torch.float32)


def test_unmerge_after_a_lossy_bf16_merge_is_bit_exact(tmp_path):
    saved = saved_setup(tmp_path, dtype=torch.bfloat16)
    tiny_deltas(saved.adapter)
    merge_checkpoint(saved.base, saved.adapter, tmp_path / "merged", device="cpu", progress=False)
    summary = merge_checkpoint(
        tmp_path / "merged", saved.adapter, tmp_path / "restored", unmerge=True, device="cpu", progress=False
    )
    assert summary["exact"] is True and summary["rounded_away"] is None
    _assert_tensors_equal(read_checkpoint(tmp_path / "restored"), read_checkpoint(saved.base))
    # Subtracting the deltas instead, in the same fp32-then-bf16 arithmetic, does not restore the base: hence .base_values.
    tensors, subtracted = _adapter_tensors(saved), read_checkpoint(tmp_path / "merged")[KEY]
    scatter_add_reference(subtracted, tensors[IDX].long(), tensors[f"{KEY}.values"], alpha=-1.0)
    assert not torch.equal(subtracted, saved.base_state[KEY])


def test_unmerge_without_base_values_is_approximate(tmp_path):
    saved = saved_setup(tmp_path, store_base_values=False)
    base_files = read_checkpoint(saved.base)
    merge_checkpoint(saved.base, saved.adapter, tmp_path / "merged", device="cpu", progress=False)
    summary = merge_checkpoint(
        tmp_path / "merged", saved.adapter, tmp_path / "restored", unmerge=True, device="cpu", progress=False
    )
    assert summary["exact"] is False
    restored, merged = read_checkpoint(tmp_path / "restored"), read_checkpoint(tmp_path / "merged")
    assert restored.keys() == base_files.keys()
    targets = {k.removesuffix(".indices") for k in _adapter_tensors(saved) if k.endswith(".indices")}
    assert max(float(merged[key].abs().max()) for key in targets) < 0.5
    for key, expected in base_files.items():
        if key in targets:
            # (w + v) - v in fp32 rounds twice; each rounding errs by at most half an ulp of |w + v| < 0.5,
            # i.e. < 2^-25, so 1e-7 absolute bounds it.
            torch.testing.assert_close(restored[key], expected, atol=1e-7, rtol=0)
        else:
            assert torch.equal(restored[key], expected), key


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback of device='auto'")
def test_auto_device_is_cpu_without_cuda(tmp_path):
    saved = saved_setup(tmp_path)
    assert merge_checkpoint(saved.base, saved.adapter, tmp_path / "out", progress=False)["device"] == "cpu"


def test_base_and_adapter_linked_like_the_hub_cache_merge_into_plain_files(tmp_path):
    saved = saved_setup(tmp_path, max_shard_size="60KB")
    merge_checkpoint(saved.base, saved.adapter, tmp_path / "plain", device="cpu", progress=False)
    for directory in (saved.base, saved.adapter):  # every file becomes a link to ../blobs/<sha256>
        hub_cache_layout(directory, tmp_path / "blobs")

    merge_checkpoint(saved.base, saved.adapter, tmp_path / "linked", device="cpu", progress=False)
    files = sorted((tmp_path / "linked").iterdir())
    assert [p.name for p in files] == sorted(p.name for p in (tmp_path / "plain").iterdir())
    for path in files:  # a self-contained model: real files, the same bytes as from unlinked inputs
        assert not path.is_symlink() and path.read_bytes() == (tmp_path / "plain" / path.name).read_bytes(), path.name
