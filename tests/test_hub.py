"""sparse_plugin.hub: adapters and bases named by Hub repo id, resolved from a real huggingface_hub cache layout built
in the test (`models--org--name/{blobs,refs,snapshots}`) with HF_HUB_OFFLINE=1; and the upload, with HfApi's methods
replaced by recorders so that what would be uploaded can be checked without a network."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from adapter_utils import (
    dense_reference,
    hub_cache_layout,
    logits,
    read_checkpoint,
    saved_setup,
    train_values,
    trained_model,
)
from conftest import tiny_llama
from huggingface_hub import HfApi, constants
from huggingface_hub.utils import filter_repo_objects

from sparse_plugin import iter_sparse_layers, load_adapter, save_adapter
from sparse_plugin.cli import main
from sparse_plugin.hub import push_adapter_to_hub, resolve_model
from sparse_plugin.io import CONFIG_NAME, WEIGHTS_NAME, AdapterError, read_adapter
from sparse_plugin.merge import INDEX_FILE
from sparse_plugin.model_card import CARD_NAME

REPO = Path(__file__).resolve().parents[1]
MAIN, V2 = "a" * 40, "b" * 40  # commit hashes of the adapter repo's `main` and `v2`


def cache_repo(cache: Path, repo_id: str, source: Path, commit: str, refs: tuple[str, ...] = ("main",)) -> Path:
    """Lay `source`'s files out as huggingface_hub caches a download of `repo_id` at `commit`: files in `blobs/`,
    linked from `snapshots/<commit>/`, and each ref in `refs/` naming the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(source, snapshot)
    hub_cache_layout(snapshot, repo / "blobs")
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A hub cache holding `org/base` and `org/adapter` (main, and a `v2` trained further), offline; the local
    copies and the models they came from."""
    saved = saved_setup(tmp_path)
    v2_model = train_values(saved.model, seed=7)
    save_adapter(v2_model, tmp_path / "adapter-v2", base_model_name_or_path="org/base")
    cache = tmp_path / "cache"
    cache_repo(cache, "org/base", saved.base, "c" * 40)
    cache_repo(cache, "org/adapter", saved.adapter, MAIN)
    cache_repo(cache, "org/adapter", tmp_path / "adapter-v2", V2, refs=("v2",))
    # huggingface_hub reads both variables once, at import: set the environment (for subprocesses) and its constants.
    for name, value in (("HF_HUB_CACHE", str(cache)), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path / "cache")  # where no `org/...` directory exists
    return tmp_path, saved


def test_load_adapter_from_the_hub_cache_at_a_revision(hub):
    root, saved = hub
    for repo_revision, local in (
        (None, saved.adapter),
        ("main", saved.adapter),
        ("v2", root / "adapter-v2"),
        (V2, root / "adapter-v2"),
    ):
        from_hub = logits(load_adapter(tiny_llama(0), "org/adapter", revision=repo_revision))
        assert torch.equal(from_hub, logits(load_adapter(tiny_llama(0), local))), repo_revision
    assert not torch.equal(
        logits(load_adapter(tiny_llama(0), "org/adapter")),
        logits(load_adapter(tiny_llama(0), "org/adapter", revision="v2")),
    )


def test_a_local_directory_wins_over_the_hub(hub, monkeypatch):
    root, _ = hub
    shutil.copytree(root / "adapter-v2", root / "work" / "org" / "adapter")
    monkeypatch.chdir(root / "work")
    assert torch.equal(
        logits(load_adapter(tiny_llama(0), "org/adapter")), logits(load_adapter(tiny_llama(0), root / "adapter-v2"))
    )


@pytest.mark.parametrize(
    "name, revision, message",
    [
        ("org/missing", None, "`org/missing`: no local directory, and not in the Hugging Face cache"),
        ("org/adapter", "v3", "`org/adapter` (revision `v3`): no local directory, and not in the Hugging Face cache"),
    ],
)
def test_a_repo_missing_from_the_cache_is_one_line(hub, name, revision, message):
    with pytest.raises(AdapterError) as err:
        load_adapter(tiny_llama(0), name, revision=revision)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert "HF_HUB_OFFLINE" in str(err.value) and str(err.value).endswith(
        "download it once online or pass a local directory"
    )


def test_a_missing_path_that_is_no_repo_id_stays_a_missing_directory(hub):
    with pytest.raises(AdapterError, match="adapter directory not found"):
        load_adapter(tiny_llama(0), "./no/such/adapter")


def test_sparse_merge_resolves_base_and_adapter_through_the_hub(hub):
    """The console entry point in a fresh process, which reads HF_HUB_CACHE / HF_HUB_OFFLINE from its environment."""
    root, saved = hub
    out = root / "merged"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "sparse_plugin.cli",
            "merge",
            "--base",
            "org/base",
            "--adapter",
            "org/adapter",
            "--adapter-revision",
            "v2",
            "--output",
            str(out),
            "--device",
            "cpu",
            "--quiet",
        ],
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert run.returncode == 0, run.stderr
    adapter = read_adapter(root / "adapter-v2")
    expected = dense_reference(
        saved.base_state,
        {f"{k}.{p}": getattr(t, p) for k, t in adapter.targets.items() for p in ("indices", "values")},
    )
    merged = read_checkpoint(out)
    assert merged.keys() == expected.keys() and all(torch.equal(merged[k], expected[k]) for k in expected)
    assert not any(p.is_symlink() for p in out.iterdir())  # files of the cache's links, copied as files


def test_sparse_merge_unmerge_resolves_the_merged_model_through_the_hub(hub, capsys):
    root, saved = hub
    assert (
        main(
            [
                "merge",
                "--base",
                str(saved.base),
                "--adapter",
                str(saved.adapter),
                "--output",
                str(root / "merged"),
                "--quiet",
            ]
        )
        == 0
    )
    cache_repo(root / "cache", "org/merged", root / "merged", "d" * 40)
    assert (
        main(
            [
                "unmerge",
                "--merged",
                "org/merged",
                "--merged-revision",
                "main",
                "--adapter",
                "org/adapter",
                "--output",
                str(root / "unmerged"),
                "--device",
                "cpu",
                "--quiet",
            ]
        )
        == 0
    ), capsys.readouterr().err
    restored = read_checkpoint(root / "unmerged")
    assert all(torch.equal(restored[k], v) for k, v in saved.base_state.items())  # bit-exact, from the base values


def test_inspect_and_export_take_a_repo_id(hub, capsys):
    root, _ = hub
    assert main(["inspect", "org/adapter", "--revision", "v2", "--json"]) == 0
    assert f"snapshots/{V2}" in capsys.readouterr().out
    assert main(["export-peft", "org/adapter", str(root / "peft")]) == 0
    code = main(["inspect", "org/nothing"])
    assert code == 2 and "`org/nothing`: no local directory" in capsys.readouterr().err


def test_a_hub_base_downloads_the_shards_its_index_names_and_no_other_weights(tmp_path, monkeypatch):
    """Two passes: every file but weights (so the index arrives), then the shards the index names."""
    saved = saved_setup(tmp_path, max_shard_size="20KB")
    (saved.base / "consolidated.safetensors").write_bytes(b"")  # a second copy of the weights that must not be fetched
    (saved.base / "pytorch_model.bin").write_bytes(b"")
    files = [str(p.relative_to(saved.base)) for p in saved.base.rglob("*") if p.is_file()]
    fetched = []

    def snapshot_download(repo_id, revision=None, token=None, allow_patterns=None, ignore_patterns=None):
        assert (repo_id, revision, token) == ("org/base", "v1", "hf_x")
        fetched.extend(filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        return str(saved.base)

    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    monkeypatch.chdir(tmp_path / "adapter")
    assert resolve_model("org/base", revision="v1", token="hf_x") == saved.base
    shards = sorted(p.name for p in saved.base.glob("model-*.safetensors"))
    others = [name for name in files if not name.endswith((".safetensors", ".bin"))]
    assert len(shards) > 1 and INDEX_FILE in others and sorted(fetched) == sorted([*others, *shards])


# --------------------------------------------------------------------------------------------- upload


@pytest.fixture
def recorded_api(monkeypatch):
    """HfApi's create_repo / create_branch / upload_folder replaced by recorders; upload_folder lists the files it
    would upload (its own pattern filter over the folder) and reads the adapter there."""
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))

    def create_branch(self, repo_id, **kwargs):
        calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, *, repo_id, folder_path, allow_patterns=None, **kwargs):
        files = sorted(
            filter_repo_objects([p.name for p in Path(folder_path).iterdir()], allow_patterns=allow_patterns)
        )
        calls.append(
            (
                "upload_folder",
                repo_id,
                {**kwargs, "files": files, "values": read_adapter(folder_path).meta["num_params"]},
            )
        )
        return "commit-info"

    for name, fn in (("create_repo", create_repo), ("create_branch", create_branch), ("upload_folder", upload_folder)):
        monkeypatch.setattr(HfApi, name, fn)
    return calls


def test_push_a_model_uploads_the_adapter_and_card(recorded_api):
    model = trained_model()
    assert (
        push_adapter_to_hub(model, "me/tiny-spiel", private=True, revision="dev", base_model_name_or_path="org/base")
        == "commit-info"
    )
    (_, repo, create), (_, branch_repo, branch), (_, upload_repo, upload) = recorded_api
    assert (repo, create) == ("me/tiny-spiel", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert (branch_repo, branch) == ("me/tiny-spiel", {"branch": "dev", "exist_ok": True, "repo_type": "model"})
    assert upload_repo == "me/tiny-spiel" and upload["revision"] == "dev" and upload["repo_type"] == "model"
    assert upload["files"] == sorted([CARD_NAME, CONFIG_NAME, WEIGHTS_NAME])
    assert upload["values"] == sum(layer.indices.numel() for _, layer in iter_sparse_layers(model))


def test_push_a_directory_uploads_only_the_adapter_files(tmp_path, recorded_api):
    save_adapter(trained_model(), tmp_path / "checkpoint-10")
    (tmp_path / "checkpoint-10" / "optimizer.pt").write_bytes(b"state")  # a Trainer checkpoint's other files stay home
    push_adapter_to_hub(tmp_path / "checkpoint-10", "me/x")
    (_, _, create), (_, _, upload) = recorded_api
    assert create["private"] is None and upload["revision"] is None
    assert upload["files"] == sorted([CARD_NAME, CONFIG_NAME, WEIGHTS_NAME])


def test_push_refuses_a_corrupt_adapter_before_any_upload(tmp_path, recorded_api):
    save_adapter(trained_model(), tmp_path / "a")
    (tmp_path / "a" / WEIGHTS_NAME).write_bytes(b"junk")
    with pytest.raises(AdapterError, match="not a readable safetensors file"):
        push_adapter_to_hub(tmp_path / "a", "me/x")
    assert recorded_api == []
