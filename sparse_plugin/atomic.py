"""Outputs that appear whole or not at all, and a full disk reported in one line.

Adapters and merged models are built under a temporary name beside their target and renamed into place only
when complete, so a crash, a kill or a full disk leaves the previous output (or none), never half of one. A
rename within one directory is atomic on POSIX filesystems; the temporary names start with `.` and end with
`.tmp`, and only a SIGKILL or a power cut can leave one behind (it may be deleted).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
# safetensors' Rust writer raises SafetensorError("... I/O error: No space left on device (os error 28)"): the
# errno survives only in the message.
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


class DiskFullError(OSError):
    """The disk (or the user's quota) filled while writing an output; nothing partial was left behind."""


def _is_disk_full(err: BaseException) -> bool:
    if isinstance(err, OSError):
        return err.errno in _DISK_FULL
    if isinstance(err, SafetensorError):
        match = _RUST_OS_ERROR.search(str(err))
        return match is not None and int(match.group(1)) in _DISK_FULL
    return False


@contextmanager
def reporting_disk_full(path: Path, fix: str) -> Iterator[None]:
    """Turn a full disk while writing `path` into one `DiskFullError` line that names `path` and `fix`.

    The raw errors name a temporary file (OSError) or nothing at all (safetensors), which tells a user neither
    what was being written nor that nothing of it is left.
    """
    try:
        yield
    except Exception as err:
        if not _is_disk_full(err):
            raise
        error = DiskFullError(f"no space left on device writing {path}; {fix}")
        error.errno = errno.ENOSPC  # set after construction, so str(error) stays the one line above
        raise error from err


@contextmanager
def atomic_directory(output: Path, replace: bool) -> Iterator[Path]:
    """Yield a temporary directory beside `output` that becomes `output` only if the block succeeds.

    With `replace`, an existing `output` is swapped out only once the new one is complete; without it, a
    directory that appeared meanwhile is never clobbered (the final rename fails instead). On any failure the
    temporary directory is removed.
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private (0700); the output gets the usual mode
    try:
        yield tmp
        if replace and output.exists():
            _swap(tmp, output)
        else:
            os.rename(tmp, output)  # fails on a non-empty directory: never replaces another's output
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _swap(new: Path, output: Path) -> None:
    """Replace the directory `output` by `new`, putting the old one back if the second rename fails."""
    trash = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".old", dir=output.parent))
    try:
        os.replace(output, trash / "old")
        try:
            os.replace(new, output)
        except BaseException:
            os.replace(trash / "old", output)
            raise
    finally:
        shutil.rmtree(trash, ignore_errors=True)


def write_files(directory: Path, writers: dict[str, Callable[[Path], None]], fix: str) -> None:
    """Write `name -> write(path)` files into `directory` so that a failure adds or changes no file there.

    A new directory is built whole and renamed into place. Into an existing one (a Trainer checkpoint holding
    other files), every file is first written into a hidden staging directory inside it and only then renamed
    over its target, so a failure while writing (a full disk) leaves the previous files as they were.
    """
    if not directory.exists():
        with atomic_directory(directory, replace=False) as staging:
            _write_each(staging, directory, writers, fix)
        return
    staging = Path(tempfile.mkdtemp(prefix=".staging.", suffix=".tmp", dir=directory))
    try:
        _write_each(staging, directory, writers, fix)
        for name in writers:
            os.replace(staging / name, directory / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_each(staging: Path, directory: Path, writers: dict[str, Callable[[Path], None]], fix: str) -> None:
    for name, write in writers.items():
        with reporting_disk_full(directory / name, fix):
            write(staging / name)
