"""`sparse-merge` against the faults a careful user or an adversary meets: adapters whose recorded shapes, counts or
dtypes are not the base's, outputs that would replace or sit inside an input, signals mid-merge, refusals that must
leave the file system as found, two merges racing to one output, and adapters without base values applied to the
wrong base or merged model. Every refusal: exit code 2, one stderr line, nothing written."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from adapter_utils import (
    IDX,
    KEY,
    KEY_NUMEL,
    dense_reference,
    edit_meta,
    edit_tensors,
    hub_cache_layout,
    leftovers,
    os_disk_full,
    read_checkpoint,
    rewrite_failing_at,
    saved_setup,
)
from cli_utils import assert_refused, merge_argv, run, start_stalled_merge, unmerge_argv
from conftest import tiny_llama
from safetensors.torch import load_file

import sparse_plugin.merge
from sparse_plugin import SparseConfig, prepare_model, save_adapter
from sparse_plugin.io import CONFIG_NAME, WEIGHTS_NAME


def _tree(root: Path) -> dict[str, str]:
    """Every path under `root`, directories included, with each file's bytes: equal trees mean nothing was created,
    removed or changed there."""
    return {str(p.relative_to(root)): p.read_bytes().hex() if p.is_file() else "dir" for p in sorted(root.rglob("*"))}


def _loading_forbidden(monkeypatch) -> None:
    """Make loading any checkpoint tensor fail the test: a claim must be refused from the headers alone."""

    def rewrite_shard_(*_args, **_kwargs):
        raise AssertionError("a shard was read before the adapter's claims were checked")

    monkeypatch.setattr("sparse_plugin.merge.rewrite_shard", rewrite_shard_)


# --------------------------------------------------------------------------------------------- recorded claims


def _claim(shape=None, count=None, dtype=None):
    """An edit of `KEY`'s entry in sparse_config.json (its `base_fingerprint` untouched, so it still matches the
    base), with tensors rewritten to agree with the claim, as an adversary would: `count` positions at the top
    of the claimed shape's range, beyond the real base's."""

    def edit(directory: Path) -> None:
        meta = json.loads((directory / CONFIG_NAME).read_text())
        entry = meta["targets"][KEY]
        entry.update({k: v for k, v in (("shape", shape), ("count", count), ("dtype", dtype)) if v is not None})
        if count is not None or (shape and shape[0] * shape[1] > KEY_NUMEL):
            numel, n = entry["shape"][0] * entry["shape"][1], entry["count"]

            def rewrite(tensors):
                tensors[IDX] = torch.arange(numel - n, numel, dtype=torch.int32)
                tensors[f"{KEY}.values"] = torch.full((n,), 0.01)
                if f"{KEY}.base_values" in tensors:
                    tensors[f"{KEY}.base_values"] = torch.zeros(n)

            edit_tensors(rewrite)(directory)
        (directory / CONFIG_NAME).write_text(json.dumps(meta))

    return edit


CLAIMS = {  # id -> (edit, store_base_values, regex naming both sides)
    "same-size-other-shape": (
        _claim(shape=[24, 96]),
        True,
        rf"`{KEY}` is \[48, 48\] in the base but \[24, 96\] in the adapter",
    ),
    "larger-shape": (
        _claim(shape=[48, 96]),
        True,
        rf"`{KEY}` is \[48, 48\] in the base but \[48, 96\] in the adapter",
    ),
    "count-beyond-the-base": (
        _claim(shape=[96, 96], count=KEY_NUMEL + 100),
        True,
        rf"`{KEY}` is \[48, 48\] in the base but \[96, 96\] in the adapter",
    ),
    "other-dtype": (
        _claim(dtype="BF16"),
        False,
        rf"`{KEY}` is F32 in the base but was BF16 in training; pass --force",
    ),
}


@pytest.mark.parametrize("command", ["merge", "unmerge"])
@pytest.mark.parametrize("case", sorted(CLAIMS))
def test_every_claim_is_checked_against_the_base_headers(tmp_path, capsys, monkeypatch, case, command):
    edit, store_base_values, message = CLAIMS[case]
    saved = saved_setup(tmp_path, store_base_values=store_base_values)
    edit(saved.adapter)
    merged = tmp_path / "merged"
    if command == "unmerge":  # a model that really is this base merged, so only the claim is wrong
        shutil.copytree(saved.base, merged)
    _loading_forbidden(monkeypatch)
    build = merge_argv if command == "merge" else unmerge_argv
    argv = build(saved.base if command == "merge" else merged, saved.adapter, tmp_path / "out")
    assert_refused(*run(capsys, *argv), message)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path / "out") == []


# --------------------------------------------------------------------------------------------- output over an input


def _hub_base(saved, tmp_path):
    hub_cache_layout(saved.base, tmp_path / "blobs")
    return tmp_path / "blobs"


OUTPUTS = {  # id -> (output(saved, tmp_path), the input's role named in the refusal)
    "the-adapter": (lambda s, t: s.adapter, "adapter"),
    "the-base": (lambda s, t: s.base, "base"),
    "their-parent": (lambda s, t: t, "base"),
    "relative-with-dots": (lambda s, t: Path("base/../adapter"), "adapter"),
    "link-to-the-adapter": (lambda s, t: (t / "link").symlink_to(s.adapter) or t / "link", "adapter"),
    "inside-a-link-to-the-base": (lambda s, t: (t / "link").symlink_to(s.base) or t / "link" / "merged", "base"),
    "hub-blobs-the-base-links-to": (_hub_base, "base"),
}


@pytest.mark.parametrize("command", ["merge", "unmerge"])
@pytest.mark.parametrize("case", sorted(OUTPUTS))
def test_output_never_replaces_or_sits_inside_an_input(tmp_path, capsys, monkeypatch, case, command):
    saved = saved_setup(tmp_path)
    monkeypatch.chdir(tmp_path)  # relative outputs resolve from here
    output, role = OUTPUTS[case]
    output = output(saved, tmp_path)
    model = saved.base
    if command == "unmerge":  # the merged model is the input there
        model = tmp_path / "base"
        role = {"base": "merged model"}.get(role, role)
    before = _tree(tmp_path)
    build = merge_argv if command == "merge" else unmerge_argv
    message = rf"{output}: output must be a new directory outside the {role} \(.*\) and not contain it; choose another --output$"
    assert_refused(*run(capsys, *build(model, saved.adapter, output, "--overwrite", "--force")), message)
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("command", ["merge", "unmerge"])
def test_output_inside_the_adapter_directory_leaves_the_adapter_whole(tmp_path, capsys, command):
    """Axolotl's `sparse_merge_on_finish` merges into OUTPUT_DIR/merged, beside the adapter it reads."""
    saved = saved_setup(tmp_path)
    adapter_files = {p.name: p.read_bytes() for p in saved.adapter.iterdir()}
    model = saved.base
    if command == "unmerge":
        model = tmp_path / "merged"
        assert run(capsys, *merge_argv(saved.base, saved.adapter, model))[0] == 0
    build = merge_argv if command == "merge" else unmerge_argv
    for overwrite in ((), ("--overwrite",)):
        code, _, err = run(capsys, *build(model, saved.adapter, saved.adapter / "out", *overwrite))
        assert code == 0, err
    assert {p.name: p.read_bytes() for p in saved.adapter.iterdir() if p.is_file()} == adapter_files


