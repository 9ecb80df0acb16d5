"""`rewrite_shard`: a copy of a safetensors shard with some tensors changed, the rest byte for byte."""

from __future__ import annotations

import errno
import os
import threading

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sparse_plugin import shard_rewrite
from sparse_plugin.shard_rewrite import rewrite_shard


@pytest.fixture
def shard(tmp_path):
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "a.weight": torch.randn(5, 7, generator=generator),
        "b.weight": torch.randn(6, 3, generator=generator).to(torch.bfloat16),
        "c.bias": torch.arange(4, dtype=torch.int64),
        "d.weight": torch.randn(2, 9, generator=generator).to(torch.float16),
        "e.weight": torch.randn(3, 3, generator=generator).double(),
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, path, metadata={"format": "pt", "note": "kept"})
    return path, tensors


def _add_one(seen):
    def edit(name, tensor):
        seen.append(name)
        tensor += 1
        return tensor

    return edit


def test_edited_tensors_change_and_every_other_byte_is_the_source(shard, tmp_path):
    path, tensors = shard
    out, seen = tmp_path / "out.safetensors", []
    names = ["e.weight", "a.weight", "b.weight", "d.weight"]
    rewrite_shard(path, out, names, _add_one(seen))

    loaded = load_file(out)
    for name, tensor in tensors.items():
        expected = tensor + 1 if name in names else tensor
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], expected), name
    with safe_open(out, framework="pt") as fh:
        assert fh.metadata() == {"format": "pt", "note": "kept"}
    ranges = shard_rewrite.tensor_ranges(path)
    assert seen == sorted(names, key=lambda n: ranges[n][2])  # file order
    source, written = path.read_bytes(), out.read_bytes()
    assert len(source) == len(written)
    changed = [i for i in range(len(source)) if source[i] != written[i]]
    assert all(any(ranges[n][2] <= i < ranges[n][3] for n in names) for i in changed)


def test_no_edit_is_a_byte_identical_copy(shard, tmp_path):
    path, _ = shard
    rewrite_shard(path, tmp_path / "out.safetensors", [], _add_one([]))
    assert (tmp_path / "out.safetensors").read_bytes() == path.read_bytes()


def test_falls_back_to_user_space_where_the_kernel_cannot_copy(shard, tmp_path, monkeypatch):
    path, tensors = shard

    def cross_device(*_args):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(shard_rewrite, "_CHUNK", 16)  # several chunks per range
    monkeypatch.setattr(os, "copy_file_range", cross_device)
    rewrite_shard(path, tmp_path / "out.safetensors", ["b.weight"], _add_one([]))
    loaded = load_file(tmp_path / "out.safetensors")
    assert torch.equal(loaded["b.weight"], tensors["b.weight"] + 1)
    assert torch.equal(loaded["a.weight"], tensors["a.weight"])


def test_a_full_disk_propagates(shard, tmp_path, monkeypatch):
    path, _ = shard

    def full(*_args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "copy_file_range", full)
    with pytest.raises(OSError) as caught:
        rewrite_shard(path, tmp_path / "out.safetensors", ["a.weight"], _add_one([]))
    assert caught.value.errno == errno.ENOSPC


def test_an_edit_that_changes_the_shape_is_refused(shard, tmp_path):
    path, _ = shard
    with pytest.raises(ValueError, match="a.weight changed its shape or dtype"):
        rewrite_shard(path, tmp_path / "out.safetensors", ["a.weight"], lambda _name, t: t.double())


def test_the_next_tensor_is_read_and_edited_while_the_last_is_written(shard, tmp_path, monkeypatch):
    path, tensors = shard
    second_edited, overlapped = threading.Event(), []
    write = shard_rewrite._write_all

    def slow_write(fd, data, offset):
        overlapped.append(second_edited.wait(timeout=10))  # False if the writes were not in a second thread
        write(fd, data, offset)

    def edit(name, tensor):
        if name == "b.weight":
            second_edited.set()
        tensor += 1
        return tensor

    monkeypatch.setattr(shard_rewrite, "_write_all", slow_write)
    rewrite_shard(path, tmp_path / "out.safetensors", ["a.weight", "b.weight", "d.weight"], edit)
    assert overlapped[0]
    loaded = load_file(tmp_path / "out.safetensors")
    assert all(torch.equal(loaded[n], tensors[n] + 1) for n in ("a.weight", "b.weight", "d.weight"))


def test_a_write_that_fails_in_the_writer_thread_propagates(shard, tmp_path, monkeypatch):
    path, _ = shard

    def full(*_args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(OSError) as caught:
        rewrite_shard(path, tmp_path / "out.safetensors", ["a.weight", "b.weight", "d.weight"], _add_one([]))
    assert caught.value.errno == errno.ENOSPC
