"""sparse_plugin.io: the adapter file format (save_adapter / read_adapter / load_adapter), against plain torch."""

import errno
import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from adapter_utils import (
    HOSTILE_ADAPTERS,
    KEY,
    SECRET,
    base_state,
    dense_reference,
    hostile_copy,
    hub_cache_layout,
    leftovers,
    logits,
    model_with_state,
    os_disk_full,
    refusal,
    safetensors_disk_full,
    save_file_failing_at,
    snapshot,
    target_keys,
    trained_model,
)
from conftest import tiny_llama
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from sparse_plugin import (
    AdapterError,
    SparseConfig,
    iter_sparse_layers,
    load_adapter,
    merge_adapter,
    prepare_model,
    read_adapter,
    save_adapter,
)
from sparse_plugin.atomic import DiskFullError
from sparse_plugin.io import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME
from sparse_plugin.model_card import CARD_NAME

# Loading the adapter into a different base and running the delta sparsely (additive: base(x) + x·Δᵀ) is compared
# with a dense fp32 model holding W0 + Δ. The two sum the same products in another order, so each layer differs by
# a few fp32 ulps; with logits of magnitude < 1 the measured gap is ~1.6e-7, so 1e-5 leaves ~60x headroom, while
# dropping a single trained value moves logits by 3e-4.
LOGITS_TOL = {"atol": 1e-5, "rtol": 1e-5}


def _layers(model):
    return dict(iter_sparse_layers(model))


def test_save_names_tensors_by_base_key_with_int32_indices_and_base_values(tmp_path):
    model = trained_model()
    base = base_state()
    save_adapter(model, tmp_path, base_model_name_or_path="tiny/base")

    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [CONFIG_NAME, WEIGHTS_NAME, CARD_NAME]
    )  # no temporary files left
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    keys = target_keys(tiny_llama())
    assert "model.layers.0.self_attn.q_proj.weight" in keys and len(keys) == 14
    assert set(tensors) == {f"{k}.{part}" for k in keys for part in ("indices", "values", "base_values")}
    layers = _layers(model)
    for key in keys:
        indices = tensors[f"{key}.indices"]
        assert indices.dtype == torch.int32  # int32 on disk: every matrix has < 2^31 entries
        assert torch.equal(indices.long(), layers[key].indices)
        assert bool((indices[1:] > indices[:-1]).all())
        assert torch.equal(tensors[f"{key}.values"], layers[key].values.detach())
        assert bool((tensors[f"{key}.values"] != 0).all())
        assert torch.equal(tensors[f"{key}.base_values"], base[key].view(-1)[indices.long()])

    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    with safe_open(tmp_path / WEIGHTS_NAME, framework="pt") as fh:
        assert fh.metadata()["save_id"] == meta["save_id"]
    assert meta["format"] == FORMAT_VERSION and meta["has_base_values"] is True
    assert meta["base_model"] == "tiny/base" and meta["method"] == "spiel"
    assert meta["config"] == SparseConfig(density=0.05).to_dict()

    def digest(entries):  # what the checks compare: sha256 of the dtype's safetensors code and the raw bytes
        return hashlib.sha256(b"F32" + entries.numpy().tobytes()).hexdigest()

    entries = {k: base[k].view(-1)[layers[k].indices] for k in keys}
    assert meta["targets"] == {
        k: {
            "shape": list(base[k].shape),
            "count": layers[k].indices.numel(),
            "dtype": "F32",
            "base_sha256": digest(entries[k]),
            "merged_sha256": digest(entries[k] + layers[k].values.detach()),
        }
        for k in keys
    }
    counts = sum(layers[k].indices.numel() for k in keys)
    assert meta["num_params"] == counts
    assert meta["density"] == pytest.approx(counts / sum(base[k].numel() for k in keys))
    rows = sorted((k, list(base[k].shape), "F32") for k in keys)
    assert meta["base_fingerprint"] == hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def test_base_model_defaults_to_the_models_name_or_path(tiny_checkpoint, tmp_path):
    path, _ = tiny_checkpoint
    model = LlamaForCausalLM.from_pretrained(path)
    prepare_model(model, SparseConfig(density=0.05))
    save_adapter(model, tmp_path / "adapter")
    assert read_adapter(tmp_path / "adapter").base_model == str(path)


@pytest.mark.parametrize("strategy", ["additive", "merged"])
def test_round_trip_into_unprepared_base_gives_identical_logits(tmp_path, strategy):
    model = trained_model(forward_strategy=strategy)
    save_adapter(model, tmp_path)
    fresh = load_adapter(tiny_llama(), tmp_path)

    trained, loaded = _layers(model), _layers(fresh)
    assert set(loaded) == set(trained)
    for key, layer in loaded.items():
        assert layer.forward_strategy == strategy
        assert torch.equal(layer.indices, trained[key].indices) and layer.indices.dtype == torch.int32
        assert torch.equal(layer.values, trained[key].values)
    # Same base, indices, values and code path: the logits agree bit for bit.
    assert torch.equal(logits(fresh), logits(model))
    # And both equal a plain dense model holding W0 + scatter(Δ), up to summation order.
    reference = model_with_state(dense_reference(base_state(), load_file(tmp_path / WEIGHTS_NAME)))
    torch.testing.assert_close(logits(fresh), logits(reference), **LOGITS_TOL)


