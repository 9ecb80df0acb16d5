"""The Python library reference as "describe this API" pairs, shipped as tools/data/pydocs_describe.jsonl.gz.

A second corpus of another kind than WordNet's one-line glosses: several sentences of technical prose per answer,
with identifiers, argument names and cross-references. Source: the reStructuredText sources of the Python 3.11
documentation that Debian's `python3.11-doc` installs (`/usr/share/doc/python3.11/html/_sources/library/`),
licensed under the PSF License Agreement (tools/data/PSF_LICENSE).

Build (deterministic, byte-identical on rebuild), from the repository root::

    python -m tools.corpora.pydocs build [--source-dir /usr/share/doc/python3.11/html/_sources] [--out ...]

One pair per documented object (`.. function::`, `.. class::`, `.. method::`, ...):
"Describe the Python function `shutil.copyfile(src, dst, *, follow_symlinks=True)`." → the description's prose
paragraphs up to the first code example or version note, with reST roles reduced to their text. Splits are by
module, so the test split's modules are unseen in training (see `tools.corpora.split_of`).

Use from Python::

    from tools.corpora.pydocs import load_pairs
    train = load_pairs("train")      # [{"prompt": "Describe the Python function `...`.", "answer": "..."}]
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from tools.corpora import DATA_DIR, build_main, check_split, read_jsonl_gz, split_of, write_corpus

DATA_FILE = DATA_DIR / "pydocs_describe.jsonl.gz"
SYSTEM = "You are a concise Python reference."
MAX_LENGTH = 192  # tokens per chat-formatted pair: nine in ten answers fit whole
LICENSE_NAME = "PSF_LICENSE"
BUILD_COMMAND = "python -m tools.corpora.pydocs build"
DEFAULT_SOURCE_DIR = Path("/usr/share/doc/python3.11/html/_sources")

# Object directives whose description becomes an answer, and the noun the prompt uses for each.
KINDS = {
    "function": "function",
    "method": "method",
    "class": "class",
    "exception": "exception",
    "attribute": "attribute",
    "data": "constant",
    "decorator": "decorator",
    "classmethod": "class method",
    "staticmethod": "static method",
    "coroutinefunction": "coroutine function",
    "coroutinemethod": "coroutine method",
    "decoratormethod": "decorator method",
}
MAX_ANSWER_CHARS = 1200
MIN_ANSWER_CHARS = 40

_DIRECTIVE = re.compile(r"^(?P<indent> *)\.\. (?P<name>[\w:-]+)::\s*(?P<arg>.*)$")
_ROLE = re.compile(r":[\w:.-]+:`(?P<body>[^`]*)`")
_FIELD = re.compile(r"^:[\w -]+:(\s|$)")  # a field list (`:param x:`), unlike a role (`:func:`x``) opening a line
_EXPLICIT_TARGET = re.compile(r"^(?P<text>.*?)\s*<[^<>]*>$", re.DOTALL)


# ---------------------------------------------------------------- parsing


def clean_inline(text: str) -> str:
    """reST inline markup to plain text: roles keep their text (`~mod.f` → `f`, `text <target>` → `text`)."""

    def role(match: re.Match) -> str:
        body = match.group("body")
        explicit = _EXPLICIT_TARGET.match(body)
        if explicit and explicit.group("text"):
            body = explicit.group("text")
        if body.startswith("~"):
            body = body[1:].rsplit(".", 1)[-1]
        return body.lstrip("!")

    text = _ROLE.sub(role, text)
    text = re.sub(r"``([^`]+)``", r"\1", text)
    text = re.sub(r"`([^`<]+?)(?: <[^>]*>)?`_{1,2}", r"\1", text)  # hyperlinks
    text = text.replace("\\ ", "").replace("\\", "")
    return re.sub(r"\s+", " ", text).strip()


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _body(lines: list[str], start: int, indent: int) -> list[str]:
    """The lines of the block that starts at `start` and is indented deeper than `indent` (blank lines included)."""
    end = start
    while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) > indent):
        end += 1
    return lines[start:end]


def description(body: list[str]) -> str:
    """The prose paragraphs at the top of a directive's body, up to the first nested directive or code example."""
    content = [line for line in body if line.strip()]
    if not content:
        return ""
    base = min(_indent(line) for line in content)
    paragraphs, current = [], []
    for line in body:
        if not line.strip():
            if current:
                paragraphs.append(" ".join(current))
                current = []
            continue
        if _indent(line) > base:  # an option list (`:noindex:`) or a literal block continuing
            if current or paragraphs:
                break
            continue
        text = line.strip()
        if text.startswith(("..", ">>>")) or _FIELD.match(text) or text.endswith("::"):
            if text.endswith("::") and not text.startswith(".."):
                current.append(text[:-1])  # "as follows::" introduces code: keep the sentence, stop before the code
            break
        current.append(text)
    if current:
        paragraphs.append(" ".join(current))
    answer = ""
    for paragraph in paragraphs:
        paragraph = clean_inline(paragraph)
        if answer and len(answer) + len(paragraph) + 1 > MAX_ANSWER_CHARS:
            break
        answer = f"{answer} {paragraph}".strip()
    return answer[:MAX_ANSWER_CHARS]


