"""`sparse-merge` (sparse_plugin.cli): merge / unmerge / inspect in-process, and every refusal: exit code 2, one
line on stderr naming the problem, and no output directory (nor temporary directory) left behind; also a merge
SIGKILLed half-way, and one that runs out of disk."""

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from adapter_utils import (
    HOSTILE_ADAPTERS,
    KEY,
    TINY,
    dense_reference,
    hostile_copy,
    leftovers,
    os_disk_full,
    read_checkpoint,
    refusal,
    rewrite_failing_at,
    rounded_away_reference,
    saved_setup,
    snapshot,
    tiny_deltas,
)
from cli_utils import assert_refused as _assert_refused
from cli_utils import merge_argv as _merge
from cli_utils import run as _run
from cli_utils import start_stalled_merge as _start_stalled_merge
from cli_utils import unmerge_argv as _unmerge
from conftest import tiny_llama
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sparse_plugin import iter_sparse_layers
from sparse_plugin.io import WEIGHTS_NAME
from sparse_plugin.merge import INDEX_FILE, SINGLE_FILE

# --------------------------------------------------------------------------------------------- success


@pytest.mark.parametrize("store_base_values", [True, False])
def test_merge_then_unmerge(tmp_path, capsys, store_base_values):
    saved = saved_setup(tmp_path, store_base_values=store_base_values)
    counts = sum(layer.indices.numel() for _, layer in iter_sparse_layers(saved.model))

    code, out, err = _run(capsys, *_merge(saved.base, saved.adapter, tmp_path / "merged"))
    assert code == 0 and err == ""  # no progress bar when stderr is not a terminal
    assert re.fullmatch(
        rf"merged {counts:,d} values in 14 tensors over 1 shard\(s\) on cpu in [\d.]+s -> .*merged\n", out
    ), out
    expected = dense_reference(saved.base_state, load_file(saved.adapter / WEIGHTS_NAME))
    merged = read_checkpoint(tmp_path / "merged")
    assert all(torch.equal(merged[k], expected[k]) for k in expected)

    code, out, err = _run(capsys, *_unmerge(tmp_path / "merged", saved.adapter, tmp_path / "restored"))
    assert code == 0 and err == ""
    how = (
        "exactly, from stored base values"
        if store_base_values
        else r"by subtraction \(approximate: the adapter has no base values\)"
    )
    assert re.fullmatch(
        rf"unmerged {counts:,d} values in 14 tensors over 1 shard\(s\) {how} on cpu in [\d.]+s -> .*restored\n", out
    ), out
    restored, base = read_checkpoint(tmp_path / "restored"), read_checkpoint(saved.base)
    assert restored.keys() == base.keys()
    for key in base:
        if store_base_values:
            assert torch.equal(restored[key], base[key]), key
        else:  # (w + v) - v rounds twice in fp32: see test_merge.test_unmerge_without_base_values_is_approximate
            torch.testing.assert_close(restored[key], base[key], atol=1e-7, rtol=0)
    assert leftovers(tmp_path / "merged") == [] and leftovers(tmp_path / "restored") == []


def test_merge_copies_other_files_and_reports_other_weight_formats(tmp_path, capsys):
    saved = saved_setup(tmp_path)
    (saved.base / "tokenizer.json").write_text('{"version": "1.0"}')
    torch.save({"stale": torch.zeros(1)}, saved.base / "pytorch_model.bin")
    code, out, _ = _run(capsys, *_merge(saved.base, saved.adapter, tmp_path / "out"))
    assert code == 0
    assert (
        out.splitlines()[1]
        == "note: pytorch_model.bin (another weight format) was not copied; it would hold unmerged weights"
    )
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json",
        "generation_config.json",
        SINGLE_FILE,
        "tokenizer.json",
    ]
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (tmp_path / "out" / name).read_bytes() == (saved.base / name).read_bytes()


def test_overwrite_replaces_existing_output(tmp_path, capsys):
    saved = saved_setup(tmp_path)
    out = tmp_path / "out"
    (out / "old-subdir").mkdir(parents=True)
    (out / "stale.txt").write_text("old")
    code, _, err = _run(capsys, *_merge(saved.base, saved.adapter, out, "--overwrite"))
    assert code == 0 and err == ""
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", SINGLE_FILE]
    assert leftovers(out) == []