# --------------------------------------------------------------------------------------------- signals

# Runs one merge per (point, signal) in a subprocess, each sending itself a real signal at that point of the merge,
# then merges repeatedly with the signal sent by a timer at random moments; prints one JSON line per merge.
_SIGNALLED_MERGES = """
import contextlib, io, json, os, random, shutil, signal, sys, tempfile, threading, time
from pathlib import Path
sys.path.insert(0, {tests!r})
import sparse_plugin.atomic, sparse_plugin.merge
from sparse_plugin.cli import main

base, adapter, root = map(Path, sys.argv[1:4])
SIGNALS = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP]

def send(signum):
    os.kill(os.getpid(), signum)  # handled between two bytecodes, as a signal from outside would be

def merge(name, patches=()):
    output = root / name / "a" / "b" / "out"  # parents to create, and to remove on the way out
    originals = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in patches]
    for owner, attr, wrap in patches:
        setattr(owner, attr, wrap(getattr(owner, attr)))
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["merge", "--base", str(base), "--adapter", str(adapter), "--output", str(output), "--device", "cpu"])
    finally:
        for owner, attr, original in originals:
            setattr(owner, attr, original)
    print(json.dumps({{"name": name, "code": code, "out": out.getvalue(), "err": err.getvalue(),
                       "left": sorted(str(p.relative_to(root / name)) for p in (root / name).rglob("*")) if (root / name).exists() else None}}), flush=True)

def after(signum, times=1):
    def wrap(fn):
        def wrapped(*args, **kwargs):
            result = fn(*args, **kwargs)
            for _ in range(times):
                send(signum)
            return result
        return wrapped
    return wrap

def before(signum):
    def wrap(fn):
        def wrapped(*args, **kwargs):
            send(signum)
            return fn(*args, **kwargs)
        return wrapped
    return wrap

merge_module, atomic = sparse_plugin.merge, sparse_plugin.atomic
for signum in SIGNALS:
    tag = signal.Signals(signum).name
    merge("reading-" + tag, [(merge_module, "read_adapter", after(signum))])
    merge("temp-dir-created-" + tag, [(atomic.tempfile, "mkdtemp", after(signum))])  # before its name is kept
    merge("shard-written-" + tag, [(merge_module, "rewrite_shard", after(signum))])
    merge("file-copied-" + tag, [(shutil, "copy2", after(signum))])
    merge("again-during-cleanup-" + tag, [(merge_module, "rewrite_shard", after(signum)), (atomic.shutil, "rmtree", before(signum))])

# At random moments: a signal landing after the merge finished must not kill this loop, so it is ignored then.
for signum in SIGNALS:
    signal.signal(signum, lambda *_: None)
merge("warm-up")
started = time.perf_counter()
merge("unsignalled")
duration = time.perf_counter() - started
rng = random.Random(0)
for i in range({repeats}):
    timer = threading.Timer(rng.uniform(0, duration), send, (SIGNALS[i % 3],))
    timer.start()
    merge(f"random-{{i}}")
    timer.join()
"""
RANDOM_REPEATS = 24  # at ~0.1 s a merge, enough that several land in each phase, including the first instants
_INTERRUPTED = r"sparse-merge: error: interrupted by SIG(TERM|INT|HUP); nothing of this run was written"


