"""`optim="spiel_sm3"|"spiel_adamw"` through the stock Trainer and TRL's SFTTrainer, with SparseCallback."""

import json

import pytest
import torch
from conftest import tiny_llama
from datasets import Dataset
from transformers import LlamaForCausalLM, Trainer, TrainingArguments

import sparse_plugin
from sparse_plugin import SM3, SparseAdamW, SparseCallback, SparseConfig, iter_sparse_layers, prepare_model
from sparse_plugin.cli import main
from sparse_plugin.io import CONFIG_NAME, WEIGHTS_NAME


def _dataset(rows=24, length=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (rows, length), generator=gen)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def _args(tmp_path, **overrides):
    base = {
        "output_dir": str(tmp_path / "out"),
        "per_device_train_batch_size": 4,
        "max_steps": 6,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "seed": 0,
        "data_seed": 0,
        "disable_tqdm": True,
        "optim": "spiel_sm3",
    }
    return TrainingArguments(**(base | overrides))


def _prepared(**config):
    return prepare_model(
        tiny_llama(),
        SparseConfig(**({"density": 0.05, "reselection_steps": 2, "selection_accumulation_steps": 1} | config)),
    )


@pytest.mark.parametrize("name, cls", [("spiel_sm3", SM3), ("spiel_adamw", SparseAdamW)])
def test_trainer_builds_our_optimizer_from_the_name(tmp_path, name, cls):
    model = _prepared(regrow="ma" if cls is SM3 else "ag")
    args = _args(
        tmp_path,
        optim=name,
        adam_beta1=0.8,
        weight_decay=0.01,
        optim_args="momentum=0.9,beta=0.5" if cls is SM3 else "eps=1e-7,regrown_start=ramp",
    )
    trainer = Trainer(model=model, args=args, train_dataset=_dataset())
    optimizer = trainer.create_optimizer()
    assert type(optimizer) is cls and optimizer.selector is not None and optimizer.selector.total_steps == 6
    group = optimizer.param_groups[0]
    assert group["lr"] == 1e-2 and group["weight_decay"] == 0.01
    if cls is SM3:
        assert group["momentum"] == 0.9 and group["beta"] == 0.5
    else:
        assert group["betas"] == (0.8, 0.999) and group["eps"] == 1e-7 and group["regrown_start"] == "ramp"


def test_unknown_optim_arg_is_refused(tmp_path):
    trainer = Trainer(model=_prepared(), args=_args(tmp_path, optim_args="rank=4"), train_dataset=_dataset())
    with pytest.raises(
        ValueError, match="`optim_args` key 'rank' is not understood by SM3; allowed: \\['beta', 'eps', 'momentum'\\]"
    ):
        trainer.create_optimizer()


def test_deepspeed_is_refused_with_the_supported_alternatives(tmp_path):
    args = _args(tmp_path)
    args.deepspeed = {"zero_optimization": {"stage": 2}}  # set after construction: building it needs deepspeed
    trainer = Trainer(model=_prepared(), args=_args(tmp_path), train_dataset=_dataset())
    trainer.args = args
    with pytest.raises(
        ValueError, match="cannot run under DeepSpeed.*train with FSDP \\(fsdp=True, with SparseCallback\\) or DDP"
    ):
        trainer.create_optimizer()


def _with_fsdp_plugin(monkeypatch):
    """Put an FSDP plugin in accelerate's shared state, as a GPU run with `fsdp=True` has (on CPU accelerate runs
    DDP instead); after the Trainer is built, whose Accelerator resets that state."""
    from types import SimpleNamespace

    from accelerate.state import AcceleratorState

    plugin = SimpleNamespace(ignored_modules=None)
    monkeypatch.setitem(AcceleratorState._shared_state, "fsdp_plugin", plugin)
    return plugin


def test_fsdp_without_the_callback_is_refused(tmp_path, monkeypatch):
    trainer = Trainer(model=_prepared(), args=_args(tmp_path), train_dataset=_dataset())
    _with_fsdp_plugin(monkeypatch)
    with pytest.raises(
        ValueError,
        match="under FSDP needs the sparse deltas kept out of FSDP's shards: pass callbacks=\\[SparseCallback\\(\\)\\]",
    ):
        trainer.create_optimizer()


