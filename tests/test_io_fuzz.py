"""Property-based fuzzing of the adapter reader with hypothesis: a valid adapter's files are mutated (bytes flipped,
truncated, safetensors header and sparse_config.json entries replaced by arbitrary JSON) and `read_adapter`, as well
as `sparse-merge inspect`, must either accept a valid adapter or refuse it with `AdapterError` in one line (exit 2):
never another exception, nor a hang.

Allocation is bounded by construction (safetensors checks each tensor against the file's size before reading it and
the config is read up to 16 MiB), so an attempted huge allocation would surface here as MemoryError or RuntimeError,
which fails the test. The budget is fixed and derandomized, so CI runs the same examples every time: 3 x 200 examples,
about 7 s on a 2-core machine.
"""

import copy
import functools
import io
import json
import operator
import struct
import tempfile
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import torch
from adapter_utils import trained_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparse_plugin import AdapterError, read_adapter, save_adapter
from sparse_plugin.cli import main
from sparse_plugin.io import CONFIG_NAME, WEIGHTS_NAME

BUDGET = settings(
    max_examples=200, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)
# Reading a 30 KB adapter takes milliseconds; a case 1000 times slower is a hang (or a large allocation).
SECONDS_PER_CASE = 5.0

# Arbitrary JSON: what a hostile or corrupted file could put in any field, with the edges of each check made likely.
EDGES = [-1, 0, 1, 2**31, 2**63, 2**64, 1.5, float("inf"), float("nan"), "", "F8_E4M3", "I64", [], {}]
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**65), 2**65) | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)


@functools.cache
def _valid() -> dict[str, bytes]:
    """The two files of a valid adapter (store_base_values on), as bytes. Cached rather than a fixture, so that a
    falsifying example prints only the mutation, not 30 KB of the files."""
    with tempfile.TemporaryDirectory() as tmp:
        save_adapter(trained_model(), Path(tmp))
        return {name: (Path(tmp) / name).read_bytes() for name in (CONFIG_NAME, WEIGHTS_NAME)}


class _Files(dict):
    """An adapter's files by name; a falsifying example shows only their JSON, not 20 KB of tensor data."""

    def __repr__(self) -> str:
        config, weights = self.get(CONFIG_NAME, b""), self.get(WEIGHTS_NAME, b"")
        return f"_Files(config={config[:4000]!r}, weights_head={weights[:4000]!r}, weights_bytes={len(weights)})"


def _split(weights: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", weights[:8])
    return json.loads(weights[8 : 8 + length]), weights[8 + length :]


def _join(header, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def _assert_valid(adapter) -> None:
    """What every reader downstream relies on, for an adapter `read_adapter` accepted."""
    for target in adapter.targets.values():
        rows, cols = target.shape
        indices = target.indices
        assert indices.dtype == torch.int64 and indices.dim() == 1 and target.values.shape == indices.shape
        assert bool((indices[1:] > indices[:-1]).all())
        assert indices.numel() == 0 or 0 <= int(indices[0]) <= int(indices[-1]) < rows * cols
        assert bool(torch.isfinite(target.values).all())
        if target.base_values is not None:
            assert target.base_values.shape == indices.shape and bool(torch.isfinite(target.base_values).all())


def _check_readers(files: dict[str, bytes]) -> None:
    """Write `files` as an adapter; both readers must accept it as valid or refuse it in one line."""
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        for name, data in files.items():
            (directory / name).write_bytes(data)
        started = time.perf_counter()
        try:
            _assert_valid(read_adapter(directory))
            accepted = True
        except AdapterError as err:
            assert len(str(err).splitlines()) == 1, str(err)
            accepted = False
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = main(["inspect", str(directory), "--json"])
        assert time.perf_counter() - started < SECONDS_PER_CASE
    if accepted:
        assert code == 0 and json.loads(out.getvalue())["targets"]
    else:
        assert code == 2 and out.getvalue() == "", out.getvalue()
        assert len(err.getvalue().splitlines()) == 1 and err.getvalue().startswith("sparse-merge: error: ")


@st.composite
def _byte_mutation(draw, valid_files):
    """Flip a few bytes of one file (in the safetensors file, in its header half the time, else in its tensor data),
    then maybe truncate it (1 in 5) or append junk (1 in 10). Choices come from a seeded `Random`, as in `_mutated`."""
    rnd = draw(st.randoms(use_true_random=False))
    name = rnd.choice([CONFIG_NAME, WEIGHTS_NAME])
    data = bytearray(valid_files[name])
    header_end = 8 + struct.unpack("<Q", data[:8])[0] if name == WEIGHTS_NAME else len(data)
    start, stop = (0, header_end) if rnd.random() < 0.5 or header_end == len(data) else (header_end, len(data))
    for _ in range(rnd.randint(1, 6)):
        data[rnd.randrange(start, stop)] ^= rnd.randint(1, 255)
    end = rnd.randint(0, len(data)) if rnd.random() < 0.2 else len(data)
    junk = rnd.randbytes(rnd.randint(1, 16)) if rnd.random() < 0.1 else b""
    return _Files(valid_files, **{name: bytes(data[:end]) + junk})


def _nodes(value, path=()):
    """The path of every node of a JSON value, the root included."""
    yield path
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        yield from _nodes(child, (*path, key))


def _mutated(draw, value):
    """`value` after 1-3 edits, each at a node below the root picked uniformly (4 times in 5 among the leaves only:
    `shape[0]` is as likely as any other), which is replaced, dropped, or given a new sibling. Half the replacements
    are edge values.

    The choices come from hypothesis' seeded `Random` rather than `sampled_from`, whose preference for early
    elements would edit the first few keys almost every time."""
    rnd = draw(st.randoms(use_true_random=False))
    value = copy.deepcopy(value)
    for _ in range(rnd.randint(1, 3)):
        nodes = list(_nodes(value))[1:]
        if not nodes:
            break
        leaves = [p for p in nodes if not isinstance(functools.reduce(operator.getitem, p, value), (dict, list))]
        path = rnd.choice(leaves if leaves and rnd.random() < 0.8 else nodes)
        parent = functools.reduce(operator.getitem, path[:-1], value)
        action = rnd.choice(["replace", "replace", "drop", "add"])
        if action == "drop":
            del parent[path[-1]]
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.text(max_size=12))] = draw(JSON)
        else:
            parent[path[-1]] = copy.deepcopy(rnd.choice(EDGES)) if rnd.random() < 0.5 else draw(JSON)
    return value


@st.composite
def _header_mutation(draw, valid_files):
    """Edit the safetensors header's JSON (see `_mutated`), keeping the data bytes."""
    header, data = _split(valid_files[WEIGHTS_NAME])
    return _Files(valid_files, **{WEIGHTS_NAME: _join(_mutated(draw, header), data)})


@st.composite
def _config_mutation(draw, valid_files):
    """Edit sparse_config.json (see `_mutated`)."""
    meta = _mutated(draw, json.loads(valid_files[CONFIG_NAME]))
    return _Files(valid_files, **{CONFIG_NAME: json.dumps(meta).encode()})


@BUDGET
@given(data=st.data())
def test_byte_mutations_are_read_or_refused(data):
    _check_readers(data.draw(_byte_mutation(_valid())))


@BUDGET
@given(data=st.data())
def test_header_mutations_are_read_or_refused(data):
    _check_readers(data.draw(_header_mutation(_valid())))


@BUDGET
@given(data=st.data())
def test_config_mutations_are_read_or_refused(data):
    _check_readers(data.draw(_config_mutation(_valid())))