def test_signals_at_every_point_of_a_merge_leave_nothing(tmp_path):
    saved = saved_setup(tmp_path)
    root = tmp_path / "outputs"
    root.mkdir()
    inputs = _tree(saved.base), _tree(saved.adapter)
    script = _SIGNALLED_MERGES.format(tests=str(Path(__file__).parent), repeats=RANDOM_REPEATS)
    done = subprocess.run(
        [sys.executable, "-c", script, saved.base, saved.adapter, root],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(results) == 5 * 3 + 2 + RANDOM_REPEATS
    expected = dense_reference(saved.base_state, load_file(saved.adapter / WEIGHTS_NAME))
    interrupted = 0
    for result in results:
        if result["code"] == 0:  # unsignalled, or a random signal that came after the output was in place
            assert result["name"] in ("warm-up", "unsignalled") or result["name"].startswith("random-"), result
            assert result["left"] == [
                "a",
                "a/b",
                "a/b/out",
                *(f"a/b/out/{n}" for n in ("config.json", "generation_config.json", "model.safetensors")),
            ]
            merged = read_checkpoint(root / result["name"] / "a" / "b" / "out")
            assert all(torch.equal(merged[k], expected[k]) for k in expected), result["name"]
            continue
        interrupted += 1
        assert_refused(result["code"], result["out"], result["err"], _INTERRUPTED)
        assert result["left"] is None, result  # not even the parent directories it created
    assert interrupted >= 15 + RANDOM_REPEATS // 8  # the random signals do land mid-merge
    assert (_tree(saved.base), _tree(saved.adapter)) == inputs


def test_signal_from_another_process_mid_write_is_a_refusal(tmp_path):
    procs = {}
    for signum in (signal.SIGTERM, signal.SIGINT):  # SIGHUP, like these, in the test above
        saved = saved_setup(tmp_path / signum.name, max_shard_size="60KB")
        out = tmp_path / signum.name / "out"
        procs[signum] = (start_stalled_merge(merge_argv(saved.base, saved.adapter, out, "--quiet")), out)
    for signum, (proc, out) in procs.items():
        assert len(leftovers(out)) == 1  # mid-write: the temporary directory holds a shard and a half
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=120)
        assert_refused(
            proc.returncode, stdout, stderr, f"interrupted by {signum.name}; nothing of this run was written$"
        )
        assert not out.exists() and leftovers(out) == []


