"""Supervised fine-tuning data: chats to token ids, with the loss on assistant tokens only.

A chat (a list of ``{"role", "content"}`` messages) is rendered with the
tokenizer's own chat template. The template marks assistant text with
``{% generation %}``, so ``apply_chat_template(..., return_assistant_tokens_mask=True)``
tells us which tokens the model wrote. Those (each assistant reply plus its
``<|im_end|>``) keep their id as label; every other label is -100, which
``cross_entropy`` ignores. Why: we teach the model to answer, not to predict
the questions.

Two ways to batch examples of different lengths:

- padding (:func:`collate`): right-pad to the longest example; pads get
  ``attention_mask`` 0 and label -100.
- packing (:func:`pack`): concatenate whole examples into rows of a fixed
  length. Each row also gets ``position_ids`` that restart at 0 at every
  example, so rotary positions match an unpacked example. What packing leaves
  out: with the default (eager/SDPA) attention the causal mask still lets a
  token attend to earlier examples in the same row; only FlashAttention-2 turns
  restarting ``position_ids`` into a per-example mask. No label crosses a
  boundary (the first token of each example, ``<|im_start|>``, is never
  labelled), so the loss counts every assistant token exactly once.
"""

from __future__ import annotations

from pathlib import Path

import torch

IGNORE = -100
ROLES = ("system", "user", "assistant")


def _check_messages(messages) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"messages must be a non-empty list of {{'role', 'content'}} dicts, got {messages!r}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} is {m!r}; each message needs a role in {ROLES} and a string content")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("messages have no assistant turn, so nothing would be trained; add an assistant message")


def render(tokenizer, messages, max_length: int | None = None) -> tuple[list[int], list[int]]:
    """Token ids and labels of one chat: ``labels[t]`` is ``input_ids[t]`` on assistant tokens, else -100.

    max_length: the longest allowed chat in tokens (default: ``tokenizer.model_max_length``,
    512 for the course model). A longer chat raises ``ValueError``; it is never cut silently.
    """
    _check_messages(messages)
    out = tokenizer.apply_chat_template(
        list(messages), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    input_ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    if not any(mask):
        raise ValueError("the chat template marked no assistant tokens; it needs {% generation %} marks")
    max_length = tokenizer.model_max_length if max_length is None else max_length
    if len(input_ids) > max_length:
        raise ValueError(
            f"chat is {len(input_ids)} tokens, longer than max_length={max_length}; shorten it or drop it"
        )
    labels = [tok if keep else IGNORE for tok, keep in zip(input_ids, mask, strict=True)]
    return input_ids, labels


class SFTDataset(torch.utils.data.Dataset):
    """Rendered chats: item ``i`` is ``(input_ids, labels)``, two lists of equal length."""

    def __init__(self, examples: list[tuple[list[int], list[int]]]):
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> tuple[list[int], list[int]]:
        return self.examples[i]


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: ``input_ids``, ``attention_mask`` (0 on pads), ``labels`` (-100 on pads), all (B, T)."""
    if not batch:
        raise ValueError("batch is empty; give at least one (input_ids, labels) pair")
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    for row, (ids, labs) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        labels[row, : len(ids)] = torch.tensor(labs)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def padded(examples: list[tuple[list[int], list[int]]], pad_id: int, length: int | None = None) -> list[dict]:
    """Each example as a dict of 1-D tensors right-padded to ``length`` (default: the longest example).

    What :func:`lq_edu.trainer.train` takes: ``input_ids``, ``attention_mask`` (0 on pads) and ``labels``
    (-100 on pads), all of one length, so any subset stacks into a batch.
    """
    if not examples:
        raise ValueError("no examples to pad")
    longest = max(len(ids) for ids, _ in examples)
    length = longest if length is None else length
    if length < longest:
        raise ValueError(f"length={length} is shorter than the longest example ({longest} tokens); raise it or omit it")
    batch = collate(list(examples), pad_id)  # (N, longest)
    extra = length - longest
    if extra:
        batch = {
            "input_ids": torch.nn.functional.pad(batch["input_ids"], (0, extra), value=pad_id),
            "attention_mask": torch.nn.functional.pad(batch["attention_mask"], (0, extra), value=0),
            "labels": torch.nn.functional.pad(batch["labels"], (0, extra), value=IGNORE),
        }
    return [{k: v[i] for k, v in batch.items()} for i in range(len(examples))]


def pack(examples: list[tuple[list[int], list[int]]], length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Pack whole examples, in order, into rows of ``length`` tokens (a new row when the next one won't fit).

    Returns ``input_ids``, ``attention_mask`` (0 only on the tail pads), ``labels``
    (-100 on pads), ``position_ids`` (restart at 0 per example) and ``example_ids``
    (index of the example each token came from, -1 on pads); all (rows, length).
    """
    rows: list[list[int]] = []  # example indices per row
    used = length
    for i, (ids, _) in enumerate(examples):
        if len(ids) > length:
            raise ValueError(f"example {i} is {len(ids)} tokens, longer than the pack length {length}")
        if used + len(ids) > length:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += len(ids)
    if not rows:
        raise ValueError("no examples to pack")
    shape = (len(rows), length)
    out = {
        "input_ids": torch.full(shape, pad_id, dtype=torch.long),
        "attention_mask": torch.zeros(shape, dtype=torch.long),
        "labels": torch.full(shape, IGNORE, dtype=torch.long),
        "position_ids": torch.zeros(shape, dtype=torch.long),
        "example_ids": torch.full(shape, -1, dtype=torch.long),
    }
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            ids, labs = examples[i]
            n = len(ids)
            out["input_ids"][r, at : at + n] = torch.tensor(ids)
            out["labels"][r, at : at + n] = torch.tensor(labs)
            out["attention_mask"][r, at : at + n] = 1
            out["position_ids"][r, at : at + n] = torch.arange(n)
            out["example_ids"][r, at : at + n] = i
            at += n
    return out


def load_sft(path_or_split: str | Path, tokenizer, max_length: int | None = None, max_examples: int | None = None):
    """Load chats through ``datasets`` and render them into an :class:`SFTDataset`.

    ``path_or_split`` is a task split name (``"train"``, ``"validation"``, ``"test"``
    of :mod:`lq_edu.tasks`) or a path to a ``.jsonl``/``.jsonl.gz`` file whose
    records have a ``messages`` column.
    """
    from datasets import load_dataset

    from lq_edu.tasks import SPLITS, load_task

    if isinstance(path_or_split, str) and path_or_split in SPLITS:
        ds = load_task(path_or_split)
    else:
        path = Path(path_or_split)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is neither a task split {SPLITS} nor an existing JSONL file")
        ds = load_dataset("json", data_files={"train": str(path)}, split="train")
    if "messages" not in ds.column_names:
        raise ValueError(f"{path_or_split} has columns {ds.column_names}; SFT data needs a 'messages' column")
    if max_examples is not None:
        ds = ds.select(range(min(max_examples, len(ds))))
    return SFTDataset([render(tokenizer, rec["messages"], max_length) for rec in ds])
