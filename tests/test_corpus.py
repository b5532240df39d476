"""The shipped corpus: present, split by page, plain text, loadable through datasets."""

from __future__ import annotations

import pytest

from lq_edu.corpus import SPLITS, corpus_files, load_corpus, rst_to_text


@pytest.fixture(scope="module")
def splits():
    return {s: load_corpus(s) for s in SPLITS}


def test_splits_load_through_datasets(splits):
    for split, ds in splits.items():
        assert ds.column_names == ["text", "source"], split
        assert len(ds) > 10, split


def test_validation_is_held_out_by_page(splits):
    train_sources = set(splits["train"]["source"])
    valid_sources = set(splits["validation"]["source"])
    assert train_sources.isdisjoint(valid_sources)
    assert 0.02 < len(valid_sources) / (len(train_sources) + len(valid_sources)) < 0.10


def test_corpus_size_is_within_the_brief(splits):
    chars = sum(len(t) for ds in splits.values() for t in ds["text"])
    assert 2e6 <= chars <= 10e6, f"{chars:,} characters; the kit promises 2-10 MB of text"


def test_markup_is_mostly_gone(splits):
    """Directives are gone; roles survive only where reST broke them across lines (a known limit)."""
    import re

    text = "\n".join(splits["train"]["text"])
    for directive in (".. index::", ".. module::", ".. toctree::", ".. function::"):
        assert directive not in text, directive
    leftover_roles = len(re.findall(r":[a-z]+:`", text))
    assert leftover_roles < len(text) / 10_000, f"{leftover_roles} roles left in {len(text):,} characters"


def test_rst_to_text_keeps_words_and_drops_markup():
    rst = """:mod:`json` --- JSON encoder
============================

.. module:: json
   :synopsis: Encode and decode.

Use :func:`~json.dumps` or :func:`json.loads`, see `the spec <https://json.org>`_
and :rfc:`7159`. **Bold** and *italic* and ``code``.

.. versionadded:: 3.2

.. function:: dumps(obj, *, indent=None)

   Serialize *obj*::

      >>> dumps(1)
"""
    text = rst_to_text(rst)
    assert text.splitlines()[0] == "json --- JSON encoder"
    assert "Use dumps or json.loads, see the spec" in text
    assert "RFC 7159" in text
    assert "Bold and italic and code." in text
    assert "New in version 3.2." in text
    assert "dumps(obj, *, indent=None)" in text
    assert "Serialize obj:" in text and ">>> dumps(1)" in text
    assert "synopsis" not in text and "====" not in text and ".. " not in text


def test_bad_split_and_missing_files_say_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="use one of"):
        load_corpus("test")
    with pytest.raises(FileNotFoundError, match="git checkout -- data/corpus"):
        corpus_files(tmp_path)
