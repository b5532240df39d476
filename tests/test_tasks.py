"""The lessons 06-07 task: deterministic, disjoint splits, exact match, and its two metrics."""

from __future__ import annotations

import gzip
import json

import pytest

from lq_edu.models import load_course_model
from lq_edu.tasks import (
    SIZES,
    SPLITS,
    SYSTEM,
    TASK_DIR,
    _first_param,
    build,
    build_records,
    evaluate_task,
    exact_match,
    heldout_loss,
    load_task,
    normalize,
    signatures,
)


def _read(path):
    with gzip.open(path, "rt") as fh:
        return [json.loads(line) for line in fh]


def test_build_is_deterministic_and_matches_the_committed_files(tmp_path):
    sizes = build(tmp_path)
    assert sizes == SIZES
    for split in SPLITS:
        fresh = (tmp_path / f"{split}.jsonl.gz").read_bytes()
        assert fresh == (TASK_DIR / f"{split}.jsonl.gz").read_bytes(), f"{split} differs from data/tasks"
    again = build_records()
    assert again == {s: _read(tmp_path / f"{s}.jsonl.gz") for s in SPLITS}
    assert build_records(seed=1)["train"] != again["train"]  # the seed matters


def test_splits_are_disjoint_by_page():
    records = {s: list(load_task(s)) for s in SPLITS}
    sources = {s: {r["source"] for r in recs} for s, recs in records.items()}
    questions = {s: {r["messages"][1]["content"] for r in recs} for s, recs in records.items()}
    for a, b in [("train", "validation"), ("train", "test"), ("validation", "test")]:
        assert not sources[a] & sources[b]
        assert not questions[a] & questions[b]
    test_modules = {r["answer"] for r in records["test"] if r["kind"] == "module"}
    train_modules = {r["answer"] for r in records["train"] if r["kind"] == "module"}
    assert not test_modules & train_modules


def test_records_are_well_formed():
    for split in SPLITS:
        ds = load_task(split)
        assert len(ds) == SIZES[split]
        assert set(ds.column_names) >= {"messages", "answer", "kind", "source"}
        for rec in ds.select(range(50)):
            roles = [m["role"] for m in rec["messages"]]
            assert roles == ["system", "user", "assistant"]
            assert rec["messages"][0]["content"] == SYSTEM
            assert rec["messages"][2]["content"] == rec["answer"]
            assert rec["kind"] in ("module", "name", "first_param")
            assert f"`{rec['answer']}" in rec["messages"][1]["content"] or rec["answer"] in rec["messages"][1]["content"]


def test_signature_parsing_on_a_written_out_page():
    page = {
        "source": "python3.11-doc/library/json.rst",
        "text": "json --- JSON encoder and decoder\n\nText.\n\n"
        "dumps(obj, *, skipkeys=False)\n   Serialize obj.\n"
        "JSONEncoder.encode(o)\n    writer.close()\n",
    }
    items = signatures([page])
    assert [(i["module"], i["name"], i["sig"], i["first_param"]) for i in items] == [
        ("json", "dumps", "json.dumps(obj, *, skipkeys=False)", "obj"),
        ("json", "encode", "json.JSONEncoder.encode(o)", "o"),
    ]
    assert signatures([{**page, "source": "python3.11-doc/tutorial/x.rst"}]) == []
    assert _first_param("self, key, /, default=None") == "key"
    assert _first_param("*args, **kwargs") == "args"
    assert _first_param("") is None


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
    loss = heldout_loss(model, tokenizer, "validation", max_examples=16)
    assert 1.0 < loss < 20.0
    # batching does not change the mean
    assert heldout_loss(model, tokenizer, "validation", max_examples=16, batch_size=3) == pytest.approx(loss, rel=1e-4)
    # an oracle "model" that answers correctly scores 1 through exact_match on the records
    records = list(load_task("validation").select(range(4)))
    assert all(exact_match(r["answer"], r["answer"]) for r in records)