def test_callback_keeps_the_deltas_out_of_fsdp_and_keeps_the_users_ignored_modules(tmp_path, monkeypatch):
    model = _prepared()
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=_dataset(), callbacks=[SparseCallback()])
    plugin = _with_fsdp_plugin(monkeypatch)
    plugin.ignored_modules = "lm_head"  # a user's regex, as accelerate accepts it
    trainer.callback_handler.on_init_end(trainer.args, trainer.state, trainer.control)
    deltas = [layer.delta for _, layer in iter_sparse_layers(model)]
    assert plugin.ignored_modules[0] is model.lm_head
    assert len(plugin.ignored_modules) == 1 + len(deltas)
    assert all(a is b for a, b in zip(plugin.ignored_modules[1:], deltas))
    assert type(trainer.create_optimizer()) is SM3  # and the optimizer then accepts the run


def test_model_without_sparse_layers_gets_a_clear_error(tmp_path):
    trainer = Trainer(model=tiny_llama(), args=_args(tmp_path), train_dataset=_dataset())
    with pytest.raises(
        ValueError, match="call `model = sparse_plugin.prepare_model\\(model, SparseConfig\\(...\\)\\)`"
    ):
        trainer.create_optimizer()


def test_training_writes_adapters_logs_metrics_and_regrows(tmp_path):
    model = _prepared()
    before = [layer.indices.clone() for _, layer in iter_sparse_layers(model)]
    args = _args(tmp_path, save_strategy="steps", save_steps=3, gradient_accumulation_steps=2, max_grad_norm=1.0)
    trainer = Trainer(model=model, args=args, train_dataset=_dataset(), callbacks=[SparseCallback()])
    trainer.train()
    out = tmp_path / "out"
    for directory in (out / "checkpoint-3", out / "checkpoint-6", out):
        assert (directory / WEIGHTS_NAME).is_file() and (directory / CONFIG_NAME).is_file()
    history = trainer.state.log_history
    assert all("sparse/mean_abs_delta" in row for row in history if "loss" in row)
    assert [row["step"] for row in history if "sparse/regrown" in row] == [2, 4]
    after = [layer.indices for _, layer in iter_sparse_layers(model)]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    reloaded = sparse_plugin.load_adapter(tiny_llama(), out)
    ids = torch.randint(3, 97, (2, 9))
    torch.testing.assert_close(reloaded(ids).logits, model.eval()(ids).logits, atol=1e-5, rtol=1e-5)


SMT = {"method": "smt", "density": 0.2, "block_size": 16, "warmup_steps": 2}
SIFT = {"method": "sift", "density": 0.2, "selection_steps": 2}


@pytest.mark.parametrize("config", [SMT, SIFT], ids=["smt", "sift"])
def test_smt_and_sift_train_save_merge_and_reload(tmp_path, config):
    model = _prepared(**config)
    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    args = _args(tmp_path, optim="spiel_adamw", save_strategy="steps", save_steps=3, gradient_accumulation_steps=2)
    trainer = Trainer(model=model, args=args, train_dataset=_dataset(), callbacks=[SparseCallback()])
    trainer.train()
    layers = list(iter_sparse_layers(model))
    assert all(bool((layer.values != 0).any()) for _, layer in layers if layer.indices.numel())
    selected = [row for row in trainer.state.log_history if "sparse/trained_values" in row]
    assert [row["step"] for row in selected] == [config.get("warmup_steps", 1)]
    out = tmp_path / "out"
    ids = torch.randint(3, 97, (2, 9))
    expected = model.eval()(ids).logits
    torch.testing.assert_close(
        sparse_plugin.load_adapter(tiny_llama(), out)(ids).logits, expected, atol=1e-5, rtol=1e-5
    )
    assert main(["merge", "--base", str(base_dir), "--adapter", str(out), "--output", str(tmp_path / "merged")]) == 0
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(merged(ids).logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "optim, config",
    [("spiel_sm3", {"regrow": "ma"}), ("spiel_adamw", {"regrow": "ag"}), ("spiel_adamw", SMT), ("spiel_sm3", SIFT)],
    ids=["ma", "ag", "smt", "sift"],
)
def test_resume_from_checkpoint_continues_like_an_uninterrupted_run(tmp_path, optim, config):
    def run(directory, resume=None, max_steps=6):
        model = _prepared(**config)
        args = _args(directory, optim=optim, save_strategy="steps", save_steps=3, max_steps=max_steps)
        trainer = Trainer(model=model, args=args, train_dataset=_dataset(), callbacks=[SparseCallback()])
        trainer.train(resume_from_checkpoint=resume)
        return trainer, model

    full, full_model = run(tmp_path / "a")
    resumed, resumed_model = run(tmp_path / "b", resume=str(tmp_path / "a" / "out" / "checkpoint-3"))

    def losses(t):
        return {row["step"]: row["loss"] for row in t.state.log_history if "loss" in row}

    assert losses(resumed)[4] == losses(full)[4]  # the next step after the checkpoint, bit for bit on CPU
    for (_, a), (_, b) in zip(iter_sparse_layers(full_model), iter_sparse_layers(resumed_model)):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.values, b.values)