@pytest.mark.parametrize(
    "prepared", [SparseConfig(density=0.05, seed=7), SparseConfig(density=0.1)], ids=["same-budget", "other-budget"]
)
def test_load_into_prepared_model(tmp_path, prepared):
    model = trained_model()
    save_adapter(model, tmp_path)
    other = prepare_model(tiny_llama(), prepared)
    params = {key: layer.values for key, layer in _layers(other).items()}
    assert not torch.equal(_layers(other)[KEY].indices, _layers(model)[KEY].indices)  # other positions before loading

    load_adapter(other, tmp_path)
    for key, layer in _layers(other).items():
        assert layer.values is params[key]  # the same Parameter, so an optimizer built on it keeps working
        assert torch.equal(layer.indices, _layers(model)[key].indices)
        assert torch.equal(layer.values, _layers(model)[key].values)
    assert torch.equal(logits(other), logits(model))


def test_store_base_values_false_writes_none(tmp_path):
    model = trained_model(store_base_values=False)
    save_adapter(model, tmp_path)
    assert not any(name.endswith(".base_values") for name in load_file(tmp_path / WEIGHTS_NAME))
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["has_base_values"] is False
    adapter = read_adapter(tmp_path)
    assert adapter.has_base_values is False
    assert all(t.base_values is None for t in adapter.targets.values())
    assert torch.equal(logits(load_adapter(tiny_llama(), tmp_path)), logits(model))


# With base values, the refusal names both sides of the first difference; without, the recorded base_sha256 decides.
OTHER_BASE = {
    True: r": \d+ of \d+ entries at its indices differ, the first at flat position \d+: -?\d\S* there, -?\d\S* in the adapter",
    False: r" \(its entries at the indices do not match the adapter's base_sha256\)",
}


@pytest.mark.parametrize("store_base_values", [True, False], ids=["base-values", "digest-only"])
@pytest.mark.parametrize("prepare_first", [False, True], ids=["unprepared", "prepared"])
def test_load_refuses_other_base_unless_check_base_false(tmp_path, prepare_first, store_base_values):
    save_adapter(trained_model(store_base_values=store_base_values), tmp_path)
    other = tiny_llama(seed=1)
    if prepare_first:
        prepare_model(other, SparseConfig(density=0.05))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    message = rf"the model's `model\.\S+` differs from the base the adapter was trained on{OTHER_BASE[store_base_values]}; load that base, or pass check_base=False$"
    with pytest.raises(AdapterError, match=message):
        load_adapter(other, tmp_path)
    # The refusal changed nothing: no layer was wrapped, no value was set.
    assert other.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
    assert bool(_layers(other)) == prepare_first

    load_adapter(other, tmp_path, check_base=False)
    other.eval()
    for layer in _layers(other).values():
        layer.forward_strategy = "additive"  # the sparse path, compared with the dense reference below
    reference = model_with_state(dense_reference(base_state(seed=1), load_file(tmp_path / WEIGHTS_NAME)))
    torch.testing.assert_close(logits(other), logits(reference), **LOGITS_TOL)


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=48, n_layer=1, n_head=4, n_positions=64))


def _mlp_as_embedding():
    model = tiny_llama()
    model.model.layers[0].mlp.down_proj = torch.nn.Embedding(48, 80)  # the adapter's Linear, now another module type
    return model


# Each mismatch names what the adapter records and what the model has at the same place.
MODEL_MISMATCHES = {
    "other-shape": (
        lambda: tiny_llama(intermediate_size=64),
        (
            r"target `model\.layers\.0\.mlp\.down_proj\.weight` is a weight of shape \[48, 80\] in the adapter, "
            r"but it is a weight of shape \[48, 64\] in LlamaForCausalLM; load the base"
        ),
    ),
    "other-architecture": (
        _gpt2,
        (
            r"target `model\.layers\.0\.mlp\.down_proj\.weight` is a weight of shape \[48, 80\] in the "
            r"adapter, but it is no such weight in GPT2LMHeadModel; load the base"
        ),
    ),
    # Any module's weight of the recorded shape can carry a delta; this one is not the base the adapter knows.
    "other-module-type": (
        _mlp_as_embedding,
        r"the model's `model\.layers\.0\.mlp\.down_proj\.weight` differs from the base the adapter was trained on",
    ),
    "prepared-other-targets": (
        lambda: prepare_model(tiny_llama(), SparseConfig(density=0.05, target_modules=["q_proj", "lm_head"])),
        (
            r"targets differ from the model's sparse layers: only the adapter has \['model\.layers\.0\.mlp\.down_proj\.weight', .*\] \(12\), "
            r"only the model has \['lm_head\.weight'\] \(1\); prepare the model"
        ),
    ),
    "prepared-other-shape": (
        lambda: prepare_model(tiny_llama(intermediate_size=64), SparseConfig(density=0.05)),
        r"target `model\.layers\.0\.mlp\.\w+_proj\.weight` is \[(80, 48|48, 80)\] in the adapter but \[(64, 48|48, 64)\] in the model",
    ),
}