def parse_page(text: str, page: str) -> list[dict]:
    """Every described object of one library page as {"module", "kind", "name", "signature", "description"}.

    Objects before any `.. module::` are builtins (functions.rst, exceptions.rst): their names stay bare and their
    split group is the page's name.
    """
    lines = text.splitlines()
    module, rows, classes = None, [], []  # classes: [(indent, dotted class name)] enclosing the line
    i = 0
    while i < len(lines):
        match = _DIRECTIVE.match(lines[i])
        i += 1
        if not match:
            continue
        indent, name, arg = len(match.group("indent")), match.group("name"), match.group("arg").strip()
        classes = [(level, cls) for level, cls in classes if level < indent]
        if name in ("module", "currentmodule") and arg:
            module, classes = arg, []
            continue
        kind = name.removeprefix("py:") if name.startswith("py:") else name
        if kind not in KINDS or not arg:
            continue
        while i < len(lines) and _indent(lines[i]) > indent and lines[i].strip().startswith(":"):
            i += 1  # directive options such as :noindex:
        body = _body(lines, i, indent)
        signature = clean_inline(arg.split("\n")[0])
        short = re.split(r"[(\[ ]", signature, maxsplit=1)[0]
        owner = classes[-1][1] if classes else module
        qualified = short if owner is None or short.startswith(f"{module}.") else f"{owner}.{short}"
        if kind in ("class", "exception"):
            classes.append((indent, qualified))
        answer = description(body)
        if len(answer) >= MIN_ANSWER_CHARS:
            shown = qualified + signature[len(short) :]
            rows.append(
                {"module": module or page, "kind": kind, "name": qualified, "signature": shown, "description": answer}
            )
    return rows


def read_rows_from_source(source_dir: Path) -> list[dict]:
    """All described objects of the library reference, de-duplicated and sorted by name."""
    library = source_dir / "library"
    if not library.is_dir():
        raise FileNotFoundError(
            f"{library} not found: install the Python docs (apt-get install python3.11-doc) or pass --source-dir"
        )
    seen, rows = set(), []
    for page in sorted(library.glob("*.rst.txt")):
        for row in parse_page(page.read_text(encoding="utf-8"), page.name.removesuffix(".rst.txt")):
            key = (row["name"], row["kind"])
            if key not in seen:
                seen.add(key)
                rows.append(row)
    return sorted(rows, key=lambda r: (r["name"].lower(), r["kind"]))


def license_text(source_dir: Path) -> str:
    """The PSF License Agreement as the documentation states it (license.rst.txt)."""
    text = (source_dir / "license.rst.txt").read_text(encoding="utf-8")
    start = text.index("PSF LICENSE AGREEMENT")
    end = text.index("BEOPEN.COM LICENSE AGREEMENT", start)
    lines = [line.removeprefix("   ") for line in text[start:end].splitlines()]
    text = "\n".join(line.rstrip() for line in lines if not line.startswith(".. ")).strip() + "\n"
    return text.replace("|release|", "3.11")


# ---------------------------------------------------------------- building and loading


def build(source_dir: Path = DEFAULT_SOURCE_DIR, out: Path = DATA_FILE) -> list[dict]:
    """Write the data file and, beside it, the PSF licence, which must travel with any copy."""
    rows = read_rows_from_source(source_dir)
    note = (
        f"{out.name} is derived from the Python 3.11 documentation ({source_dir}/library/*.rst.txt, Debian "
        "python3.11-doc) by `python -m tools.corpora.pydocs build`: the first prose paragraphs describing each documented "
        "object, reST markup removed.\n\nCopyright (c) 2001-2023 Python Software Foundation; All Rights Reserved.\n\n"
    )
    write_corpus(out, rows, LICENSE_NAME, note + license_text(source_dir))
    return rows


def make_prompt(row: dict) -> str:
    return f"Describe the Python {KINDS[row['kind']]} `{row['signature']}`."


def load_pairs(split: str = "train", path: Path = DATA_FILE) -> list[dict]:
    """Prompt/answer pairs of one split, in file order (sorted by name); shuffle before training."""
    check_split(split)
    return [
        {"prompt": make_prompt(r), "answer": r["description"]}
        for r in read_jsonl_gz(path, BUILD_COMMAND)
        if split_of(r["module"]) == split
    ]


def main(argv: list[str] | None = None) -> int:
    return build_main(
        argv, __doc__.split("\n\n")[0], build, "--source-dir", DEFAULT_SOURCE_DIR, DATA_FILE, group_key="module"
    )


if __name__ == "__main__":
    sys.exit(main())
