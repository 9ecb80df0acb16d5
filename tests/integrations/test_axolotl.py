"""The Axolotl plugin: YAML validation through Axolotl's own `prepare_plugins`/`validate_config`, each hook, the
shipped configs, and `axolotl train` end to end. Runs where axolotl is installed (`make test-compat`)."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")  # before axolotl is imported: its telemetry would reach out
pytest.importorskip("axolotl")

import torch
import yaml
from axolotl.cli.config import prepare_plugins
from axolotl.utils.config import validate_config
from axolotl.utils.dict import DictDefault
from conftest import tiny_llama
from transformers import AutoModelForCausalLM

import sparse_plugin
from sparse_plugin import SparseCallback, iter_sparse_layers, load_adapter, read_adapter
from sparse_plugin.config import SparseConfig
from sparse_plugin.integrations.axolotl import SparseArgs, SparsePlugin
from sparse_plugin.integrations.axolotl.args import sparse_config_from
from sparse_plugin.io import CONFIG_NAME, WEIGHTS_NAME
from sparse_plugin.model_card import CARD_NAME

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "axolotl_configs").glob("*.yml"))


def _yaml(base, **overrides) -> dict:
    """A minimal valid sparse config for the tiny Llama; None in `overrides` removes a key."""
    cfg = {
        "base_model": str(base),
        "plugins": ["sparse_plugin.SparsePlugin"],
        "sparse_method": "spiel",
        "sparse_regrow": "ma",
        "sparse_density": 0.05,
        "optimizer": "spiel_sm3",
        "learning_rate": 0.01,
        "micro_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "max_steps": 6,
        "sequence_len": 32,
        "datasets": [{"path": "data.jsonl", "ds_type": "json", "type": "completion"}],
        "bf16": False,
        "fp16": False,
    }
    cfg.update(overrides)
    return {k: v for k, v in cfg.items() if v is not None}


def _validate(cfg: dict) -> DictDefault:
    cfg = DictDefault(cfg)
    prepare_plugins(cfg)
    return validate_config(cfg)


def test_import_sparse_plugin_leaves_axolotl_alone_until_the_plugin_is_asked_for():
    code = (
        "import sys, sparse_plugin; assert 'axolotl' not in sys.modules; "
        "from axolotl.integrations.base import BasePlugin; assert issubclass(sparse_plugin.SparsePlugin, BasePlugin)"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        env=os.environ | {"AXOLOTL_DO_NOT_TRACK": "1"},
    )
    assert run.returncode == 0, run.stderr[-2000:]


def test_args_are_derived_from_sparse_config_fields():
    import dataclasses

    fields = {f"sparse_{field.name}" for field in dataclasses.fields(SparseConfig)}
    assert set(SparseArgs.model_fields) == fields | {"sparse_merge_on_finish", "sparse_save_full_checkpoints"}
    for key, info in SparseArgs.model_fields.items():
        assert info.default is None and info.json_schema_extra["description"], key
    for field in dataclasses.fields(SparseConfig):  # the field's own help, word for word
        description = SparseArgs.model_fields[f"sparse_{field.name}"].json_schema_extra["description"]
        assert description == field.metadata["help"], field.name
    assert (
        "share of each targeted weight matrix"
        in SparseArgs.model_fields["sparse_density"].json_schema_extra["description"]
    )


def test_good_yaml_validates_and_gives_the_sparse_config(tiny_checkpoint):
    base, _ = tiny_checkpoint
    cfg = _validate(
        _yaml(
            base, sparse_target_modules=["q_proj", "v_proj"], sparse_reselection_steps=10, optim_args={"momentum": 0.9}
        )
    )
    assert cfg.optimizer == "spiel_sm3" and cfg.sparse_reselection_steps == 10
    assert sparse_config_from(cfg) == SparseConfig(
        method="spiel", regrow="ma", density=0.05, target_modules=["q_proj", "v_proj"], reselection_steps=10
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"sparse_densty": 0.1},
            "Unknown key `sparse_densty` for sparse_plugin.SparsePlugin; did you mean `sparse_density`?",
        ),
        ({"sparse_density": 1.5}, r"`sparse_density` must be a number in \(0, 1\], got 1.5"),
        ({"sparse_density": "lots"}, "sparse_density"),
        (
            {"sparse_density": None},
            "Give exactly one of `sparse_density`, `sparse_num_params`, `sparse_lora_rank_equivalent`",
        ),
        ({"sparse_method": "lora"}, "`sparse_method` must be one of 'spiel', 'smt', 'sift'; got 'lora'"),
        ({"adapter": "lora"}, "`adapter: lora` cannot be combined with sparse_plugin.SparsePlugin"),
        (
            {"optimizer": "adamw_torch"},
            "`optimizer: adamw_torch` does not run sparse selection; set `optimizer: spiel_sm3`",
        ),
        (
            {"optimizer": "spiel_adamw"},
            "`sparse_regrow: ma` scores positions by SM3's accumulators, which `optimizer: spiel_adamw`",
        ),
        (
            {"sparse_target_modules": ["q_proj", "qkv_proj"]},
            "`sparse_target_modules` entry 'qkv_proj' matches no module with a weight of LlamaForCausalLM",
        ),
        ({"sparse_density": None, "sparse_num_params": 10**9}, "The budget of 1000000000 values exceeds"),
        (
            {"sparse_target_parameters": ["experts.gate_up_proj"]},
            "`sparse_target_parameters` entry 'experts.gate_up_proj' matches no weight of LlamaForCausalLM",
        ),
    ],
)
def test_bad_yaml_fails_validation_naming_the_key(tiny_checkpoint, overrides, message):
    base, _ = tiny_checkpoint
    with pytest.raises(ValueError, match=message):
        _validate(_yaml(base, **overrides))


def test_other_optimizers_and_methods_validate(tiny_checkpoint):
    base, _ = tiny_checkpoint
    assert _validate(_yaml(base, sparse_regrow="ag", optimizer="spiel_adamw")).optimizer == "spiel_adamw"
    assert _validate(_yaml(base, sparse_method="sift", optimizer="spiel_adamw")).sparse_method == "sift"


def test_load_in_4bit_or_8bit_gets_a_bitsandbytes_config(tiny_checkpoint):
    base, _ = tiny_checkpoint
    cfg = _validate(_yaml(base, adapter="sparse", load_in_4bit=True, bf16=True))
    assert cfg.overrides_of_model_kwargs["quantization_config"] == {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": "bfloat16",
    }
    eight = _validate(_yaml(base, adapter="sparse", load_in_8bit=True)).overrides_of_model_kwargs
    assert eight == {"quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": True}}
    given = {"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}
    assert (
        _validate(_yaml(base, adapter="sparse", load_in_4bit=True, model_kwargs=given)).overrides_of_model_kwargs
        == given
    )


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_validate(path, monkeypatch):
    import huggingface_hub.constants

    # Hub ids (the GPU examples) must not wait on the network here: their target check is skipped offline.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(REPO)
    cfg = _validate(yaml.safe_load(path.read_text()))
    assert cfg.plugins == ["sparse_plugin.SparsePlugin"] and cfg.optimizer in ("spiel_sm3", "spiel_adamw")


def test_post_model_load_prepares_the_model_and_names_the_key_on_error():
    plugin, model = SparsePlugin(), tiny_llama()
    plugin.post_model_load(DictDefault(sparse_density=0.05, sparse_target_modules=["q_proj"]), model)
    assert [key for key, _ in iter_sparse_layers(model)] == [
        f"model.layers.{i}.self_attn.q_proj.weight" for i in range(2)
    ]
    assert model.sparse_config.density == 0.05
    with pytest.raises(ValueError, match="`sparse_target_modules` entry 'nope'"):
        plugin.post_model_load(DictDefault(sparse_density=0.05, sparse_target_modules=["nope"]), tiny_llama())


def test_inference_loads_the_trained_adapter(tmp_path):
    trained = sparse_plugin.prepare_model(tiny_llama(), SparseConfig(density=0.05))
    for _, layer in iter_sparse_layers(trained):
        torch.nn.init.normal_(layer.values, std=0.1)
    sparse_plugin.save_adapter(trained, tmp_path)
    model = tiny_llama()
    SparsePlugin().post_model_load(DictDefault(inference=True, output_dir=str(tmp_path), sparse_density=0.5), model)
    ids = torch.randint(3, 97, (2, 9))
    torch.testing.assert_close(model(ids).logits, trained.eval()(ids).logits)


def test_callbacks_adapter_and_final_save(tmp_path):
    plugin, model = SparsePlugin(), tiny_llama()
    assert plugin.load_adapter(model, DictDefault(adapter="sparse")) == (model, None)
    assert plugin.load_adapter(model, DictDefault(adapter=None)) is None
    assert [type(cb) for cb in plugin.add_callbacks_pre_trainer(DictDefault(), model)] == [SparseCallback]
    plugin.post_model_load(DictDefault(sparse_density=0.05), model)
    plugin.post_train(DictDefault(), model)
    model.save_pretrained(tmp_path, safe_serialization=True)  # what Axolotl calls after training
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME, CARD_NAME])


def test_merge_on_finish_finds_a_hub_base_in_the_cache(tmp_path, tiny_checkpoint, monkeypatch):
    import huggingface_hub

    base, base_model = tiny_checkpoint
    trained = sparse_plugin.prepare_model(base_model, SparseConfig(density=0.05))
    for _, layer in iter_sparse_layers(trained):
        torch.nn.init.normal_(layer.values, std=0.1)
    sparse_plugin.save_adapter(trained, tmp_path / "out")
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: calls.append(repo) or str(base))
    cfg = DictDefault(base_model="org/tiny", output_dir=str(tmp_path / "out"), sparse_merge_on_finish=True)
    SparsePlugin().post_train_unload(cfg)
    assert set(calls) == {"org/tiny"}  # config and index, then the shards: see sparse_plugin.hub.resolve_model
    calls.clear()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged").eval()
    ids = torch.randint(3, 97, (2, 9))
    torch.testing.assert_close(merged(ids).logits, trained.eval()(ids).logits, atol=1e-5, rtol=1e-5)
    SparsePlugin().post_train_unload(DictDefault(cfg, sparse_merge_on_finish=None))  # off: nothing merged again
    assert calls == []


def test_merge_on_finish_refusal_is_an_error_naming_it_and_writes_nothing(tmp_path, tiny_checkpoint):
    base, _ = tiny_checkpoint
    (tmp_path / "out").mkdir()  # no adapter in output_dir
    cfg = DictDefault(base_model=str(base), output_dir=str(tmp_path / "out"), sparse_merge_on_finish=True)
    with pytest.raises(
        RuntimeError, match="^sparse_merge_on_finish: .*sparse_config.json: missing; an adapter directory holds"
    ):
        SparsePlugin().post_train_unload(cfg)
    assert sorted(p.name for p in tmp_path.joinpath("out").iterdir()) == []


def _tiny_base_and_data(tmp_path, tokenizer) -> tuple[Path, Path]:
    base = tmp_path / "base"
    tiny_llama(hidden_size=64, intermediate_size=128).save_pretrained(base)  # bitsandbytes' CPU kernels want 64s
    tokenizer.save_pretrained(base)
    rows = [{"text": " ".join(f"w{(7 * s + i) % 90}" for i in range(12))} for s in range(64)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return base, tmp_path / "data.jsonl"


def _axolotl_train(tmp_path, name: str, base: Path, data: Path, **overrides) -> Path:
    """`axolotl train` on the tiny base (6 steps, SpIEL-MA regrowing every 2, a checkpoint every 3); its output_dir."""
    out = tmp_path / name
    cfg = _yaml(
        base,
        datasets=[{"path": str(data), "ds_type": "json", "type": "completion"}],
        output_dir=str(out),
        dataset_prepared_path=str(tmp_path / "prepared"),
        save_steps=3,
        logging_steps=1,
        sparse_reselection_steps=2,
        sparse_selection_accumulation_steps=1,
        **overrides,
    )
    (tmp_path / f"{name}.yml").write_text(yaml.safe_dump(cfg))
    bin_dir = str(Path(sys.executable).parent)  # `axolotl train` launches `accelerate` from PATH
    env = os.environ | {
        "PATH": bin_dir + os.pathsep + os.environ["PATH"],
        "AXOLOTL_DO_NOT_TRACK": "1",
        "PYTHONPATH": str(REPO),
    }  # the checkout under test, not another installed copy
    run = subprocess.run(
        [str(Path(bin_dir) / "axolotl"), "train", str(tmp_path / f"{name}.yml")],
        cwd=tmp_path,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    return out


@pytest.mark.e2e
@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "nf4"])
def test_axolotl_train_then_sparse_merge_then_transformers(tmp_path, tiny_tokenizer, quantized):
    base, data = _tiny_base_and_data(tmp_path, tiny_tokenizer)
    out = _axolotl_train(
        tmp_path,
        "out",
        base,
        data,
        sparse_merge_on_finish=True,
        **({"adapter": "sparse", "load_in_4bit": True} if quantized else {}),
    )
    bin_dir = str(Path(sys.executable).parent)

    assert {CONFIG_NAME, WEIGHTS_NAME} <= {p.name for p in out.iterdir()}
    assert not list(out.glob("model*.safetensors"))  # no full-model dump in output_dir
    for step in (3, 6):
        assert (out / f"checkpoint-{step}" / WEIGHTS_NAME).is_file()
        assert not list((out / f"checkpoint-{step}").glob("model*.safetensors"))  # nor in the checkpoints
    history = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    assert [row["step"] for row in history if "sparse/regrown" in row] == [2, 4]  # spiel_sm3 ran SpIEL-MA
    trained_on = json.loads((out / CONFIG_NAME).read_text())["targets"]["model.layers.0.self_attn.q_proj.weight"][
        "dtype"
    ]
    assert trained_on == ("NF4" if quantized else "F32")  # trained over the 4-bit copy, merged into the fp32 base

    merged = tmp_path / "merged"
    merge = subprocess.run(
        [
            str(Path(bin_dir) / "sparse-merge"),
            "merge",
            "--base",
            str(base),
            "--adapter",
            str(out),
            "--output",
            str(merged),
            "--quiet",
        ],
        check=False,
        capture_output=True,
        text=True,
    )
    assert merge.returncode == 0, merge.stderr
    reloaded = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    adapter_model = load_adapter(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), out).eval()
    assert any(layer.values.abs().sum() > 0 for _, layer in iter_sparse_layers(adapter_model))
    assert type(reloaded.model.layers[0].self_attn.q_proj) is torch.nn.Linear  # a plain model, no sparse layers
    ids = torch.randint(3, 97, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, adapter_model(ids).logits, atol=1e-5, rtol=1e-5)
        on_finish = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
        assert torch.equal(on_finish(ids).logits, reloaded(ids).logits)  # sparse_merge_on_finish = sparse-merge merge


@pytest.mark.e2e
def test_axolotl_resumes_bit_exact_from_an_adapter_only_checkpoint(tmp_path, tiny_tokenizer):
    base, data = _tiny_base_and_data(tmp_path, tiny_tokenizer)
    full = _axolotl_train(tmp_path, "full", base, data)
    checkpoint = full / "checkpoint-3"
    files = {p.name for p in checkpoint.iterdir()}
    assert {CONFIG_NAME, WEIGHTS_NAME, "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= files
    assert not [name for name in files if name.startswith(("model", "pytorch_model"))]
    copy = shutil.copytree(checkpoint, tmp_path / "resumed" / "checkpoint-3")  # as a run killed after step 3 leaves it
    # A mark in the copy's logged history (read back on resume, used for nothing else) shows that the run resumed
    # rather than starting over, which would give the same numbers.
    state = json.loads((copy / "trainer_state.json").read_text())
    state["log_history"][0]["resumed_from_copy"] = True
    (copy / "trainer_state.json").write_text(json.dumps(state))
    resumed = _axolotl_train(tmp_path, "resumed", base, data, resume_from_checkpoint=str(copy))
    history = [
        json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["log_history"] for out in (full, resumed)
    ]
    assert history[1][0].get("resumed_from_copy")
    losses = [{row["step"]: row["loss"] for row in rows if "loss" in row and row["step"] > 3} for rows in history]
    assert len(losses[0]) == 3 and losses[1] == losses[0]  # bit for bit on CPU fp32
    expected, got = read_adapter(full), read_adapter(resumed)
    for key, target in expected.targets.items():
        assert torch.equal(got.targets[key].indices, target.indices) and torch.equal(
            got.targets[key].values, target.values
        ), key


def test_full_checkpoints_switch_reaches_the_callback():
    plugin = SparsePlugin()
    assert not plugin.add_callbacks_pre_trainer(DictDefault(), tiny_llama())[0].save_full_checkpoints
    assert plugin.add_callbacks_pre_trainer(DictDefault(sparse_save_full_checkpoints=True), tiny_llama())[
        0
    ].save_full_checkpoints


def test_ctrl_c_saves_the_adapter_not_the_model(tmp_path):
    from axolotl.train import setup_signal_handler
    from transformers import Trainer, TrainingArguments

    plugin, model = SparsePlugin(), tiny_llama()
    plugin.post_model_load(DictDefault(sparse_density=0.05), model)
    args = TrainingArguments(str(tmp_path / "run"), use_cpu=True, report_to=[], optim="spiel_sm3")
    Trainer(model=model, args=args, callbacks=plugin.add_callbacks_pre_trainer(DictDefault(), model))
    previous = signal.getsignal(signal.SIGINT)
    try:
        setup_signal_handler(DictDefault(local_rank=0, output_dir=str(tmp_path / "out")), model)
        handler = signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, previous)
    with pytest.raises(SystemExit):
        handler(signal.SIGINT, None)  # what Axolotl runs on Ctrl-C during training
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME, CARD_NAME])
