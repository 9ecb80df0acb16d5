"""sparse_plugin.peft_interop and `sparse-merge export-peft`: our adapters as stock PEFT Super-Tuning / SHiRA adapters
(loaded by `PeftModel.from_pretrained` in a process that never imports sparse_plugin), and PEFT's adapters read by
`sparse-merge merge`; every comparison is against PEFT's own forward pass or a plain torch scatter."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from adapter_utils import (
    TOKENS,
    base_state,
    dense_reference,
    logits,
    model_with_state,
    read_checkpoint,
    snapshot,
    train_values,
)
from conftest import tiny_llama
from safetensors.torch import load_file, save_file

from sparse_plugin import SparseConfig, iter_sparse_layers, load_adapter, prepare_model, save_adapter
from sparse_plugin.cli import main
from sparse_plugin.io import AdapterError, read_adapter
from sparse_plugin.merge import merge_checkpoint
from sparse_plugin.peft_interop import (
    PEFT_CONFIG_NAME,
    PEFT_WEIGHTS_NAME,
    export_peft,
    pad_delta,
    read_peft_adapter,
    shira_rank,
    supertuning_sparsity,
)

FORMATS = ["supertuning", "shira"]


def _uneven(model):
    """Give each target its own count, as SMT's block selection does (1 for the first, growing by layer and kind)."""
    gen = torch.Generator().manual_seed(3)
    for i, (_, layer) in enumerate(iter_sparse_layers(model)):
        numel = layer.out_features * layer.in_features
        layer.set_indices(torch.randperm(numel, generator=gen)[: 1 if i == 0 else 37 * i % (numel // 3)].sort().values)
    return model


def _adapter(root: Path, name: str, uneven: bool, **config) -> Path:
    """A trained adapter of `tiny_llama(0)` on disk; "merged" forward, so that its logits are PEFT's operation for
    operation (W0 + scatter(values), then one linear)."""
    model = prepare_model(tiny_llama(0), SparseConfig(**{"density": 0.05, "forward_strategy": "merged", **config}))
    if uneven:
        _uneven(model)
    train_values(model)
    save_adapter(model, root / name, base_model_name_or_path="tiny/base")
    return root / name


# Runs where sparse_plugin is not installed: the test's tree is not on sys.path, and the check below proves it.
_STOCK_PEFT = textwrap.dedent("""
    import sys, torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base, tokens, out, *adapters = sys.argv[1:]
    result = {}
    for adapter in adapters:
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
        with torch.no_grad():
            result[adapter] = model(input_ids=torch.load(tokens)).logits
    assert not any(name.startswith("sparse_plugin") for name in sys.modules), "sparse_plugin was imported"
    torch.save(result, out)
""")


def stock_peft_logits(tmp: Path, base: Path, adapters: list[Path]) -> dict[Path, torch.Tensor]:
    """Logits of `PeftModel.from_pretrained(base, adapter)` for each adapter, in one fresh interpreter."""
    torch.save(TOKENS, tmp / "tokens.pt")
    subprocess.run(
        [
            sys.executable,
            "-c",
            _STOCK_PEFT,
            str(base),
            str(tmp / "tokens.pt"),
            str(tmp / "logits.pt"),
            *map(str, adapters),
        ],
        check=True,
        cwd=tmp,
        capture_output=True,
    )
    return {Path(k): v for k, v in torch.load(tmp / "logits.pt").items()}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Our adapters (even SpIEL counts, uneven SMT-like ones) exported in both formats, with stock PEFT's logits."""
    root = tmp_path_factory.mktemp("peft")
    tiny_llama(0).save_pretrained(root / "base")
    cases = {}
    for uneven in (False, True):
        adapter = _adapter(root, f"ours-{uneven}", uneven)
        for format in FORMATS:
            out = root / f"peft-{format}-{uneven}"
            assert main(["export-peft", str(adapter), str(out), "--format", format]) == 0
            cases[format, uneven] = (adapter, out)
    peft_logits = stock_peft_logits(root, root / "base", [out for _, out in cases.values()])
    return root, {key: (adapter, out, peft_logits[out]) for key, (adapter, out) in cases.items()}


@pytest.mark.parametrize("uneven", [False, True], ids=["even", "uneven"])
@pytest.mark.parametrize("format", FORMATS)
def test_export_gives_stock_peft_our_logits(exported, format, uneven):
    _, cases = exported
    adapter, _, peft_logits = cases[format, uneven]
    ours = logits(load_adapter(tiny_llama(0), adapter))
    # Both compute W0 + scatter(values) in fp32 (padding adds exact zeros) and one linear: the same operations.
    assert torch.equal(peft_logits, ours)
    assert not torch.equal(peft_logits, logits(tiny_llama(0)))  # the adapter does change them


@pytest.mark.parametrize("uneven", [False, True], ids=["even", "uneven"])
@pytest.mark.parametrize("format", FORMATS)
def test_export_holds_every_count_in_the_fewest_positions(exported, format, uneven):
    _, cases = exported
    adapter, out, _ = cases[format, uneven]
    targets = read_adapter(adapter).targets
    config = json.loads((out / PEFT_CONFIG_NAME).read_text())
    tensors = load_file(out / PEFT_WEIGHTS_NAME)
    assert sorted(config["target_modules"]) == sorted(k.removesuffix(".weight") for k in targets)
    slack = []
    for key, target in targets.items():
        module = "base_model.model." + key.removesuffix(".weight")
        out_f, in_f = target.shape
        if format == "supertuning":
            flat = tensors[f"{module}.supertuning_indices"].long()
            values = tensors[f"{module}.supertuning_values"]
            assert flat.numel() == int(out_f * in_f * (1 - config["sparsity"]))  # PEFT's own allocation
        else:
            rows, cols = tensors[f"{module}.shira_indices"].long()
            flat, values = rows * in_f + cols, tensors[f"{module}.shira_weight"]
            assert flat.numel() == config["r"] * (in_f + out_f)
        assert flat.unique().numel() == flat.numel()
        trained = torch.isin(flat, target.indices)
        assert torch.equal(values[trained], target.values.float())  # every trained value, at its position
        assert not values[~trained].any()  # padding is 0
        slack.append(flat.numel() - target.indices.numel())
    if format == "supertuning":
        assert min(slack) == 0  # the tightest target is filled exactly: no higher sparsity would hold it
    else:
        assert config["r"] == 1 or any(  # r - 1 would not hold some target
            (config["r"] - 1) * sum(t.shape) < t.indices.numel() for t in targets.values()
        )


def test_merge_of_exported_adapter_equals_peft_model(exported):
    """The reverse: `sparse-merge merge` folds a PEFT adapter; the merged model's logits are PeftModel's."""
    root, cases = exported
    for (format, uneven), (adapter, out, peft_logits) in cases.items():
        merged = root / f"merged-{format}-{uneven}"
        assert (
            main(
                [
                    "merge",
                    "--base",
                    str(root / "base"),
                    "--adapter",
                    str(out),
                    "--output",
                    str(merged),
                    "--device",
                    "cpu",
                    "--quiet",
                ]
            )
            == 0
        )
        reference = dense_reference(
            base_state(),
            {
                f"{k}.{part}": getattr(t, part)
                for k, t in read_adapter(adapter).targets.items()
                for part in ("indices", "values")
            },
        )
        state = read_checkpoint(merged)
        for key in reference:
            assert torch.equal(state[key], reference[key]), (format, key)
        torch.testing.assert_close(logits(model_with_state(state)), peft_logits, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("format", FORMATS)
def test_merge_of_native_peft_adapter_equals_peft_model(tmp_path, format):
    """An adapter written by peft itself (random positions and values), merged: logits equal PeftModel's."""
    from peft import PeftModel, ShiraConfig, SupertuningConfig, get_peft_model

    tiny_llama(0).save_pretrained(tmp_path / "base")
    config = (
        SupertuningConfig(sparsity=0.9, init_weights=False, target_modules=["q_proj", "down_proj"])
        if format == "supertuning"
        else ShiraConfig(r=2, init_weights=False, target_modules=["q_proj", "down_proj"])
    )
    get_peft_model(tiny_llama(0), config).save_pretrained(tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(tiny_llama(0), tmp_path / "peft").eval()
    result = merge_checkpoint(tmp_path / "base", tmp_path / "peft", tmp_path / "merged", device="cpu", progress=False)
    assert result["tensors"] == 4
    merged = model_with_state(read_checkpoint(tmp_path / "merged"))
    # PEFT adds the delta to a copy of W0 for each call, as the merge adds it once: the same fp32 sums.
    torch.testing.assert_close(logits(merged), logits(peft_model), atol=1e-6, rtol=1e-6)
    result = merge_checkpoint(
        tmp_path / "merged", tmp_path / "peft", tmp_path / "unmerged", unmerge=True, device="cpu", progress=False
    )
    assert result["exact"] is False  # PEFT stores no base values: unmerged by subtraction, within fp32 rounding
    for key, weight in read_checkpoint(tmp_path / "unmerged").items():
        torch.testing.assert_close(weight, base_state()[key], atol=1e-6, rtol=0)


def test_read_peft_sums_repeated_positions(tmp_path):
    """PEFT's scatter-add (and SHiRA's sparse COO) sum a position given twice; so does the converted adapter."""
    key, module = "model.layers.0.self_attn.q_proj.weight", "base_model.model.model.layers.0.self_attn.q_proj"
    (tmp_path / PEFT_CONFIG_NAME).write_text(json.dumps({"peft_type": "SUPERTUNING", "sparsity": 0.99}))
    save_file(
        {
            f"{module}.supertuning_indices": torch.tensor([7, 3, 7], dtype=torch.int32),
            f"{module}.supertuning_values": torch.tensor([1.0, 2.0, 0.5]),
        },
        tmp_path / PEFT_WEIGHTS_NAME,
    )
    adapter = read_peft_adapter(tmp_path, {key: ((48, 48), "F32")})
    target = adapter.targets[key]
    assert target.indices.tolist() == [3, 7] and target.values.tolist() == [2.0, 1.5]
    assert target.base_values is None and target.base_dtype == "F32" and not adapter.has_base_values


# --------------------------------------------------------------------------------------------- allocation


def test_supertuning_sparsity_is_the_largest_that_holds_every_count():
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        shapes = [tuple(int(d) for d in torch.randint(1, 400, (2,), generator=gen)) for _ in range(4)]
        counts = [int(torch.randint(0, s[0] * s[1] + 1, (), generator=gen)) for s in shapes]
        sparsity = supertuning_sparsity(list(zip(shapes, counts)))
        slots = [int(s[0] * s[1] * (1 - sparsity)) for s in shapes]
        assert 0.0 <= sparsity < 1.0
        assert all(slot >= max(count, 1) for slot, count in zip(slots, counts))
        assert min(slot - max(count, 1) for slot, count in zip(slots, counts)) == 0


def test_shira_rank_is_the_smallest_that_holds_every_count():
    shapes_counts = [((48, 48), 96), ((24, 48), 145), ((80, 48), 0)]
    assert shira_rank(shapes_counts) == 3  # 145 > 2·72 = 144
    assert shira_rank([((48, 48), 0)]) == 1


def test_pad_delta_adds_untrained_positions_at_zero():
    indices, values = torch.tensor([0, 1, 2, 5, 9]), torch.arange(1.0, 6.0)
    padded, padded_values = pad_delta(indices, values, 9)
    assert padded.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 9]
    assert padded_values.tolist() == [1.0, 2.0, 3.0, 0.0, 0.0, 4.0, 0.0, 0.0, 5.0]
    assert padded_values.dtype == torch.float32


# --------------------------------------------------------------------------------------------- refusals


def _refused(capsys, argv, message):
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("sparse-merge: error: ")
    assert message in err, err


def test_shira_refuses_a_target_too_small_for_the_rank(tmp_path, capsys):
    adapter = _adapter(tmp_path, "dense", False, density=0.9)  # down_proj's 3,456 need r=27; k_proj (24x48) holds r≤16
    _refused(
        capsys,
        ["export-peft", adapter, tmp_path / "out", "--format", "shira"],
        "`model.layers.0.self_attn.k_proj.weight` (24x48) cannot hold SHiRA's r·(in+out) = 1,944 positions at "
        "r=27, the rank that `model.layers.0.mlp.down_proj.weight`'s 3,456 values need; export with --format supertuning",
    )
    assert not (tmp_path / "out").exists()
    assert main(["export-peft", str(adapter), str(tmp_path / "out")]) == 0  # Super-Tuning holds any counts


def test_export_refuses_an_existing_output(tmp_path, capsys):
    adapter = _adapter(tmp_path, "a", False)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    _refused(
        capsys,
        ["export-peft", adapter, tmp_path / "out"],
        "output directory exists; choose another path or pass --overwrite",
    )
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    assert main(["export-peft", str(adapter), str(tmp_path / "out"), "--overwrite"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME]
    before = snapshot(adapter)
    for out in (adapter, tmp_path):  # the adapter read is never replaced, nor is a directory around it
        _refused(
            capsys,
            ["export-peft", adapter, out, "--overwrite"],
            f"output must be a new directory outside the adapter ({adapter})",
        )
    assert snapshot(adapter) == before


@pytest.mark.parametrize(
    "config, message",
    [
        (
            {"peft_type": "LORA", "r": 8},
            "a PEFT 'LORA' adapter; sparse-merge reads SHIRA and SUPERTUNING adapters only",
        ),
        ({"peft_type": "SUPERTUNING", "sparsity": 0.9, "r": 4}, "`r` is 4: its Supra LoRA part is not sparse"),
        (
            {"peft_type": "SUPERTUNING", "sparsity": 0.9, "save_precomputed_indices": False},
            "`save_precomputed_indices` is False: its positions are not saved",
        ),
        (
            {"peft_type": "SHIRA", "r": 2, "fan_in_fan_out": True},
            "`fan_in_fan_out` is True: its weights are transposed",
        ),
        (
            {"peft_type": "SHIRA", "r": 2, "modules_to_save": ["lm_head"]},
            "`modules_to_save` is ['lm_head']: it also saves",
        ),
    ],
)
def test_merge_refuses_peft_adapters_it_cannot_fold(tmp_path, capsys, config, message):
    tiny_llama(0).save_pretrained(tmp_path / "base")
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / PEFT_CONFIG_NAME).write_text(json.dumps(config))
    save_file(
        {"base_model.model.model.layers.0.self_attn.q_proj.x": torch.zeros(1)}, tmp_path / "peft" / PEFT_WEIGHTS_NAME
    )
    _refused(
        capsys,
        [
            "merge",
            "--base",
            tmp_path / "base",
            "--adapter",
            tmp_path / "peft",
            "--output",
            tmp_path / "out",
            "--device",
            "cpu",
        ],
        message,
    )
    assert not (tmp_path / "out").exists()


def test_merge_refuses_a_peft_adapter_for_another_base(tmp_path, capsys):
    adapter = _adapter(tmp_path, "a", False)
    assert main(["export-peft", str(adapter), str(tmp_path / "peft")]) == 0
    tiny_llama(0, num_hidden_layers=1).save_pretrained(tmp_path / "base")
    _refused(
        capsys,
        [
            "merge",
            "--base",
            tmp_path / "base",
            "--adapter",
            tmp_path / "peft",
            "--output",
            tmp_path / "out",
            "--device",
            "cpu",
        ],
        "the base has no tensor `model.layers.1.",
    )


def test_load_adapter_names_a_peft_directory(tmp_path):
    adapter = _adapter(tmp_path, "a", False)
    export_peft(adapter, tmp_path / "peft")
    with pytest.raises(AdapterError, match="a PEFT adapter, not a sparse_plugin one; `sparse-merge merge` folds"):
        load_adapter(tiny_llama(0), tmp_path / "peft")


def test_the_cli_offers_the_formats_the_exporter_writes():
    """`sparse-merge --help` loads no torch, so its `--format` choices are spelled out there: keep them in step."""
    import argparse

    from sparse_plugin import peft_interop
    from sparse_plugin.cli import _parser

    export = next(a for a in _parser()._subparsers._actions if isinstance(a, argparse._SubParsersAction))
    choices = next(a.choices for a in export.choices["export-peft"]._actions if a.dest == "format")
    assert tuple(choices) == peft_interop.FORMATS
