"""sparse_plugin.atomic: outputs renamed into place whole, and a full disk reported in one line. The merge and save
paths that use it are tested end to end in test_cli (SIGKILL mid-merge, full disk mid-merge) and test_io (full disk
mid-save); here: the pieces those cannot reach, and a real full disk on a tmpfs."""

import errno
import os
import subprocess
from pathlib import Path

import pytest
from adapter_utils import leftovers, saved_setup, trained_model
from safetensors import SafetensorError

from sparse_plugin import save_adapter
from sparse_plugin.atomic import DiskFullError, atomic_directory, reporting_disk_full
from sparse_plugin.io import CONFIG_NAME, WEIGHTS_NAME
from sparse_plugin.merge import SINGLE_FILE, merge_checkpoint


def test_a_failed_swap_puts_the_previous_output_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.txt").write_text("an earlier merge")
    real_replace = os.replace

    def replace(src, dst):
        if Path(src).name.endswith(".tmp"):  # the new output's rename into place, after the old one was moved aside
            raise OSError(errno.EIO, "simulated I/O error")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="simulated I/O error"):
        with atomic_directory(out, replace=True) as tmp:
            (tmp / "new.txt").write_text("new")
    assert os.listdir(out) == ["previous.txt"] and (out / "previous.txt").read_text() == "an earlier merge"
    assert leftovers(out) == []


def test_save_replaces_a_linked_file_instead_of_writing_through_it(tmp_path):
    outside = tmp_path / "model.safetensors"
    outside.write_bytes(b"someone else's weights")
    adapter = tmp_path / "adapter"
    save_adapter(trained_model(), adapter)
    (adapter / WEIGHTS_NAME).unlink()
    (adapter / WEIGHTS_NAME).symlink_to(outside)

    save_adapter(trained_model(), adapter)
    assert outside.read_bytes() == b"someone else's weights"
    assert not (adapter / WEIGHTS_NAME).is_symlink()


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.EACCES, "Permission denied"),
        SafetensorError("Error while serializing: I/O error: Permission denied (os error 13)"),
    ],
    ids=["os-error", "safetensors-error"],
)
def test_other_write_errors_pass_through_unchanged(tmp_path, error):
    with pytest.raises(type(error)) as raised:
        with reporting_disk_full(tmp_path / "x", "free space"):
            raise error
    assert raised.value is error


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 128 KiB tmpfs with 16 KiB left: a real full disk, so the test sees what safetensors and Python really
    raise. Mounting needs root (CAP_SYS_ADMIN); elsewhere the test is skipped and the stand-ins in adapter_utils,
    which copy these errors, carry the checks."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    mounted = (
        os.geteuid() == 0
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(mount)], capture_output=True
        ).returncode
        == 0
    )
    if not mounted:
        pytest.skip("mounting a tmpfs needs root")
    try:
        (mount / "filler").write_bytes(b"\0" * (112 * 1024))
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_real_full_disk_is_one_line_and_leaves_nothing(tmp_path, small_tmpfs):
    saved = saved_setup(tmp_path)
    with pytest.raises(
        DiskFullError, match=rf"^no space left on device writing {small_tmpfs}/out/{SINGLE_FILE}; free space"
    ):
        merge_checkpoint(saved.base, saved.adapter, small_tmpfs / "out", device="cpu", progress=False)
    assert os.listdir(small_tmpfs) == ["filler"]

    with pytest.raises(
        DiskFullError,
        match=rf"^no space left on device writing {small_tmpfs}/adapter/({WEIGHTS_NAME}|{CONFIG_NAME}); ",
    ):
        save_adapter(saved.model, small_tmpfs / "adapter")
    assert os.listdir(small_tmpfs) == ["filler"]


def test_outputs_get_the_usual_directory_mode(tmp_path):
    from sparse_plugin.atomic import atomic_directory

    previous = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "out", replace=False) as staging:
            (staging / "f").write_text("x")
    finally:
        os.umask(previous)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755


def test_a_failed_write_removes_the_parents_it_created_but_not_what_others_put_there(tmp_path):
    with pytest.raises(OSError, match="simulated"), atomic_directory(tmp_path / "a" / "b" / "out", replace=False):
        raise OSError(errno.EIO, "simulated I/O error")
    assert os.listdir(tmp_path) == []

    (tmp_path / "a").mkdir()
    with (
        pytest.raises(OSError, match="simulated"),
        atomic_directory(tmp_path / "a" / "b" / "c" / "out", replace=False),
    ):
        (tmp_path / "a" / "b" / "theirs.txt").write_text("another process wrote here meanwhile")
        raise OSError(errno.EIO, "simulated I/O error")
    # `c` was ours and is gone; `b`, though ours, now holds another's file; `a` existed before.
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["a", "a/b", "a/b/theirs.txt"]


def test_a_save_into_a_directory_another_process_creates_meanwhile_writes_into_it(tmp_path, monkeypatch):
    """The Trainer's other ranks create the checkpoint directory for their RNG state while rank 0 saves the adapter
    there: rank 0's files join theirs instead of failing on the occupied name."""
    from sparse_plugin import io

    checkpoint = tmp_path / "checkpoint-4"
    real_save_file = io.save_file

    def save_file_as_rank_one_saves(tensors, path, metadata):
        checkpoint.mkdir(exist_ok=True)
        (checkpoint / "rng_state_1.pth").write_bytes(b"rank 1")
        real_save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(io, "save_file", save_file_as_rank_one_saves)
    save_adapter(trained_model(), checkpoint)
    assert sorted(p.name for p in checkpoint.iterdir() if p.name != "README.md") == sorted(
        [CONFIG_NAME, WEIGHTS_NAME, "rng_state_1.pth"]
    )
    assert (checkpoint / "rng_state_1.pth").read_bytes() == b"rank 1" and leftovers(checkpoint) == []