# --------------------------------------------------------------------------------------------- refusals leave no trace


def _other_base(tmp_path) -> Path:
    tiny_llama(seed=1).save_pretrained(tmp_path / "other-base")
    return tmp_path / "other-base"


def _disk_full(saved, tmp_path, monkeypatch):
    monkeypatch.setattr("sparse_plugin.merge.rewrite_shard", rewrite_failing_at(1, os_disk_full))
    return merge_argv(saved.base, saved.adapter, tmp_path / "a" / "b" / "out")


REFUSALS = {  # id -> (argv(saved, tmp_path, monkeypatch), regex)
    # refused while streaming, after the output's directories exist
    "other-base-weights": (
        lambda s, t, m: merge_argv(_other_base(t), s.adapter, t / "a" / "b" / "out"),
        "differs from the base the adapter was trained on",
    ),
    "unmerge-of-a-base": (
        lambda s, t, m: unmerge_argv(s.base, s.adapter, t / "a" / "b" / "out"),
        "is not this adapter merged",
    ),
    "disk-full": (_disk_full, "no space left on device"),
    "missing-adapter": (
        lambda s, t, m: merge_argv(s.base, t / "nowhere", t / "a" / "b" / "out"),
        "adapter directory not found",
    ),
    "existing-output": (
        lambda s, t, m: merge_argv(s.base, s.adapter, t / "base"),
        "output must be a new directory outside",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_a_refusal_leaves_the_file_system_as_found(tmp_path, capsys, monkeypatch, case):
    saved = saved_setup(tmp_path)
    build, message = REFUSALS[case]
    argv = build(saved, tmp_path, monkeypatch)
    before = _tree(tmp_path)
    assert_refused(*run(capsys, *argv), message)
    assert _tree(tmp_path) == before  # in particular no `a/` or `a/b/`


# --------------------------------------------------------------------------------------------- racing merges


def test_the_loser_of_two_racing_merges_says_so_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    saved = saved_setup(tmp_path)
    out = tmp_path / "out"
    copy, winner = sparse_plugin.merge._copy, {}

    def copy_then_lose_the_race(*args):  # the other merge finishes between this one's up-front check and its rename
        copy(*args)
        monkeypatch.setattr(sparse_plugin.merge, "_copy", copy)
        sparse_plugin.merge.merge_checkpoint(saved.base, saved.adapter, out, device="cpu", progress=False)
        winner.update(_tree(out))

    monkeypatch.setattr(sparse_plugin.merge, "_copy", copy_then_lose_the_race)
    code, stdout, err = run(capsys, *merge_argv(saved.base, saved.adapter, out))
    assert_refused(
        code,
        stdout,
        err,
        rf"{out}: another process created the output meanwhile; it was left as it is and "
        "nothing of this run was written$",
    )
    assert ".tmp" not in err
    assert leftovers(out) == [] and _tree(out) == winner
    expected = dense_reference(saved.base_state, load_file(saved.adapter / WEIGHTS_NAME))
    assert all(torch.equal(v, expected[k]) for k, v in read_checkpoint(out).items())


# --------------------------------------------------------------------------------------------- adapters without base values


def _other_adapter(saved, tmp_path) -> Path:
    """An adapter over the same base and positions as `saved`'s, with other values: the wrong one to unmerge with."""
    model = tiny_llama()
    prepare_model(model, SparseConfig(density=0.05, store_base_values=False))
    save_adapter(model, tmp_path / "other-adapter")  # zero values: unmerging it would change nothing
    return tmp_path / "other-adapter"


def _merged(saved, tmp_path, capsys) -> Path:
    assert run(capsys, *merge_argv(saved.base, saved.adapter, tmp_path / "merged"))[0] == 0
    return tmp_path / "merged"


CHECKS = {  # id -> (argv(saved, tmp_path, capsys, out), regex)
    "merge-into-another-base": (
        lambda s, t, c, o: merge_argv(_other_base(t), s.adapter, o),
        r"differs from the base the adapter was trained on \(its entries at the indices do not match the sha256 the adapter recorded\)",
    ),
    "unmerge-with-another-adapter": (
        lambda s, t, c, o: unmerge_argv(_merged(s, t, c), _other_adapter(s, t), o),
        r"is not this adapter merged into its base \(its entries at the indices do not match the sha256 the adapter recorded\)",
    ),
    "unmerge-of-the-base": (
        lambda s, t, c, o: unmerge_argv(s.base, s.adapter, o),
        r"is not this adapter merged into its base \(its entries at the indices do not match the sha256 the adapter recorded\)",
    ),
}


@pytest.mark.parametrize("case", sorted(CHECKS))
def test_adapter_without_base_values_refuses_the_wrong_model_unless_forced(tmp_path, capsys, case):
    saved = saved_setup(tmp_path, store_base_values=False)
    build, message = CHECKS[case]
    argv = build(saved, tmp_path, capsys, tmp_path / "out")
    assert_refused(*run(capsys, *argv), f"`model\\.layers\\.\\S+` {message}; pass the ")
    assert not (tmp_path / "out").exists()
    code, _, err = run(capsys, *argv, "--force")
    assert code == 0 and err == "" and (tmp_path / "out").is_dir()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_adapter_without_base_values_accepts_its_own_base_and_merge(tmp_path, capsys, dtype):
    # The merged digest is computed at save time from the in-memory base; the merge must reproduce it bit for bit
    # in every dtype, or an honest unmerge would be refused.
    saved = saved_setup(tmp_path, dtype=dtype, store_base_values=False)
    merged = _merged(saved, tmp_path, capsys)
    code, _, err = run(capsys, *unmerge_argv(merged, saved.adapter, tmp_path / "restored"))
    assert code == 0 and err == ""


def test_adapter_saved_before_the_digests_still_merges(tmp_path, capsys):
    saved = saved_setup(tmp_path, store_base_values=False)
    edit_meta(lambda meta: [t.pop(f) for t in meta["targets"].values() for f in ("base_sha256", "merged_sha256")])(
        saved.adapter
    )
    code, _, err = run(capsys, *merge_argv(saved.base, saved.adapter, tmp_path / "merged"))
    assert code == 0 and err == ""
    expected = dense_reference(saved.base_state, load_file(saved.adapter / WEIGHTS_NAME))
    assert all(torch.equal(v, expected[k]) for k, v in read_checkpoint(tmp_path / "merged").items())
    assert os.path.isdir(tmp_path / "merged")
