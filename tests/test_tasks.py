"""The lessons 06-07 task (which-module): deterministic, disjoint splits, exact match, and its metrics."""

from __future__ import annotations

import gzip
import json

import pytest

from lq_edu.models import load_course_model
from lq_edu.tasks import (
    LABELS,
    SPLITS,
    SYSTEM,
    TASK_DIR,
    build,
    build_records,
    evaluate_task,
    exact_match,
    heldout_loss,
    labelled_sentences,
    load_task,
    majority_baseline,
    normalize,
    page_module,
    sentences,
)


def _read(path):
    with gzip.open(path, "rt") as fh:
        return [json.loads(line) for line in fh]


def test_build_is_deterministic_and_matches_the_committed_files(tmp_path):
    sizes = build(tmp_path)
    assert sizes == {s: len(load_task(s)) for s in SPLITS}
    for name in [f"{s}.jsonl.gz" for s in SPLITS] + ["README.md"]:
        assert (tmp_path / name).read_bytes() == (TASK_DIR / name).read_bytes(), f"{name} differs from data/tasks"
    again = build_records()
    assert again == {s: _read(tmp_path / f"{s}.jsonl.gz") for s in SPLITS}
    assert build_records(seed=1)["train"] != again["train"]  # the seed shuffles
    assert sorted(map(str, build_records(seed=1)["train"])) == sorted(map(str, again["train"]))  # ... and only that


def test_splits_are_disjoint_by_sentence_and_cover_every_label():
    records = {s: list(load_task(s)) for s in SPLITS}
    questions = {s: {r["messages"][1]["content"] for r in recs} for s, recs in records.items()}
    for a, b in [("train", "validation"), ("train", "test"), ("validation", "test")]:
        assert not questions[a] & questions[b]
    for split, recs in records.items():
        assert {r["answer"] for r in recs} == set(LABELS), f"{split} misses a label"
        assert len(questions[split]) == len(recs), f"{split} repeats a sentence"
    assert len(records["test"]) >= 300 and len(records["train"]) >= 1000


def test_records_are_well_formed():
    for split in SPLITS:
        ds = load_task(split)
        assert set(ds.column_names) >= {"messages", "answer", "source"}
        for rec in ds.select(range(50)):
            roles = [m["role"] for m in rec["messages"]]
            assert roles == ["system", "user", "assistant"]
            assert rec["messages"][0]["content"] == SYSTEM
            assert rec["messages"][2]["content"] == rec["answer"] and rec["answer"] in LABELS
            assert "/library/" in rec["source"]
    assert all(label in SYSTEM for label in LABELS)


def test_sentence_extraction_on_a_written_out_page():
    page = {
        "source": "python3.11-doc/library/xml.dom.minidom.rst",
        "text": "xml.dom.minidom --- Minimal DOM implementation\n\n"
        "Source code: Lib/xml/etree/ElementTree.py\n\n"
        "This module implements a simple and efficient API for parsing XML data. Short one.\n\n"
        "    >>> import xml.etree.ElementTree as ET\n\n"
        "   Indented text is a signature body or code, not prose we can trust at all.\n\n"
        "Changed in version 3.3: This module will use a fast implementation whenever available.\n",
    }
    assert page_module(page) == "xml"
    assert sentences(page["text"]) == ["This module implements a simple and efficient API for parsing XML data."]
    items = labelled_sentences([page, page])  # a repeated sentence is kept once
    assert items == [{"sentence": "This module implements a simple and efficient API for parsing XML data.",
                      "module": "xml", "source": page["source"]}]
    assert page_module({**page, "source": "python3.11-doc/tutorial/x.rst"}) is None
    assert labelled_sentences([page], labels=("json",)) == []


def test_majority_baseline_is_the_share_of_the_top_training_label():
    train = [{"answer": "a"}, {"answer": "a"}, {"answer": "b"}]
    assert majority_baseline([{"answer": "a"}, {"answer": "b"}, {"answer": "c"}, {"answer": "a"}], train) == 0.5
    assert 0.1 < majority_baseline("test") < 0.3
    with pytest.raises(ValueError, match="non-empty"):
        majority_baseline([], train)


@pytest.mark.parametrize(
    "prediction, answer, expected",
    [
        ("json", "json", True),
        ("  `json`. ", "json", True),
        ("JSON", "json", True),
        ("'os.path'\nmore text", "os.path", True),
        ("json.dumps", "json", False),
        ("jsonx", "json", False),
        ("", "json", False),
        ("", "", False),
        ("\n\nobj", "obj", True),
    ],
)
def test_exact_match(prediction, answer, expected):
    assert exact_match(prediction, answer) is expected


def test_normalize_written_out():
    assert normalize('  "Path."\nignored') == "path"
    assert normalize("") == ""


def test_load_task_errors(tmp_path):
    with pytest.raises(ValueError, match="not a task split"):
        load_task("dev")
    with pytest.raises(FileNotFoundError, match="python -m lq_edu.tasks build"):
        load_task("train", task_dir=tmp_path)


def test_metrics_on_the_untuned_model():
    model, tokenizer = load_course_model()
    result = evaluate_task(model, tokenizer, "validation", max_examples=8, max_new_tokens=6)
    assert result["n"] == 8 and len(result["examples"]) == 8
    assert result["accuracy"] == sum(e["correct"] for e in result["examples"]) / 8
    assert result["accuracy"] <= 0.25  # it has never seen the chat format
    # batched, left-padded generation answers exactly as one prompt at a time
    one_by_one = evaluate_task(model, tokenizer, "validation", max_examples=8, max_new_tokens=6, batch_size=1)
    assert [e["prediction"] for e in one_by_one["examples"]] == [e["prediction"] for e in result["examples"]]
    loss = heldout_loss(model, tokenizer, "validation", max_examples=16)
    assert 1.0 < loss < 20.0
    # batching does not change the mean
    assert heldout_loss(model, tokenizer, "validation", max_examples=16, batch_size=3) == pytest.approx(loss, rel=1e-4)
    # an oracle "model" that answers correctly scores 1 through exact_match on the records
    records = list(load_task("validation").select(range(4)))
    assert all(exact_match(r["answer"], r["answer"]) for r in records)
    with pytest.raises(ValueError, match="no examples"):
        evaluate_task(model, tokenizer, [], max_new_tokens=2)