# --------------------------------------------------------------------------------------------- refusals


def _edited_base(saved, tmp_path: Path, edit) -> Path:
    base = tmp_path / "edited-base"
    shutil.copytree(saved.base, base)
    with safe_open(base / SINGLE_FILE, framework="pt") as fh:
        metadata = fh.metadata()
    tensors = load_file(base / SINGLE_FILE)
    edit(tensors)
    save_file(tensors, base / SINGLE_FILE, metadata=metadata)
    return base


def _sharded_base(tmp_path: Path, edit) -> Path:
    base = tmp_path / "sharded-base"
    tiny_llama(0).save_pretrained(base, max_shard_size="60KB")
    shards = sorted(base.glob("model-*.safetensors"))
    assert len(shards) >= 2
    edit(base, shards)
    return base


def _drop_from_index(base: Path, shards) -> None:
    index = json.loads((base / INDEX_FILE).read_text())
    del index["weight_map"][KEY]
    (base / INDEX_FILE).write_text(json.dumps(index))


def _to_bf16(tensors):
    tensors.update({k: v.to(torch.bfloat16) for k, v in tensors.items()})


def _other_seed_base(saved, tmp_path):
    tiny_llama(seed=1).save_pretrained(tmp_path / "other-base")
    return tmp_path / "other-base"


def _no_safetensors_base(saved, tmp_path):
    base = tmp_path / "no-weights"
    base.mkdir()
    shutil.copy(saved.base / "config.json", base)
    return base


# id -> (build(saved, tmp_path) -> argv, regex the one-line refusal must match)
BASE_REFUSALS = {}


def _refusal(case: str, message: str):
    def register(build):
        BASE_REFUSALS[case] = (build, message)
        return build

    return register


@_refusal("base-dir-missing", "model directory not found")
def _(saved, tmp_path):
    return _merge(tmp_path / "nowhere", saved.adapter, tmp_path / "out")


@_refusal("base-without-safetensors", f"no {SINGLE_FILE} or {INDEX_FILE}; save the model with save_pretrained")
def _(saved, tmp_path):
    return _merge(_no_safetensors_base(saved, tmp_path), saved.adapter, tmp_path / "out")


@_refusal("base-missing-target", f"the base has no tensor `{KEY}`")
def _(saved, tmp_path):
    return _merge(_edited_base(saved, tmp_path, lambda t: t.pop(KEY)), saved.adapter, tmp_path / "out")


@_refusal("base-other-shape", rf"`{KEY}` is \[48, 47\] in the base but \[48, 48\] in the adapter")
def _(saved, tmp_path):
    base = _edited_base(saved, tmp_path, lambda t: t.update({KEY: torch.zeros(48, 47)}))
    return _merge(base, saved.adapter, tmp_path / "out")


@_refusal("base-other-dtype", r"`model\.layers\.\S+` is BF16 in the base but was F32 in training; pass --force")
def _(saved, tmp_path):
    return _merge(_edited_base(saved, tmp_path, _to_bf16), saved.adapter, tmp_path / "out")


@_refusal(
    "base-other-weights",
    r"differs from the base the adapter was trained on \(\d+ of \d+ entries at its indices differ, the first "
    r"at flat position \d+: \S+ there, \S+ in the adapter\); pass the right base or --force",
)
def _(saved, tmp_path):
    return _merge(_other_seed_base(saved, tmp_path), saved.adapter, tmp_path / "out")


@_refusal("sharded-base-missing-shard", rf"model-00002-of-\d+\.safetensors: shard listed in {INDEX_FILE} is missing")
def _(saved, tmp_path):
    return _merge(_sharded_base(tmp_path, lambda base, shards: shards[1].unlink()), saved.adapter, tmp_path / "out")


@_refusal("sharded-base-truncated-shard", r"model-00001-of-\d+\.safetensors: not a readable safetensors file")
def _(saved, tmp_path):
    base = _sharded_base(tmp_path, lambda base, shards: shards[0].write_bytes(shards[0].read_bytes()[:500]))
    return _merge(base, saved.adapter, tmp_path / "out")


