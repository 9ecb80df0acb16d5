"""The WordNet "define the word" data set, shipped as tools/data/wordnet_define.jsonl.gz.

Why WordNet: it is small, freely licensed, installed by Debian's ``wordnet-base``
package, and gives a task a 135M-parameter model visibly improves on after a short
sparse fine-tune ("Define the word 'X'." -> the WordNet gloss).

Build (deterministic, byte-identical on rebuild)::

    python tools/data.py build [--wordnet-dir /usr/share/wordnet] [--out tools/data/wordnet_define.jsonl.gz]

Pair selection: one pair per synset, for the synset's *first* lemma (its headword, the
lemma the gloss is written for; later lemmas are often rare synonyms): 117,645 pairs,
3.4 MB compressed. Every (lemma, synset) pair would be 206,954 pairs, 5.3 MB, over budget.

Use from Python::

    from data import load_pairs
    train = load_pairs("train")      # [{"prompt": "Define the word 'bank' (noun).", "answer": "..."}]
    heldout = load_pairs("heldout")  # ~10% of the words, never seen in "train"

Prompts name the part of speech only when the word appears under more than one
part of speech (``'bank' (noun)`` vs ``'bank' (verb)``); a word with several senses
of one part of speech keeps one prompt with several answers (one pair per sense).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import sys
import tempfile
from pathlib import Path

DATA_FILE = Path(__file__).resolve().parent / "data" / "wordnet_define.jsonl.gz"
LICENSE_NAME = "WORDNET_LICENSE"
DEFAULT_WORDNET_DIR = Path("/usr/share/wordnet")

POS_FILES = ("noun", "verb", "adj", "adv")
POS_NAMES = {"n": "noun", "v": "verb", "a": "adjective", "r": "adverb"}
SPLITS = ("train", "heldout")
HELDOUT_PERCENT = 10

# Syntactic markers on adjective lemmas: attributive (a), predicative (p), immediately postnominal (ip).
_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")
# Example sentences follow the definition as `; "..."` (a few glosses use `: "..."`).
_EXAMPLES = re.compile(r'[;:]\s*"')


# ---------------------------------------------------------------- parsing


def parse_gloss(gloss: str) -> str:
    """Keep the definition and drop example sentences, which would teach copying quotes."""
    match = _EXAMPLES.search(gloss)
    definition = gloss[: match.start()] if match else gloss
    return definition.strip().rstrip("; ").strip()


def clean_word(raw: str) -> str:
    """Turn a WordNet lemma into plain text: `_` means space, `(a)`-style markers are syntax, not spelling."""
    return _ADJ_MARKER.sub("", raw).replace("_", " ")


def parse_synset_line(line: str) -> dict | None:
    """One data-file line -> {"word", "pos", "definition"} for its first lemma; None for license lines."""
    if line.startswith("  ") or not line.strip():
        return None
    head, sep, gloss = line.partition(" | ")
    fields = head.split()
    if not sep or len(fields) < 5:
        raise ValueError(f"not a WordNet synset line (expected 'offset lex ss_type w_cnt word ... | gloss'): {line[:80]!r}")
    pos = "a" if fields[2] == "s" else fields[2]  # satellite adjectives are adjectives
    if pos not in POS_NAMES:
        raise ValueError(f"unknown synset type {fields[2]!r} in WordNet line: {line[:80]!r}")
    return {"word": clean_word(fields[4]), "pos": pos, "definition": parse_gloss(gloss)}


def read_pairs(wordnet_dir: Path) -> list[dict]:
    """All (first lemma, definition) pairs from the four data files, de-duplicated and sorted."""
    rows = set()
    for name in POS_FILES:
        path = wordnet_dir / f"data.{name}"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: install WordNet (apt-get install wordnet-base) or pass --wordnet-dir")
        with path.open(encoding="utf-8") as f:
            for line in f:
                row = parse_synset_line(line)
                if row and row["definition"]:
                    rows.add((row["word"], row["pos"], row["definition"]))
    ordered = sorted(rows, key=lambda r: (r[0].lower(), r))
    return [{"word": w, "pos": p, "definition": d} for w, p, d in ordered]


def license_text(wordnet_dir: Path) -> str:
    """The licence as WordNet states it in every data file's numbered header (`  N text`)."""
    lines = []
    with (wordnet_dir / "data.noun").open(encoding="utf-8") as f:
        for line in f:
            if not line.startswith("  "):
                break
            _, _, text = line.strip().partition(" ")
            lines.append(text.rstrip())
    return "\n".join(lines).strip() + "\n"


# ---------------------------------------------------------------- writing


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


def build(wordnet_dir: Path = DEFAULT_WORDNET_DIR, out: Path = DATA_FILE) -> list[dict]:
    """Write the data file and, beside it, WordNet's licence, which must travel with any copy."""
    rows = read_pairs(wordnet_dir)
    write_atomic(out, encode_jsonl_gz(rows))
    note = (
        f"{out.name} is derived from WordNet 3.0 ({wordnet_dir}/data.{{noun,verb,adj,adv}}, Debian wordnet-base) "
        "by `python tools/data.py build`: first lemma and definition of each synset, example sentences removed.\n\n"
    )
    write_atomic(out.parent / LICENSE_NAME, (note + license_text(wordnet_dir)).encode("utf-8"))
    return rows


# ---------------------------------------------------------------- loading


def split_of(word: str) -> str:
    """Stable split by word (case-folded), so every sense and spelling of a word lands on one side."""
    digest = hashlib.blake2b(word.lower().encode("utf-8"), digest_size=8).digest()
    return "heldout" if int.from_bytes(digest, "big") % 100 < HELDOUT_PERCENT else "train"


def read_rows(path: Path) -> list[dict]:
    """The raw {"word", "pos", "definition"} rows of a built data file."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"WordNet data file {path} is missing: run `python tools/data.py build` to create it")
    text = gzip.decompress(Path(path).read_bytes()).decode("utf-8")
    return json.loads("[" + ",".join(text.splitlines()) + "]")  # one parse: twice as fast as per line


def make_prompt(word: str, pos: str, ambiguous_pos: bool) -> str:
    """The instruction; the part of speech is named only when the word alone would not say which entry."""
    suffix = f" ({POS_NAMES[pos]})" if ambiguous_pos else ""
    return f"Define the word '{word}'{suffix}."


def load_pairs(split: str = "train", path: Path = DATA_FILE) -> list[dict]:
    """Prompt/answer pairs of one split, in file order (sorted by word); shuffle before training."""
    if split not in SPLITS:
        raise ValueError(f"unknown split={split!r}: use one of {', '.join(SPLITS)}")
    rows = read_rows(path)
    pos_of: dict[str, set] = {}
    for r in rows:
        pos_of.setdefault(r["word"], set()).add(r["pos"])
    return [
        {"prompt": make_prompt(r["word"], r["pos"], len(pos_of[r["word"]]) > 1), "answer": r["definition"]}
        for r in rows
        if split_of(r["word"]) == split
    ]


# ---------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="parse WordNet and write the gzipped JSONL data file and its licence")
    b.add_argument("--wordnet-dir", type=Path, default=DEFAULT_WORDNET_DIR)
    b.add_argument("--out", type=Path, default=DATA_FILE)
    args = parser.parse_args(argv)

    rows = build(args.wordnet_dir, args.out)
    heldout = sum(split_of(r["word"]) == "heldout" for r in rows)
    print(
        f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB): {len(rows)} pairs, "
        f"{len(rows) - heldout} train / {heldout} heldout"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