@pytest.mark.parametrize("case", sorted(MODEL_MISMATCHES))
def test_load_refusal_names_the_adapter_and_the_model_side(tmp_path, case):
    save_adapter(trained_model(), tmp_path)
    build, message = MODEL_MISMATCHES[case]
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterError, match=message) as refused:
        load_adapter(model, tmp_path)
    assert len(str(refused.value).splitlines()) == 1
    assert model.state_dict().keys() == before.keys()  # nothing wrapped, nothing set


def test_save_of_merged_model_keeps_pre_merge_base_values(tmp_path):
    model = trained_model()
    save_adapter(model, tmp_path / "before")
    merge_adapter(model)
    save_adapter(model, tmp_path / "merged")
    before, merged = load_file(tmp_path / "before" / WEIGHTS_NAME), load_file(tmp_path / "merged" / WEIGHTS_NAME)
    assert before.keys() == merged.keys()
    assert all(torch.equal(before[k], merged[k]) for k in before)


def test_two_saves_mixed_are_refused(tmp_path):
    model = trained_model()
    save_adapter(model, tmp_path / "a")
    save_adapter(model, tmp_path / "b")
    shutil.copy(tmp_path / "a" / CONFIG_NAME, tmp_path / "b" / CONFIG_NAME)
    with pytest.raises(
        AdapterError, match="differs from sparse_config.json's .* the two files come from different saves"
    ):
        read_adapter(tmp_path / "b")


def test_saving_again_replaces_the_adapter_atomically(tmp_path):
    model = trained_model()
    save_adapter(model, tmp_path)
    first = read_adapter(tmp_path).meta["save_id"]
    with torch.no_grad():
        _layers(model)[KEY].values.mul_(2)
    save_adapter(model, tmp_path)
    adapter = read_adapter(tmp_path)
    assert adapter.meta["save_id"] != first
    assert torch.equal(adapter.targets[KEY].values, _layers(model)[KEY].values.detach())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME, CARD_NAME])


@pytest.mark.parametrize("case", sorted(HOSTILE_ADAPTERS))
def test_hostile_adapter_is_refused_by_readers(tmp_path, case):
    model = trained_model()
    save_adapter(model, tmp_path / "good")
    bad = hostile_copy(tmp_path / "good", tmp_path / "bad", case)
    message = refusal(bad, case)
    with pytest.raises(AdapterError, match=message) as refused:
        read_adapter(bad)
    assert len(str(refused.value).splitlines()) == 1
    fresh = tiny_llama()
    with pytest.raises(AdapterError, match=message):
        load_adapter(fresh, bad)
    assert not _layers(fresh)


# --------------------------------------------------------------------------------------------- links and a full disk


def test_adapter_linked_like_the_hub_cache_loads_and_an_outside_link_is_never_quoted(tmp_path):
    model = trained_model()
    save_adapter(model, tmp_path / "snapshot")
    hub_cache_layout(tmp_path / "snapshot", tmp_path / "blobs")
    assert all(p.is_symlink() for p in (tmp_path / "snapshot").iterdir())
    assert torch.equal(logits(load_adapter(tiny_llama(), tmp_path / "snapshot")), logits(model))

    bad = hostile_copy(tmp_path / "snapshot", tmp_path / "bad", "config-symlinked-outside")
    with pytest.raises(AdapterError) as refused:
        read_adapter(bad)
    assert SECRET not in str(refused.value)


def _fill_disk(monkeypatch, at: str) -> None:
    if at == WEIGHTS_NAME:  # safetensors' writer, after writing part of the file
        monkeypatch.setattr("sparse_plugin.io.save_file", save_file_failing_at(1, safetensors_disk_full))
    else:
        monkeypatch.setattr(Path, "write_text", os_disk_full)


@pytest.mark.parametrize("existing", [False, True], ids=["new-directory", "over-a-checkpoint"])
@pytest.mark.parametrize("at", [WEIGHTS_NAME, CONFIG_NAME])
def test_save_on_a_full_disk_changes_nothing(tmp_path, monkeypatch, at, existing):
    model = trained_model()
    target = tmp_path / "checkpoint-20"
    if existing:  # a Trainer checkpoint: an earlier adapter beside the Trainer's own files
        save_adapter(model, target)
        (target / "trainer_state.json").write_text("{}")
    before = snapshot(target) if existing else None
    with torch.no_grad():
        _layers(model)[KEY].values.mul_(2)
    _fill_disk(monkeypatch, at)
    message = (
        rf"^no space left on device writing {re.escape(str(target / at))}; free space or save to another directory$"
    )
    with pytest.raises(DiskFullError, match=message) as refused:
        save_adapter(model, target)
    assert isinstance(refused.value, OSError) and refused.value.errno == errno.ENOSPC
    if existing:
        assert snapshot(target) == before
        assert sorted(p.name for p in target.iterdir()) == sorted(
            [CONFIG_NAME, WEIGHTS_NAME, CARD_NAME, "trainer_state.json"]
        )
    else:
        assert not target.exists()
    assert leftovers(target) == []