@_refusal(
    "sharded-base-index-omits-tensor", f"holds `{KEY}`, which {INDEX_FILE} puts in None; the index is inconsistent"
)
def _(saved, tmp_path):
    return _merge(_sharded_base(tmp_path, _drop_from_index), saved.adapter, tmp_path / "out")


@_refusal("unmerge-of-unmerged-base", r"`model\.layers\.\S+` is not this adapter merged into its base")
def _(saved, tmp_path):
    return _unmerge(saved.base, saved.adapter, tmp_path / "out")


@_refusal("output-inside-base", "output must be a new directory outside")
def _(saved, tmp_path):
    return _merge(saved.base, saved.adapter, saved.base / "merged")


def _index_base(saved, tmp_path: Path, shard) -> Path:
    """A base whose index puts every tensor in `shard`, which is not a file beside the index."""
    base = _no_safetensors_base(saved, tmp_path)
    (base / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": dict.fromkeys(saved.base_state, shard)}))
    return base


# Without the refusal, these two read the real base beside them and write the merged shard back over it, since the
# output's temporary directory / shard is that file too: the base snapshot in the test would catch the write.
@_refusal(
    "index-shard-outside-base", rf"{INDEX_FILE}: shard '\.\./base/{SINGLE_FILE}' is not a file name in .*; re-save"
)
def _(saved, tmp_path):
    return _merge(_index_base(saved, tmp_path, f"../base/{SINGLE_FILE}"), saved.adapter, tmp_path / "out")


@_refusal("index-shard-absolute-path", rf"{INDEX_FILE}: shard '/.*/base/{SINGLE_FILE}' is not a file name in")
def _(saved, tmp_path):
    return _merge(_index_base(saved, tmp_path, str(saved.base / SINGLE_FILE)), saved.adapter, tmp_path / "out")


@_refusal("index-shard-not-a-string", rf"{INDEX_FILE}: shard 5 is not a file name in")
def _(saved, tmp_path):
    return _merge(_index_base(saved, tmp_path, 5), saved.adapter, tmp_path / "out")


def _linked_base(saved, tmp_path: Path, name: str, target: Path) -> Path:
    base = tmp_path / "linked-base"
    shutil.copytree(saved.base, base)
    (base / name).parent.mkdir(exist_ok=True)
    (base / name).symlink_to(target)
    return base


@_refusal(
    "base-broken-symlink", r"linked-base/tokenizer\.json: broken symlink \(to .*missing-blob\); re-download the model"
)
def _(saved, tmp_path):
    return _merge(
        _linked_base(saved, tmp_path, "tokenizer.json", tmp_path / "missing-blob"), saved.adapter, tmp_path / "out"
    )


@_refusal(
    "base-symlinked-directory",
    r"linked-base/extra/data: symlinked directory \(to .*/outside\); the merge would copy all of it",
)
def _(saved, tmp_path):
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "big.bin.part").write_bytes(b"\0" * 1024)  # stands for a disk's worth of files
    return _merge(_linked_base(saved, tmp_path, "extra/data", tmp_path / "outside"), saved.adapter, tmp_path / "out")


def _output(argv) -> Path:
    return Path(argv[argv.index("--output") + 1])


ADAPTER_COMMANDS = {
    "merge": lambda s, bad, t: _merge(s.base, bad, t / "out"),
    "unmerge": lambda s, bad, t: _unmerge(s.base, bad, t / "out"),
    "inspect": lambda s, bad, t: ["inspect", bad],
}


@pytest.mark.parametrize("case", sorted(BASE_REFUSALS))
def test_refuses_bad_base_or_output(tmp_path, capsys, case):
    saved = saved_setup(tmp_path)
    build, message = BASE_REFUSALS[case]
    argv = build(saved, tmp_path)
    out = _output(argv)
    base_before = snapshot(saved.base)
    _assert_refused(*_run(capsys, *argv), message)
    assert not out.exists()
    assert leftovers(out) == []
    assert snapshot(saved.base) == base_before


