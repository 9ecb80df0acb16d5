"""The WordNet "define the word" data set, shipped as tools/data/wordnet_define.jsonl.gz.

Why WordNet: it is small, freely licensed, installed by Debian's ``wordnet-base``
package, and gives a task a 135M-parameter model visibly improves on after a short
sparse fine-tune ("Define the word 'X'." -> the WordNet gloss).

Build (deterministic, byte-identical on rebuild)::

    python -m tools.corpora.wordnet build [--wordnet-dir /usr/share/wordnet] [--out tools/data/wordnet_define.jsonl.gz]

(from the repository root; `make data` builds both corpora).

Pair selection: one pair per synset, for the synset's *first* lemma (its headword, the
lemma the gloss is written for; later lemmas are often rare synonyms): 117,645 pairs,
3.4 MB compressed. Every (lemma, synset) pair would be 206,954 pairs, 5.3 MB, over budget.

Use from Python::

    from tools.corpora.wordnet import load_pairs
    train = load_pairs("train")      # [{"prompt": "Define the word 'bank' (noun).", "answer": "..."}]
    test = load_pairs("test")        # ~10% of the words, never seen in "train" (and 10% more in "validation")

Prompts name the part of speech only when the word appears under more than one
part of speech (``'bank' (noun)`` vs ``'bank' (verb)``); a word with several senses
of one part of speech keeps one prompt with several answers (one pair per sense).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from tools.corpora import DATA_DIR, build_main, check_split, read_jsonl_gz, split_of, write_corpus

DATA_FILE = DATA_DIR / "wordnet_define.jsonl.gz"
SYSTEM = "You are a concise dictionary."  # the chat system prompt the demo, Axolotl data and benchmarks use
MAX_LENGTH = 96  # tokens per chat-formatted pair in training: every gloss fits
BUILD_COMMAND = "python -m tools.corpora.wordnet build"
LICENSE_NAME = "WORDNET_LICENSE"
DEFAULT_WORDNET_DIR = Path("/usr/share/wordnet")

POS_FILES = ("noun", "verb", "adj", "adv")
POS_NAMES = {"n": "noun", "v": "verb", "a": "adjective", "r": "adverb"}

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
        raise ValueError(
            f"not a WordNet synset line (expected 'offset lex ss_type w_cnt word ... | gloss'): {line[:80]!r}"
        )
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
            raise FileNotFoundError(
                f"{path} not found: install WordNet (apt-get install wordnet-base) or pass --wordnet-dir"
            )
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


def build(wordnet_dir: Path = DEFAULT_WORDNET_DIR, out: Path = DATA_FILE) -> list[dict]:
    """Write the data file and, beside it, WordNet's licence, which must travel with any copy."""
    rows = read_pairs(wordnet_dir)
    note = (
        f"{out.name} is derived from WordNet 3.0 ({wordnet_dir}/data.{{noun,verb,adj,adv}}, Debian wordnet-base) "
        "by `python -m tools.corpora.wordnet build`: first lemma and definition of each synset, example sentences removed.\n\n"
    )
    write_corpus(out, rows, LICENSE_NAME, note + license_text(wordnet_dir))
    return rows


# ---------------------------------------------------------------- loading


def read_rows(path: Path) -> list[dict]:
    """The raw {"word", "pos", "definition"} rows of a built data file."""
    return read_jsonl_gz(path, BUILD_COMMAND)


def make_prompt(word: str, pos: str, ambiguous_pos: bool) -> str:
    """The instruction; the part of speech is named only when the word alone would not say which entry."""
    suffix = f" ({POS_NAMES[pos]})" if ambiguous_pos else ""
    return f"Define the word '{word}'{suffix}."


def load_pairs(split: str = "train", path: Path = DATA_FILE) -> list[dict]:
    """Prompt/answer pairs of one split, in file order (sorted by word); shuffle before training."""
    check_split(split)
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
    return build_main(
        argv, __doc__.split("\n\n")[0], build, "--wordnet-dir", DEFAULT_WORDNET_DIR, DATA_FILE, group_key="word"
    )


if __name__ == "__main__":
    sys.exit(main())
