"""tools/corpora/pydocs.py: the Python library reference as "describe this API" pairs."""

import gzip
import json
from pathlib import Path

import pytest

from tools.corpora import pydocs, split_of

PAGE = """\
:mod:`shutil` --- High-level file operations
============================================

.. module:: shutil
   :synopsis: High-level file operations, including copying.

.. function:: copyfile(src, dst, *, follow_symlinks=True)

   Copy the contents of the file named *src* to a file named *dst*, see
   :func:`~shutil.copy` and :ref:`the notes <copy-notes>`.

   ``dst`` must be writable.

   .. versionchanged:: 3.3
      Added *follow_symlinks* argument.

.. class:: Archiver(name)
   :noindex:

   An archive format registered by name, used as follows::

      Archiver("zip")

   .. method:: register(extra)

      Register the format; a second call with the same name
      replaces the first one.

.. function:: tiny()

   Too short.

.. currentmodule:: os.path

.. function:: join(path, *paths)

   Join one or more path segments intelligently into one path string.
"""

BUILTINS = """\
Built-in Functions
==================

.. function:: abs(x)

   Return the absolute value of a number; the argument may be an integer or a float.
"""

LICENSE = """\
History and License
===================

PSF LICENSE AGREEMENT FOR PYTHON |release|
------------------------------------------

.. parsed-literal::

   1. This LICENSE AGREEMENT is between the Python Software Foundation ("PSF").

BEOPEN.COM LICENSE AGREEMENT FOR PYTHON 2.0
-------------------------------------------
"""


@pytest.fixture
def source_dir(tmp_path):
    root = tmp_path / "_sources"
    (root / "library").mkdir(parents=True)
    (root / "library" / "shutil.rst.txt").write_text(PAGE, encoding="utf-8")
    (root / "library" / "functions.rst.txt").write_text(BUILTINS, encoding="utf-8")
    (root / "license.rst.txt").write_text(LICENSE, encoding="utf-8")
    return root


def test_parses_objects_with_their_module_class_and_prose(source_dir):
    rows = {r["name"]: r for r in pydocs.read_rows_from_source(source_dir)}
    assert sorted(rows) == ["abs", "os.path.join", "shutil.Archiver", "shutil.Archiver.register", "shutil.copyfile"]
    assert rows["shutil.copyfile"] == {
        "module": "shutil",
        "kind": "function",
        "name": "shutil.copyfile",
        "signature": "shutil.copyfile(src, dst, *, follow_symlinks=True)",
        "description": "Copy the contents of the file named *src* to a file named *dst*, see copy and the notes. "
        "dst must be writable.",
    }
    assert rows["shutil.Archiver"]["description"] == "An archive format registered by name, used as follows:"
    assert rows["shutil.Archiver.register"]["kind"] == "method"
    assert rows["os.path.join"]["module"] == "os.path"
    assert rows["abs"]["module"] == "functions"  # builtins: bare names, grouped by their page


def test_build_is_byte_identical_and_carries_the_licence(source_dir, tmp_path):
    out = tmp_path / "out" / "pydocs.jsonl.gz"
    rows = pydocs.build(source_dir, out)
    first = out.read_bytes()
    pydocs.build(source_dir, out)
    assert out.read_bytes() == first
    assert [json.loads(line) for line in gzip.decompress(first).decode().splitlines()] == rows
    licence = (out.parent / pydocs.LICENSE_NAME).read_text()
    assert out.name in licence.splitlines()[0] and "PSF LICENSE AGREEMENT FOR PYTHON 3.11" in licence
    assert "BEOPEN" not in licence and "|release|" not in licence


def test_prompts_name_the_kind_and_signature(source_dir, tmp_path):
    out = tmp_path / "pydocs.jsonl.gz"
    pydocs.build(source_dir, out)
    pairs = [p for split in ("train", "validation", "test") for p in pydocs.load_pairs(split, out)]
    assert {
        "prompt": "Describe the Python method `shutil.Archiver.register(extra)`.",
        "answer": "Register the format; a second call with the same name replaces the first one.",
    } in pairs


def test_shipped_splits_are_disjoint_by_module():
    rows = pydocs.read_rows_from_source.__globals__["read_jsonl_gz"](pydocs.DATA_FILE, pydocs.BUILD_COMMAND)
    modules = {
        split: {r["module"] for r in rows if split_of(r["module"]) == split}
        for split in ("train", "validation", "test")
    }
    assert not modules["train"] & modules["test"] and not modules["validation"] & modules["test"]
    counts = {split: len(pydocs.load_pairs(split)) for split in modules}
    assert counts["train"] > 5000 and counts["validation"] > 500 and counts["test"] > 500
    assert pydocs.DATA_FILE.stat().st_size <= 5_000_000


@pytest.mark.skipif(not (pydocs.DEFAULT_SOURCE_DIR / "library").is_dir(), reason="Debian python3.11-doc not installed")
def test_shipped_file_matches_a_fresh_build(tmp_path):
    out = tmp_path / pydocs.DATA_FILE.name
    pydocs.build(pydocs.DEFAULT_SOURCE_DIR, out)
    assert out.read_bytes() == pydocs.DATA_FILE.read_bytes()


def test_missing_source_is_one_line(tmp_path, capsys):
    assert pydocs.main(["build", "--source-dir", str(tmp_path), "--out", str(tmp_path / "x.jsonl.gz")]) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1 and "apt-get install python3.11-doc" in err and not Path(tmp_path / "x.jsonl.gz").exists()
    )