@pytest.mark.parametrize("command", sorted(ADAPTER_COMMANDS))
@pytest.mark.parametrize("case", sorted(HOSTILE_ADAPTERS))
def test_refuses_hostile_adapter(tmp_path, capsys, case, command):
    saved = saved_setup(tmp_path)
    bad = hostile_copy(saved.adapter, tmp_path / "bad-adapter", case)
    _assert_refused(*_run(capsys, *ADAPTER_COMMANDS[command](saved, bad, tmp_path)), refusal(bad, case))
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path / "out") == []


def test_refuses_existing_output_and_leaves_it_alone(tmp_path, capsys):
    saved = saved_setup(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    message = "output directory exists; choose another path or pass --overwrite"
    _assert_refused(*_run(capsys, *_merge(saved.base, saved.adapter, out)), message)
    assert snapshot(out) == {"keep.txt": hashlib.sha256(b"mine").hexdigest()}
    assert leftovers(out) == []


@pytest.mark.parametrize("case", ["base-other-dtype", "base-other-weights"])
def test_force_accepts_other_dtype_or_weights(tmp_path, capsys, case):
    saved = saved_setup(tmp_path)
    argv = BASE_REFUSALS[case][0](saved, tmp_path)
    out = _output(argv)
    code, _, err = _run(capsys, *argv, "--force")
    base = Path(argv[argv.index("--base") + 1])
    base_files, adapter_tensors = read_checkpoint(base), load_file(saved.adapter / WEIGHTS_NAME)
    lost = sum(rounded_away_reference(base_files, adapter_tensors).values())  # bf16 base: 2 of the fp32 deltas
    assert code == 0 and (f" {lost} of " in err if case == "base-other-dtype" else err == ""), err
    # Deltas added in fp32 and rounded once to the base's dtype (bf16 for the dtype case), as plain torch does.
    expected = dense_reference(base_files, adapter_tensors)
    merged = read_checkpoint(out)
    assert merged.keys() == expected.keys()
    assert all(merged[k].dtype == expected[k].dtype and torch.equal(merged[k], expected[k]) for k in expected)


def test_merge_warns_when_a_16_bit_base_rounds_deltas_away(tmp_path, capsys):
    saved = saved_setup(tmp_path, dtype=torch.bfloat16)
    tiny_deltas(saved.adapter)
    counts = sum(layer.indices.numel() for _, layer in iter_sparse_layers(saved.model))
    code, out, err = _run(capsys, *_merge(saved.base, saved.adapter, tmp_path / "merged"))
    assert code == 0 and out.startswith(f"merged {counts:,d} values")
    assert err == (
        f"sparse-merge: warning: {tmp_path / 'merged'}: {TINY} of {counts:,d} deltas rounded away in the base's "
        f"16-bit weights (most in `{KEY}`: {TINY}); to keep them, merge into an fp32 copy of the base or "
        "serve the adapter unmerged (load_adapter)\n"
    )
    expected = dense_reference(saved.base_state, load_file(saved.adapter / WEIGHTS_NAME))
    assert all(torch.equal(v, expected[k]) for k, v in read_checkpoint(tmp_path / "merged").items())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_device_cuda_without_cuda_is_refused(tmp_path, capsys):
    saved = saved_setup(tmp_path)
    argv = _merge(saved.base, saved.adapter, tmp_path / "out")
    argv[argv.index("--device") + 1] = "cuda"
    _assert_refused(*_run(capsys, *argv), "--device cuda: no CUDA device is available; use --device cpu or auto")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path / "out") == []


# --------------------------------------------------------------------------------------------- killed, or out of disk


def _sharded_setup(tmp_path: Path, overwrite: bool):
    """A 2+-shard base with a tokenizer file, its adapter, the output path and the extra flags; with `overwrite`,
    the output already holds a previous result."""
    saved = saved_setup(tmp_path, max_shard_size="60KB")
    (saved.base / "tokenizer.json").write_text('{"version": "1.0"}')
    out = tmp_path / "out"
    if overwrite:
        out.mkdir()
        (out / "previous.txt").write_text("an earlier merge")
    return saved, out, ["--overwrite"] if overwrite else []


