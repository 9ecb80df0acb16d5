"""Outputs that appear whole or not at all, and a full disk reported in one line.

Adapters and merged models are built under a temporary name beside their target and renamed into place only
when complete, so a crash, a kill or a full disk leaves the previous output (or none), never half of one. A
rename within one directory is atomic on POSIX filesystems; the temporary names start with `.` and end with
`.tmp`. Under `signals_as_errors` (what `sparse-merge` runs in) SIGTERM, SIGINT and SIGHUP unwind like any error, so
only a SIGKILL or a power cut can leave one behind (it may be deleted; nothing reads it).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
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


class Interrupted(BaseException):
    """A SIGTERM, SIGINT or SIGHUP arrived under `signals_as_errors`.

    A `BaseException`, like `KeyboardInterrupt`, so that `except Exception` handlers on the way out do not swallow
    it while every `finally` and cleanup still runs.
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}; nothing of this run was written")


_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name))
# Signals that arrived under `signals_as_errors`, and those inside `_signals_held` (None outside one). Python runs
# signal handlers in the main thread only, between bytecodes, so these need no lock.
_received: list[int] = []
_held: list[int] | None = None


def _on_signal(signum: int, _frame) -> None:
    _received.append(signum)
    if _held is not None:
        _held.append(signum)
        return
    raise Interrupted(signum)


@contextmanager
def signals_as_errors() -> Iterator[None]:
    """Within the block, SIGTERM, SIGINT and SIGHUP raise `Interrupted` (main thread only).

    Their defaults end the process at once (SIGTERM, SIGHUP) or may land anywhere (SIGINT), which would leave a
    temporary directory behind; raised as an exception instead, they unwind through `atomic_directory`'s cleanup.
    Native code can swallow the exception or turn it into its own (safetensors' loader, calling back into torch,
    raises a ValueError instead), so the signals are also recorded: any exception leaving the block after one is
    re-raised as `Interrupted`, and `atomic_directory` refuses to put an output in place after one.
    """
    previous = {signum: signal.signal(signum, _on_signal) for signum in _SIGNALS}
    _received.clear()
    try:
        yield
    except BaseException as err:
        if _received and not isinstance(err, Interrupted):
            raise Interrupted(_received[0]) from err
        raise
    finally:
        with _signals_held():  # one landing now finds the block over: its work is done or already unwinding
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        _received.clear()


@contextmanager
def _signals_held() -> Iterator[list[int]]:
    """Hold back `signals_as_errors`' signals until the block ends, and yield those that arrived.

    For steps that an exception must not cut in half: creating the temporary directory and noting its name (else
    a signal landing in between leaves a directory nobody removes), removing it, renaming the result into place.
    """
    global _held
    outer, held = _held, []
    _held = held
    try:
        yield held
    finally:
        _held = outer


@contextmanager
def atomic_directory(output: Path, replace: bool) -> Iterator[Path]:
    """Yield a temporary directory beside `output` that becomes `output` only if the block succeeds.

    With `replace`, an existing `output` is swapped out only once the new one is complete; without it, a
    directory that appeared meanwhile is never clobbered (`FileExistsError` saying so). On any failure, or a
    signal under `signals_as_errors`, the temporary directory and the parents of `output` this call created are
    removed, so the file system is left as found. A signal that lands during the final rename lets it finish.
    """
    made: list[Path] = []
    tmp = None
    try:
        with _signals_held() as held:
            _make_parents(output.parent, made)
            tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
        if held:
            raise Interrupted(held[0])
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private (0700); the output gets the usual mode
        yield tmp
        if _received:  # a signal whose exception native code swallowed
            raise Interrupted(_received[0])
        with _signals_held():
            _commit(tmp, output, replace)
    except BaseException:
        with _signals_held():  # a second Ctrl-C must not cut the cleanup short; the first one is on its way out
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            _remove_made(made)
        raise


def _make_parents(directory: Path, made: list[Path]) -> None:
    """Create `directory` and its missing ancestors, appending each one created to `made`, outermost first."""
    missing = []
    while not os.path.lexists(directory):
        missing.append(directory)
        directory = directory.parent
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:  # made meanwhile by another process: not ours to remove
            continue
        made.append(path)


def _remove_made(made: list[Path]) -> None:
    """Remove the directories `_make_parents` created, innermost first, stopping at one another process filled."""
    for path in reversed(made):
        try:
            path.rmdir()
        except OSError:
            return


def _commit(tmp: Path, output: Path, replace: bool) -> None:
    """Rename the finished `tmp` to `output`, or say that another process's output took its place meanwhile."""
    try:
        if replace and output.exists():
            _swap(tmp, output)
        else:
            os.rename(tmp, output)  # fails on a non-empty directory: never replaces another's output
    except OSError as err:
        if err.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR) or not os.path.lexists(output):
            raise
        # The raw error names the temporary directory, which is about to vanish.
        error = FileExistsError(
            f"{output}: another process created the output meanwhile; it was left as it is and "
            "nothing of this run was written"
        )
        error.errno = errno.EEXIST
        raise error from None


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
    over its target, so a failure while writing (a full disk) leaves the previous files as they were. A directory
    that another process creates meanwhile (the Trainer's other ranks saving their RNG state into the same
    checkpoint) is written into as an existing one.
    """
    if not directory.exists():
        try:
            with atomic_directory(directory, replace=False) as staging:
                _write_each(staging, directory, writers, fix)
            return
        except FileExistsError:
            if not directory.is_dir():
                raise
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
