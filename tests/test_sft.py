"""SFT data: the assistant mask, padding, packing and loading."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from lq_edu.models import load_course_model
from lq_edu.sft import IGNORE, SFTDataset, collate, load_sft, pack, padded, render
from lq_edu.trainer import collate as trainer_collate

CHAT = [
    {"role": "system", "content": "You answer with a single name."},
    {"role": "user", "content": "Which module does `json.dumps(obj)` come from?"},
    {"role": "assistant", "content": "json"},
]
TWO_TURNS = [
    {"role": "user", "content": "First parameter of `os.path.join(path, *paths)`?"},
    {"role": "assistant", "content": "path"},
    {"role": "user", "content": "And its module?"},
    {"role": "assistant", "content": "os.path"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_course_model()[1]


def _labelled_runs(ids, labels):
    """Contiguous runs of labelled tokens, as lists of ids."""
    runs, current = [], []
    for tok, lab in zip(ids, labels, strict=True):
        if lab != IGNORE:
            assert lab == tok
            current.append(tok)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


@pytest.mark.parametrize("messages", [CHAT, TWO_TURNS])
def test_mask_covers_exactly_assistant_tokens(tokenizer, messages):
    ids, labels = render(tokenizer, messages)
    assert len(ids) == len(labels)
    runs = _labelled_runs(ids, labels)
    replies = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
    assert [tokenizer.decode(run) for run in runs] == replies
    # and everything else (system, user, role headers) is unlabelled
    n_assistant = sum(len(run) for run in runs)
    assert sum(lab != IGNORE for lab in labels) == n_assistant
    assert tokenizer.decode(ids).startswith("<|im_start|>")


def test_labelled_tokens_equal_the_template_without_assistant_text(tokenizer):
    ids, labels = render(tokenizer, CHAT)
    prompt = tokenizer.apply_chat_template(CHAT[:-1], add_generation_prompt=True, tokenize=True, return_dict=True)
    n_prompt = len(prompt["input_ids"])
    assert ids[:n_prompt] == list(prompt["input_ids"])
    assert all(lab == IGNORE for lab in labels[:n_prompt])
    assert labels[n_prompt] != IGNORE  # the first answer token is trained


@pytest.mark.parametrize(
    "bad, match",
    [
        ([], "non-empty"),
        ([{"role": "user", "content": "hi"}], "no assistant turn"),
        ([{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}], "role"),
        ([{"role": "assistant", "content": None}], "string content"),
        ("just text", "non-empty list"),
    ],
)
def test_bad_messages_raise(tokenizer, bad, match):
    with pytest.raises(ValueError, match=match):
        render(tokenizer, bad)


def test_too_long_raises(tokenizer):
    long_chat = [{"role": "user", "content": "word " * 600}, {"role": "assistant", "content": "x"}]
    with pytest.raises(ValueError, match="longer than max_length=512"):
        render(tokenizer, long_chat)
    with pytest.raises(ValueError, match="max_length=10"):
        render(tokenizer, CHAT, max_length=10)


def test_collate_pads_with_masks(tokenizer):
    batch = [render(tokenizer, CHAT), render(tokenizer, TWO_TURNS)]
    out = collate(batch, pad_id=tokenizer.pad_token_id)
    lengths = [len(ids) for ids, _ in batch]
    assert out["input_ids"].shape == (2, max(lengths))
    for row, (ids, labels) in enumerate(batch):
        n = len(ids)
        assert out["input_ids"][row, :n].tolist() == ids
        assert out["labels"][row, :n].tolist() == labels
        assert out["attention_mask"][row, :n].eq(1).all() and out["attention_mask"][row, n:].eq(0).all()
        assert out["labels"][row, n:].eq(IGNORE).all()
        assert out["input_ids"][row, n:].eq(tokenizer.pad_token_id).all()
    with pytest.raises(ValueError, match="empty"):
        collate([], pad_id=0)


def test_padding_does_not_change_the_loss(tokenizer):
    model, _ = load_course_model()
    short, long = render(tokenizer, CHAT), render(tokenizer, TWO_TURNS)
    alone = collate([short], tokenizer.pad_token_id)
    padded = collate([short, long], tokenizer.pad_token_id)
    with torch.no_grad():
        logits_alone = model(input_ids=alone["input_ids"], attention_mask=alone["attention_mask"]).logits
        logits_pad = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    n = len(short[0])
    torch.testing.assert_close(logits_pad[0, :n], logits_alone[0], atol=1e-4, rtol=1e-4)


def test_padded_examples_feed_the_trainer_and_lose_only_shared_padding(tokenizer):
    short, long = render(tokenizer, CHAT), render(tokenizer, TWO_TURNS)
    examples = padded([short, long], tokenizer.pad_token_id, length=len(long[0]) + 7)
    assert [len(e["input_ids"]) for e in examples] == [len(long[0]) + 7] * 2
    assert examples[0]["input_ids"][: len(short[0])].tolist() == short[0]
    assert examples[0]["labels"][len(short[0]) :].eq(IGNORE).all()
    assert int(examples[1]["attention_mask"].sum()) == len(long[0])
    # the trainer cuts the padding every row shares, and nothing else
    both = trainer_collate(examples)
    assert both["input_ids"].shape == (2, len(long[0]))
    assert both["labels"][1].tolist() == long[1]
    alone = trainer_collate(examples[:1])
    assert alone["input_ids"].shape == (1, len(short[0])) and alone["labels"][0].tolist() == short[1]
    assert len(padded([short], tokenizer.pad_token_id)[0]["input_ids"]) == len(short[0])  # default: the longest
    with pytest.raises(ValueError, match="shorter than the longest"):
        padded([short, long], tokenizer.pad_token_id, length=len(long[0]) - 1)
    with pytest.raises(ValueError, match="no examples"):
        padded([], tokenizer.pad_token_id)


def test_pack_labels_every_assistant_token_once(tokenizer):
    examples = [render(tokenizer, CHAT if i % 2 else TWO_TURNS) for i in range(7)]
    length = 100
    out = pack(examples, length=length, pad_id=tokenizer.pad_token_id)
    assert out["input_ids"].shape[1] == length
    total_labelled = sum(sum(lab != IGNORE for lab in labels) for _, labels in examples)
    assert int((out["labels"] != IGNORE).sum()) == total_labelled
    for i, (ids, labels) in enumerate(examples):
        where = out["example_ids"] == i
        assert int(where.sum()) == len(ids)  # every example appears whole, exactly once
        assert out["input_ids"][where].tolist() == ids
        assert out["labels"][where].tolist() == labels
        assert out["position_ids"][where].tolist() == list(range(len(ids)))
    pads = out["example_ids"] == -1
    assert out["attention_mask"][pads].eq(0).all() and out["attention_mask"][~pads].eq(1).all()
    assert out["labels"][pads].eq(IGNORE).all()
    # no label right after a boundary: each example starts with an unlabelled <|im_start|>
    starts = out["position_ids"] == 0
    assert out["labels"][starts & ~pads].eq(IGNORE).all()


def test_pack_rejects_an_example_longer_than_the_row(tokenizer):
    with pytest.raises(ValueError, match="longer than the pack length 5"):
        pack([render(tokenizer, CHAT)], length=5, pad_id=0)
    with pytest.raises(ValueError, match="no examples"):
        pack([], length=5, pad_id=0)


def test_load_sft_from_file_and_split(tokenizer, tmp_path):
    path = tmp_path / "chats.jsonl.gz"
    with gzip.open(path, "wt") as fh:
        for messages in (CHAT, TWO_TURNS):
            fh.write(json.dumps({"messages": messages}) + "\n")
    ds = load_sft(path, tokenizer)
    assert isinstance(ds, SFTDataset) and len(ds) == 2
    assert ds[0] == render(tokenizer, CHAT) and ds[1] == render(tokenizer, TWO_TURNS)
    val = load_sft("validation", tokenizer, max_examples=5)
    assert len(val) == 5 and all(any(lab != IGNORE for lab in labels) for _, labels in val)
    with pytest.raises(FileNotFoundError, match="neither a task split"):
        load_sft(tmp_path / "missing.jsonl", tokenizer)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "hello"}) + "\n")
    with pytest.raises(ValueError, match="'messages' column"):
        load_sft(bad, tokenizer)
