"""The course corpus: the Python 3.11 documentation as plain English text.

The kit ships its corpus in ``data/corpus/`` as gzipped JSON Lines, one record
per documentation page (``{"text": ..., "source": ...}``), split by page into
``train`` and ``validation``. It was built from the reST sources in Debian's
``python3.11-doc`` package (PSF licence; see ``data/corpus/README.md``) by::

    apt-get download python3.11-doc
    python -m lq_edu.corpus build python3.11-doc_*.deb

Building needs the ``.deb`` (the one step that needs a package registry);
everything after it, loading included, is offline.

What it leaves out: reST is turned into plain text by a handful of regular
expressions, not by docutils, so tables, and roles that reST broke across two
lines (about one per 30,000 characters), keep their markup. For a language model that only has to learn "English about Python",
that is good enough, and the rules fit on one screen.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import subprocess
import tempfile
from pathlib import Path

from lq_edu.paths import CORPUS_DIR

SPLITS = ("train", "validation")

# Pages left out: the changelog is a list of bug numbers, the licence page is
# legal text, and distutils/c-api are long API listings with little prose.
_SKIP_PREFIXES = ("whatsnew/changelog", "license", "distutils/", "c-api/", "contents", "includes/")
_VALIDATION_EVERY = 20  # one page in 20 (by hash of its path) is held out

# reST directives that become a short English lead-in; all others are dropped.
_DIRECTIVE_WORDS = {
    "note": "Note:",
    "warning": "Warning:",
    "seealso": "See also:",
    "important": "Important:",
    "versionadded": "New in version {arg}.",
    "versionchanged": "Changed in version {arg}.",
    "deprecated": "Deprecated since version {arg}.",
}
_SIGNATURE_DIRECTIVES = {
    "function", "class", "method", "attribute", "data", "exception",
    "decorator", "classmethod", "staticmethod", "describe", "opcode", "cmdoption",
}


def _inline(line: str) -> str:
    """Strip inline reST markup from one line, keeping the words."""
    line = re.sub(r":(rfc|pep):`(\d+)[^`]*`", lambda m: f"{m[1].upper()} {m[2]}", line)
    line = re.sub(r":[\w:.-]+:`~?([^`<]*?)\s*<[^`>]*>`", r"\1", line)  # :ref:`text <target>`
    line = re.sub(r":[\w:.-]+:`~([^`]*\.)?([^`]*)`", r"\2", line)  # :func:`~a.b` -> b
    line = re.sub(r":[\w:.-]+:`([^`]*)`", r"\1", line)  # :func:`a.b` -> a.b
    line = re.sub(r"`([^`<]+?)\s*<[^`>]+>`__?", r"\1", line)  # `text <url>`_
    line = re.sub(r"\s?\[#[\w-]*\]_", "", line)  # footnote references
    line = re.sub(r"``([^`]+)``", r"\1", line)  # ``code``
    line = re.sub(r"`([^`]+)`_?", r"\1", line)  # `interpreted`
    line = re.sub(r"\*\*([^*]+)\*\*", r"\1", line)  # **bold**
    line = re.sub(r"(?<![\w*])\*([^*\s][^*]*)\*(?![\w*])", r"\1", line)  # *emphasis*
    line = re.sub(r"\|[\w-]+\|", "", line)  # |substitutions|
    return line


def rst_to_text(rst: str) -> str:
    """Turn one reST page into plain text: directives, roles and underlines go."""
    out: list[str] = []
    skipping_block = False  # inside a dropped directive's indented body
    for raw in rst.splitlines():
        line = raw.rstrip()
        if skipping_block:
            if line == "" or line.startswith((" ", "\t")):
                continue
            skipping_block = False
        directive = re.match(r"^(\s*)\.\.\s+([\w:-]+)::\s*(.*)$", line)
        if directive:
            indent, name, arg = directive.groups()
            name = name.split(":")[-1]
            if name in _DIRECTIVE_WORDS:
                out.append(indent + _DIRECTIVE_WORDS[name].format(arg=arg.strip()))
            elif name in _SIGNATURE_DIRECTIVES and arg:
                out.append(indent + arg.strip())
            elif name in ("code-block", "highlight", "doctest", "testcode", "code"):
                pass  # the code itself follows, indented; keep it
            else:
                skipping_block = True  # toctree, index, module, image, ...
            continue
        if re.match(r"^\s*\.\.(\s|$)", line):  # comments, labels (.. _x:), footnotes
            if re.match(r"^\s*\.\.\s+\[", line):
                continue
            skipping_block = True
            continue
        if re.match(r"^\s*:[\w -]+:", line) and out and out[-1].strip() == "":
            continue  # field lists right after a blank line (directive options)
        if re.fullmatch(r"([=\-~^\"'`#*+.<>_])\1{2,}", line.strip()):
            continue  # section underlines and transitions
        line = _inline(line)
        if line.endswith("::"):
            line = line[:-1] if not line.endswith(" ::") else line[:-3]
        out.append(line)
    text = "\n".join(out)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip() + "\n"


def _held_out(source: str) -> bool:
    digest = hashlib.sha256(source.encode()).digest()
    return digest[0] % _VALIDATION_EVERY == 0


def build(deb: Path, out_dir: Path = CORPUS_DIR) -> dict[str, int]:
    """Extract the docs from ``deb`` and write ``{train,validation}.jsonl.gz``.

    Returns the number of characters written per split.
    """
    deb = Path(deb)
    if not deb.is_file():
        raise FileNotFoundError(
            f"{deb} does not exist; fetch it with `apt-get download python3.11-doc`"
        )
    records: dict[str, list[dict[str, str]]] = {s: [] for s in SPLITS}
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True)
        sources = sorted(Path(tmp).glob("usr/share/doc/python3*/html/_sources"))
        if not sources:
            raise ValueError(f"{deb} holds no html/_sources folder; is it python3.11-doc?")
        root = sources[0]
        for path in sorted(root.rglob("*.rst.txt")):
            name = path.relative_to(root).as_posix().removesuffix(".rst.txt")
            if name.startswith(_SKIP_PREFIXES):
                continue
            text = rst_to_text(path.read_text(encoding="utf-8"))
            if len(text) < 200:
                continue
            split = "validation" if _held_out(name) else "train"
            records[split].append({"text": text, "source": f"python3.11-doc/{name}.rst"})
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for split, recs in records.items():
        # mtime=0 keeps the .gz byte-identical across rebuilds
        with open(out_dir / f"{split}.jsonl.gz", "wb") as raw:
            with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as fh:
                for rec in recs:
                    fh.write((json.dumps(rec, ensure_ascii=False) + "\n").encode())
        sizes[split] = sum(len(r["text"]) for r in recs)
    return sizes


def corpus_files(corpus_dir: Path = CORPUS_DIR) -> dict[str, str]:
    """The ``data_files`` mapping for ``datasets.load_dataset("json", ...)``."""
    files = {s: corpus_dir / f"{s}.jsonl.gz" for s in SPLITS}
    for split, path in files.items():
        if not path.is_file():
            raise FileNotFoundError(
                f"corpus split {split!r} is missing at {path}; restore data/corpus/ from git "
                "(git checkout -- data/corpus) or rebuild it with "
                "`python -m lq_edu.corpus build python3.11-doc_*.deb`"
            )
    return {s: str(p) for s, p in files.items()}


def load_corpus(split: str = "train", corpus_dir: Path = CORPUS_DIR):
    """Load one split of the course corpus as a ``datasets.Dataset``.

    Columns: ``text`` (one documentation page) and ``source`` (its origin).
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not a corpus split; use one of {SPLITS}")
    from datasets import load_dataset

    files = corpus_files(corpus_dir)
    return load_dataset("json", data_files={split: files[split]}, split=split)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lq_edu.corpus", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="rebuild data/corpus from a python3.11-doc .deb")
    b.add_argument("deb", type=Path)
    b.add_argument("--out", type=Path, default=CORPUS_DIR)
    args = parser.parse_args(argv)
    sizes = build(args.deb, args.out)
    for split, n in sizes.items():
        print(f"{split:>10}: {n / 1e6:.2f} M characters")


if __name__ == "__main__":
    main()
