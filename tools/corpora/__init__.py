"""Real text corpora shipped with the project, derived from Debian packages so nothing is downloaded at run time.

Each corpus module builds its compressed JSONL file under `tools/data/` (with the licence that must travel with
it) and loads prompt/answer pairs from it by split. The splits are by a stable hash of a grouping key chosen per
corpus (a WordNet word, a Python module), so no group is on two sides:

- `test` (10%): reported numbers only;
- `validation` (10%): choosing learning rates and recipes;
- `train` (80%).

`corpus_module(name)` gives either corpus's module.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
SPLITS = ("train", "validation", "test")
_TEST_PERCENT = 10
_VALIDATION_PERCENT = 10


def split_of(group: str) -> str:
    """The split of every pair whose grouping key is `group` (case-folded), stable across runs and machines."""
    bucket = int.from_bytes(hashlib.blake2b(group.lower().encode("utf-8"), digest_size=8).digest(), "big") % 100
    if bucket < _TEST_PERCENT:
        return "test"
    return "validation" if bucket < _TEST_PERCENT + _VALIDATION_PERCENT else "train"


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split={split!r}: use one of {', '.join(SPLITS)}")


def write_atomic(path: Path, payload: bytes) -> None:
    """Write via a temp file + os.replace so readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make the shipped file private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def encode_jsonl_gz(rows: list[dict]) -> bytes:
    """Gzip with mtime=0 and no file name in the header, so identical rows give identical bytes."""
    text = "".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in rows)
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write(text.encode("utf-8"))
    return buf.getvalue()


def write_corpus(out: Path, rows: list[dict], licence_name: str, licence: str) -> None:
    """Write the data file and, beside it, its licence (with the note saying how it was derived), which must travel
    with any copy."""
    write_atomic(out, encode_jsonl_gz(rows))
    write_atomic(out.parent / licence_name, licence.encode("utf-8"))


def read_jsonl_gz(path: Path, build_command: str) -> list[dict]:
    """The rows of a built data file; a missing file names the command that builds it."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"data file {path} is missing: run `{build_command}` to create it")
    text = gzip.decompress(Path(path).read_bytes()).decode("utf-8")
    return json.loads("[" + ",".join(text.splitlines()) + "]")  # one parse: twice as fast as per line


CORPORA = ("wordnet", "pydocs")


def corpus_module(name: str):
    """The module of corpus `name`: `load_pairs(split)`, its chat `SYSTEM` prompt and training `MAX_LENGTH`."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus={name!r}: use one of {', '.join(CORPORA)}")
    import importlib

    return importlib.import_module(f"{__name__}.{name}")


def build_main(
    argv: list[str] | None,
    description: str,
    build: Callable[[Path, Path], list[dict]],
    source_flag: str,
    default_source: Path,
    default_out: Path,
    group_key: str,
) -> int:
    """The `build` command both corpus modules share: build, then one line of counts per split (or of the error)."""
    parser = argparse.ArgumentParser(description=description)
    sub = parser.add_subparsers(dest="command", required=True)
    command = sub.add_parser("build", help="parse the source and write the gzipped JSONL data file and its licence")
    command.add_argument(source_flag, dest="source", type=Path, default=default_source)
    command.add_argument("--out", type=Path, default=default_out)
    args = parser.parse_args(argv)
    try:
        rows = build(args.source, args.out)
    except FileNotFoundError as err:
        print(f"error: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2
    counts = {split: sum(split_of(r[group_key]) == split for r in rows) for split in SPLITS}
    sizes = " / ".join(f"{n} {split}" for split, n in counts.items())
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB): {len(rows)} pairs, {sizes}")
    return 0