@pytest.mark.parametrize("extra", [{"gradient_checkpointing": True}, {"bf16": True}])
def test_works_with_gradient_checkpointing_and_bf16_autocast(tmp_path, extra):
    model = _prepared()
    trainer = Trainer(
        model=model, args=_args(tmp_path, max_steps=4, **extra), train_dataset=_dataset(), callbacks=[SparseCallback()]
    )
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert any(layer.values.abs().sum() > 0 for _, layer in iter_sparse_layers(model))


def test_evaluation_during_training(tmp_path):
    model = _prepared()
    args = _args(tmp_path, eval_strategy="steps", eval_steps=3, per_device_eval_batch_size=4)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=_dataset(),
        eval_dataset=_dataset(8, seed=1),
        callbacks=[SparseCallback()],
    )
    trainer.train()
    assert [row["step"] for row in trainer.state.log_history if "eval_loss" in row] == [3, 6]


def test_trl_sft_trainer(tmp_path, tiny_tokenizer):
    trl = pytest.importorskip("trl")
    model = _prepared(regrow="ag")
    text = Dataset.from_dict({"text": [" ".join(f"w{i % 90}" for i in range(s, s + 10)) for s in range(16)]})
    config = trl.SFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        optim="spiel_adamw",
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        max_length=16,
        disable_tqdm=True,
    )
    trainer = trl.SFTTrainer(
        model=model, args=config, train_dataset=text, processing_class=tiny_tokenizer, callbacks=[SparseCallback()]
    )
    assert isinstance(trainer.create_optimizer(), SparseAdamW)
    trainer.train()
    assert (tmp_path / "sft" / WEIGHTS_NAME).is_file()
    assert json.loads((tmp_path / "sft" / CONFIG_NAME).read_text())["method"] == "spiel"


def test_torch_compile_matches_eager(tmp_path):
    # Sparse layers run eagerly inside the compiled graph (torch.compiler.disable), the rest is compiled.
    losses = []
    for compile_ in (False, True):
        model = _prepared()
        trainer = Trainer(
            model=model,
            args=_args(tmp_path / str(compile_), max_steps=3, torch_compile=compile_),
            train_dataset=_dataset(),
            callbacks=[SparseCallback()],
        )
        trainer.train()
        losses.append([row["loss"] for row in trainer.state.log_history if "loss" in row])
    # Inductor fuses and reorders fp32 reductions: agreement to ~1e-4 relative, not bit for bit.
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)


def test_trains_over_a_bitsandbytes_4bit_base_and_still_refuses_a_purely_quantized_one(tmp_path):
    pytest.importorskip("bitsandbytes")  # installed with axolotl: runs in `make test-compat`
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_llama(hidden_size=64, intermediate_size=128).save_pretrained(tmp_path / "base")  # bnb's CPU kernels want 64s
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    load = lambda: AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=nf4)  # noqa: E731
    with pytest.raises(ValueError, match="purely quantized"):
        Trainer(model=load(), args=_args(tmp_path), train_dataset=_dataset())
    model = prepare_model(load(), SparseConfig(density=0.05, reselection_steps=2, selection_accumulation_steps=1))
    assert type(model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    trainer = Trainer(
        model=model, args=_args(tmp_path, max_steps=3), train_dataset=_dataset(), callbacks=[SparseCallback()]
    )
    trainer.train()
    assert all(layer.values.abs().sum() > 0 for _, layer in iter_sparse_layers(model))
