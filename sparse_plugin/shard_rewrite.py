"""Rewrite a safetensors shard with a few tensors changed, at the cost of a copy.

A merge changes a small share of a checkpoint's bytes: loading each shard whole and serialising it again costs
several times a plain copy and holds a shard in memory. Here the output keeps the source's header byte for byte
(so every tensor keeps its offset and the metadata is untouched), the bytes between edited tensors are copied
by the kernel (`os.copy_file_range`, a reflink or an in-kernel copy where the filesystem allows it), and each
edited tensor is read, changed and written once: peak memory is two tensors.

The caller has validated the header with `safetensors.safe_open` (offsets contiguous and inside the file);
this module only reads it again to find the edited tensors' byte ranges.
"""

from __future__ import annotations

import errno
import json
import os
import struct
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

# safetensors dtype codes of the weights a merge may edit (merge.check_base_matches_adapter refuses others).
TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_CHUNK = 64 * 2**20
# Writes of at most this size: one huge pwrite measured up to 1.8x slower than 1 MiB pieces (page cache allocation).
_WRITE_CHUNK = 2**20
# Read buffers: one tensor being read and edited while the previous one is written.
_BUFFERS = 2
# copy_file_range fails with these where the kernel or filesystem cannot do it (another filesystem before Linux
# 5.3, a FUSE mount, an old kernel): the bytes then go through user space.
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM}


def tensor_ranges(path: Path) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """name -> (dtype code, shape, first byte, end byte) in the file, from the shard's JSON header."""
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
    start = 8 + length
    return {
        name: (
            entry["dtype"],
            tuple(entry["shape"]),
            start + entry["data_offsets"][0],
            start + entry["data_offsets"][1],
        )
        for name, entry in header.items()
        if name != "__metadata__"
    }


def rewrite_shard(
    source: Path, destination: Path, names: Iterable[str], edit: Callable[[str, torch.Tensor], torch.Tensor]
) -> None:
    """Write `destination` as a copy of `source` in which each tensor in `names` is replaced by
    `edit(name, tensor)`: same shape and dtype, `tensor` (a private copy) may be changed in place and returned.
    `edit` is called in file order.

    Reading and editing tensor k+1 overlaps writing tensor k (a second thread: pwrite and copy_file_range release
    the GIL), and the two read buffers are reused, so no tensor is page-faulted into fresh memory.
    """
    ranges = tensor_ranges(source)
    edited = sorted(names, key=lambda name: ranges[name][2])
    largest = max((ranges[name][3] - ranges[name][2] for name in edited), default=0)
    buffers = [torch.empty(largest, dtype=torch.uint8) for _ in range(_BUFFERS if edited else 0)]
    src = os.open(source, os.O_RDONLY)
    try:
        dst = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            with ThreadPoolExecutor(max_workers=1) as writer:
                pending: list[Future] = []
                done = 0
                for step, name in enumerate(edited):
                    code, shape, begin, end = ranges[name]
                    if len(pending) == _BUFFERS:  # the write that used this step's buffer
                        pending.pop(0).result()
                    buffer = buffers[step % _BUFFERS][: end - begin]
                    tensor = _read_tensor(src, begin, buffer).view(TORCH_DTYPES[code]).view(shape)
                    changed = edit(name, tensor).contiguous()
                    if changed.shape != tensor.shape or changed.dtype != tensor.dtype:
                        raise ValueError(f"edit of {name} changed its shape or dtype")
                    data = memoryview(changed.view(-1).view(torch.uint8).numpy())
                    pending.append(writer.submit(_copy_then_write, src, dst, done, data, begin))
                    done = end
                pending.append(writer.submit(_copy_range, src, dst, done, os.fstat(src).st_size - done))
                for future in pending:
                    future.result()
        finally:
            os.close(dst)
    finally:
        os.close(src)


def _copy_then_write(src: int, dst: int, done: int, data: memoryview, begin: int) -> None:
    """The writer thread's job for one edited tensor: the untouched bytes before it, then its new bytes."""
    _copy_range(src, dst, done, begin - done)
    _write_all(dst, data, begin)


def _read_tensor(fd: int, begin: int, buffer: torch.Tensor) -> torch.Tensor:
    """Fill `buffer` (flat uint8) with the file's bytes from `begin`; return it."""
    view, offset = memoryview(buffer.numpy()), 0
    while offset < len(view):
        read = os.preadv(fd, [view[offset:]], begin + offset)
        if read == 0:
            raise OSError(errno.EIO, f"unexpected end of file at byte {begin + offset}")
        offset += read
    return buffer


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    written = 0
    while written < len(data):
        written += os.pwrite(fd, data[written : written + _WRITE_CHUNK], offset + written)


def _copy_range(src: int, dst: int, offset: int, count: int) -> None:
    """Copy `count` bytes at `offset` of `src` to the same offset of `dst`, in the kernel where it can."""
    end = offset + count
    try:
        while offset < end:
            copied = os.copy_file_range(src, dst, end - offset, offset, offset)
            if copied == 0:
                raise OSError(errno.EIO, f"unexpected end of file at byte {offset}")
            offset += copied
        return
    except OSError as err:
        if err.errno not in _NO_KERNEL_COPY:
            raise
    except AttributeError:  # pragma: no cover - not Linux
        pass
    while offset < end:
        chunk = os.pread(src, min(_CHUNK, end - offset), offset)
        if not chunk:
            raise OSError(errno.EIO, f"unexpected end of file at byte {offset}")
        _write_all(dst, memoryview(chunk), offset)
        offset += len(chunk)