@pytest.mark.parametrize("overwrite", [False, True], ids=["new-output", "overwrite"])
def test_merge_killed_mid_write_leaves_no_output_and_the_base_untouched(tmp_path, capsys, overwrite):
    saved, out, extra = _sharded_setup(tmp_path, overwrite)
    base_before, out_before = snapshot(saved.base), snapshot(out) if overwrite else None
    argv = _merge(saved.base, saved.adapter, out, "--quiet", *extra)
    proc = _start_stalled_merge(argv)
    (tmp,) = (out.parent / name for name in leftovers(out))
    assert len(list(tmp.iterdir())) == 2  # mid-merge: the first shard whole, the second half written
    proc.kill()  # SIGKILL: no cleanup can run
    proc.communicate(timeout=60)

    assert snapshot(saved.base) == base_before
    assert (snapshot(out) == out_before) if overwrite else not out.exists()
    assert leftovers(out) == [tmp.name]  # the kill's only trace: a hidden temporary directory, which a rerun ignores
    code, _, err = _run(capsys, *argv)
    assert code == 0 and err == ""
    expected = dense_reference(saved.base_state, load_file(saved.adapter / WEIGHTS_NAME))
    assert all(torch.equal(v, expected[k]) for k, v in read_checkpoint(out).items())
    assert snapshot(saved.base) == base_before


def _fill_disk(monkeypatch, at: str, shards: list[str]) -> str:
    """Make the merge's write of `at` ("second-shard" or "copied-file") hit a full disk; return that file's name."""
    if at == "second-shard":  # safetensors' writer, after writing part of the shard
        monkeypatch.setattr("sparse_plugin.merge.rewrite_shard", rewrite_failing_at(2, os_disk_full))
        return shards[1]
    monkeypatch.setattr(shutil, "copy2", os_disk_full)  # Python's copy of config.json, the first file copied
    return "config.json"


@pytest.mark.parametrize("overwrite", [False, True], ids=["new-output", "overwrite"])
@pytest.mark.parametrize("at", ["second-shard", "copied-file"])
def test_full_disk_mid_merge_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch, at, overwrite):
    saved, out, extra = _sharded_setup(tmp_path, overwrite)
    base_before, out_before = snapshot(saved.base), snapshot(out) if overwrite else None
    name = _fill_disk(monkeypatch, at, sorted(p.name for p in saved.base.glob("model-*.safetensors")))
    message = rf"no space left on device writing {re.escape(str(out / name))}; free space or choose another output directory \(--output\)$"
    _assert_refused(*_run(capsys, *_merge(saved.base, saved.adapter, out, *extra)), message)
    assert (snapshot(out) == out_before) if overwrite else not out.exists()
    assert leftovers(out) == []
    assert snapshot(saved.base) == base_before


# --------------------------------------------------------------------------------------------- inspect


def _expected_summary(saved) -> tuple[list[dict], dict]:
    rows = []
    for key, layer in iter_sparse_layers(saved.model):
        values = layer.values.detach().double().abs()
        rows.append(
            {
                "name": key,
                "shape": list(layer.shape),
                "count": values.numel(),
                "density": values.numel() / (layer.shape[0] * layer.shape[1]),
                "abs_mean": float(values.mean()),
                "abs_max": float(values.max()),
            }
        )
    every = torch.cat([layer.values.detach().double().abs() for _, layer in iter_sparse_layers(saved.model)])
    size = sum(r["shape"][0] * r["shape"][1] for r in rows)
    total = {
        "count": every.numel(),
        "size": size,
        "density": every.numel() / size,
        "abs_mean": float(every.mean()),
        "abs_max": float(every.max()),
    }
    return rows, total


def test_inspect_json(tmp_path, capsys):
    saved = saved_setup(tmp_path)
    code, out, err = _run(capsys, "inspect", saved.adapter, "--json")
    assert code == 0 and err == ""
    summary = json.loads(out)
    rows, total = _expected_summary(saved)
    assert summary["base_model"] == "tiny/base" and summary["method"] == "spiel"
    assert summary["format"] == 1 and summary["has_base_values"] is True
    assert summary["total"]["rounded_away"] == 0 and all(
        t["rounded_away"] == 0 for t in summary["targets"]
    )  # fp32 base
    assert sorted(t["name"] for t in summary["targets"]) == sorted(r["name"] for r in rows)
    by_name = {t["name"]: t for t in summary["targets"]}
    for row in rows:
        got = by_name[row["name"]]
        assert got["shape"] == row["shape"] and got["count"] == row["count"]
        for field in ("density", "abs_mean", "abs_max"):  # fp32 statistics vs fp64 here: 1e-6 relative
            assert got[field] == pytest.approx(row[field], rel=1e-6), (row["name"], field)
    assert summary["total"]["count"] == total["count"] and summary["total"]["size"] == total["size"]
    for field in ("density", "abs_mean", "abs_max"):
        assert summary["total"][field] == pytest.approx(total[field], rel=1e-6), field


