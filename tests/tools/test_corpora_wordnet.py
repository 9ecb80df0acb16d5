"""tools/corpora/wordnet.py: WordNet parsing, byte-identical rebuilds, stable disjoint splits, error messages."""

import gzip
import json
import re
from pathlib import Path

import pytest

from tools.corpora import split_of, wordnet

HEADER = (
    "  1 This software and database is being provided to you, the LICENSEE, by  \n"
    "  2 Princeton University under the following license.  \n"
)
FAKE_WORDNET = {
    "data.noun": HEADER
    + '00001740 06 n 02 bank 0 depository_financial_institution 0 001 @ 08054721 n 0000 | a financial institution that accepts deposits; "he cashed a check at the bank"; "that bank holds the mortgage"  \n'
    + '00001750 17 n 01 bank 1 000 | sloping land (especially the slope beside a body of water); "they pulled the canoe up on the bank"  \n'
    + "00001760 13 n 01 abalone 0 000 | edible flesh of any of various abalones  \n"
    + '00001770 04 n 01 mobilization 0 000 | act of assembling and putting into readiness for war: "mobilization of the troops"  \n',
    "data.verb": HEADER
    + "00002000 40 v 01 bank 0 000 01 + 02 00 | do business with a bank or keep an account at a bank  \n",
    "data.adj": HEADER
    + '00003000 00 a 01 able(a) 0 000 | having the necessary means or skill; "able to swim"  \n'
    + '00003100 00 s 02 galore(ip) 0 abounding 0 001 & 00013887 a 0000 | existing in abundance; "whiskey galore"  \n',
    "data.adv": HEADER + "00004000 02 r 01 in_a_way 0 000 | to some (great or small) extent;  \n",
}
EXPECTED_ROWS = [
    {"word": "abalone", "pos": "n", "definition": "edible flesh of any of various abalones"},
    {"word": "able", "pos": "a", "definition": "having the necessary means or skill"},
    {"word": "bank", "pos": "n", "definition": "a financial institution that accepts deposits"},
    {"word": "bank", "pos": "n", "definition": "sloping land (especially the slope beside a body of water)"},
    {"word": "bank", "pos": "v", "definition": "do business with a bank or keep an account at a bank"},
    {"word": "galore", "pos": "a", "definition": "existing in abundance"},
    {"word": "in a way", "pos": "r", "definition": "to some (great or small) extent"},
    {"word": "mobilization", "pos": "n", "definition": "act of assembling and putting into readiness for war"},
]


@pytest.fixture
def wordnet_dir(tmp_path):
    """A four-file WordNet with a license header, examples, adjective markers and a satellite."""
    root = tmp_path / "wordnet"
    root.mkdir()
    for name, text in FAKE_WORDNET.items():
        (root / name).write_text(text, encoding="utf-8")
    return root


@pytest.fixture
def built(wordnet_dir, tmp_path):
    out = tmp_path / "out" / "define.jsonl.gz"
    wordnet.build(wordnet_dir, out)
    return out


def test_parses_first_lemmas_definitions_and_pos(built):
    with gzip.open(built, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    assert rows == EXPECTED_ROWS


def test_license_travels_with_the_data(built):
    text = (built.parent / wordnet.LICENSE_NAME).read_text()
    assert built.name in text.splitlines()[0]
    assert "This software and database is being provided to you, the LICENSEE, by\nPrinceton University" in text
    assert "  1 " not in text


def test_rebuild_gives_identical_bytes_and_no_temp_files(wordnet_dir, built, tmp_path):
    first = built.read_bytes()
    wordnet.build(wordnet_dir, built)
    other = tmp_path / "elsewhere" / "other-name.jsonl.gz"
    wordnet.build(wordnet_dir, other)
    assert built.read_bytes() == first == other.read_bytes()
    assert sorted(p.name for p in built.parent.iterdir()) == sorted([built.name, wordnet.LICENSE_NAME])


def test_cli_build_reports_counts(wordnet_dir, tmp_path, capsys):
    out = tmp_path / "cli.jsonl.gz"
    assert wordnet.main(["build", "--wordnet-dir", str(wordnet_dir), "--out", str(out)]) == 0
    assert "8 pairs, 6 train / 1 validation / 1 test" in capsys.readouterr().out


def test_prompts_name_pos_only_for_words_with_several(built):
    pairs = [p for split in ("train", "validation", "test") for p in wordnet.load_pairs(split, built)]
    prompts = {p["prompt"] for p in pairs}
    assert "Define the word 'bank' (noun)." in prompts
    assert "Define the word 'bank' (verb)." in prompts
    assert "Define the word 'in a way'." in prompts
    assert "Define the word 'galore'." in prompts
    assert {"prompt": "Define the word 'able'.", "answer": "having the necessary means or skill"} in pairs


def test_splits_partition_fake_data_by_word(built):
    assert [p["prompt"] for p in wordnet.load_pairs("test", built)] == ["Define the word 'abalone'."]
    assert [p["prompt"] for p in wordnet.load_pairs("validation", built)] == ["Define the word 'in a way'."]
    assert len(wordnet.load_pairs("train", built)) == len(EXPECTED_ROWS) - 2


def test_split_is_a_stable_hash_of_the_case_folded_word():
    # Pinned values: a change here reshuffles which words are held out.
    words = ("abalone", "aberration", "bank", "dog", "in a way")
    assert [split_of(w) for w in words] == ["test", "test", "train", "train", "validation"]
    assert split_of("Bank") == split_of("bank")


def test_shipped_splits_are_disjoint_80_10_10():
    splits = {split: wordnet.load_pairs(split) for split in ("train", "validation", "test")}
    word = re.compile(r"Define the word '(.*)'")
    words = {split: {word.match(p["prompt"]).group(1).lower() for p in pairs} for split, pairs in splits.items()}
    assert not words["train"] & words["validation"] and not words["train"] & words["test"]
    assert not words["validation"] & words["test"]
    total = sum(map(len, splits.values()))
    assert 0.08 < len(splits["test"]) / total < 0.12 and 0.08 < len(splits["validation"]) / total < 0.12
    assert all(p["answer"] and p["prompt"].endswith(".") for pairs in splits.values() for p in pairs)


def test_shipped_file_is_small():
    assert wordnet.DATA_FILE.stat().st_size <= 5_000_000


@pytest.mark.skipif(not Path("/usr/share/wordnet/data.noun").is_file(), reason="Debian wordnet-base not installed")
def test_shipped_file_matches_a_fresh_build(tmp_path):
    out = tmp_path / wordnet.DATA_FILE.name
    wordnet.build(wordnet.DEFAULT_WORDNET_DIR, out)
    assert out.read_bytes() == wordnet.DATA_FILE.read_bytes()


def test_unknown_split_names_the_allowed_ones(built):
    with pytest.raises(ValueError, match=r"split='heldout'.*train, validation, test"):
        wordnet.load_pairs("heldout", built)


def test_missing_data_file_says_how_to_build_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"python -m tools\.corpora\.wordnet build"):
        wordnet.load_pairs("train", tmp_path / "missing.jsonl.gz")


def test_missing_wordnet_says_how_to_install_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"wordnet-base.*--wordnet-dir"):
        wordnet.build(tmp_path, tmp_path / "out.jsonl.gz")


def test_malformed_line_is_reported():
    with pytest.raises(ValueError, match="not a WordNet synset line"):
        wordnet.parse_synset_line("garbage without a gloss\n")