def test_inspect_table(tmp_path, capsys):
    saved = saved_setup(tmp_path)
    code, out, err = _run(capsys, "inspect", saved.adapter)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert "method: spiel" in lines[0] and "base model: tiny/base" in lines[0]
    rows, total = _expected_summary(saved)
    body = lines[2:]
    assert len(body) == len(rows) + 1
    printed = {line.split()[0]: line.split() for line in body[:-1]}
    assert sorted(printed) == sorted(r["name"] for r in rows)
    for row in rows:
        assert printed[row["name"]][1:4] == [
            "x".join(map(str, row["shape"])),
            f"{row['count']:,d}",
            f"{row['density']:.4f}",
        ]
    fields = body[-1].split()
    assert fields[:4] == ["total", f"{total['count']:,d}", f"{total['density']:.4f}", "0"]
    assert float(fields[-1]) == pytest.approx(total["abs_max"], rel=1e-3)  # printed with 4 significant digits


def test_inspect_counts_the_deltas_a_16_bit_base_would_round_away(tmp_path, capsys):
    saved = saved_setup(tmp_path, dtype=torch.bfloat16)
    tiny_deltas(saved.adapter)
    code, out, err = _run(capsys, "inspect", saved.adapter, "--json")
    assert code == 0 and err == ""
    summary = json.loads(out)
    assert {t["name"]: t["rounded_away"] for t in summary["targets"] if t["rounded_away"]} == {KEY: TINY}
    assert summary["total"]["rounded_away"] == TINY

    code, out, err = _run(capsys, "inspect", saved.adapter)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[1].split()[4] == "rounded"
    rounded = {line.split()[0]: line.split()[-3] for line in lines[2:-1]}  # the third column from the right
    assert rounded.pop(KEY) == rounded.pop("total") == str(TINY)
    assert set(rounded.values()) == {"0"}
    count = summary["total"]["count"]
    assert lines[-1] == (
        f"note: {TINY} of {count:,d} deltas round away when merged into the base's 16-bit weights; to keep "
        "them, merge into an fp32 copy of the base or serve the adapter unmerged (load_adapter)"
    )


def test_inspect_cannot_count_rounding_without_base_values(tmp_path, capsys):
    saved = saved_setup(tmp_path, dtype=torch.bfloat16, store_base_values=False)
    code, out, _ = _run(capsys, "inspect", saved.adapter, "--json")
    summary = json.loads(out)
    assert code == 0 and summary["total"]["rounded_away"] is None
    assert all(t["rounded_away"] is None for t in summary["targets"])
    code, out, _ = _run(capsys, "inspect", saved.adapter)
    lines = out.splitlines()
    assert code == 0 and all(line.split()[-3] == "n/a" for line in lines[2:-1])
    assert lines[-1].startswith("note: `rounded` cannot be computed without the base's values at the indices")


# --------------------------------------------------------------------------------------------- console script


def test_console_script_help():
    script = Path(sys.executable).parent / "sparse-merge"
    if not script.exists():
        pytest.skip("the sparse-merge console script is not installed in this environment")
    expected = {
        ("merge",): ["--base", "--adapter", "--output", "--device", "--force", "--overwrite", "--quiet"],
        ("unmerge",): ["--merged", "--adapter", "--output", "--device", "--force", "--overwrite", "--quiet"],
        ("inspect",): ["ADAPTER_DIR", "--json"],
    }
    # Started together: each process pays the torch import, so running them side by side saves seconds.
    procs = {
        args: subprocess.Popen([script, *args, "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for args in expected
    }
    for args, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert out.startswith(f"usage: sparse-merge {args[0]}"), out
        for word in expected[args]:
            assert word in out, (args, word)
