"""The fine-tuning task of lessons 06-07: which module's documentation is this sentence from?

    python -m lq_edu.tasks build        # rewrites data/tasks/which-module/ (seeded, a few seconds)

Each record is one chat: a system line that lists ten standard-library modules,
a user turn that is one sentence from the library pages of the Python 3.11 docs
(the course corpus), and a one-word assistant answer, the module::

    {"messages": [{"role": "system", ...},
                  {"role": "user", "content": "Return a new Decimal instance whose value is ..."},
                  {"role": "assistant", "content": "decimal"}],
     "answer": "decimal", "source": "python3.11-doc/library/decimal.rst"}

Why this task:

- The answer comes from a fixed set of ten labels, so exact match is fair and
  a guess has a known floor (:func:`majority_baseline`).
- It is meant to lean on what the base model learned: every sentence is from a
  page the course model read during pretraining (the ten modules' pages are all
  in the corpus's train split). The adapter teaches the chat format and the
  labels; the base's reading of the sentence does the rest. How much that
  survives quantization is what lesson 07 measures. Measured: in a short run
  (60 steps) a 2-bit QLoRA base loses about 10%; by 300 steps rank-16 adapters
  (7% of this small model) recover even a 2-bit base, so the task is easier for
  the course model than for a large one with the same rank.
- The untuned model has never seen the chat format and answers with prose, so
  it scores 0 and a few hundred LoRA steps make a clear difference.
- It is not the capstone's tool-use task.

Splits are by sentence: a sentence (deduplicated across the whole corpus) goes
to test, validation or train by a hash of its text, so no test sentence is
trained on. Every label appears in every split.

Two metrics: :func:`heldout_loss` (mean cross-entropy on assistant tokens) and
:func:`evaluate_task` (greedy generation, then :func:`exact_match`).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import re
from collections import Counter
from pathlib import Path

import torch

from lq_edu.corpus import load_corpus
from lq_edu.paths import DATA_DIR

TASK_NAME = "which-module"
TASKS_DIR = DATA_DIR / "tasks"
TASK_DIR = TASKS_DIR / TASK_NAME
SPLITS = ("train", "validation", "test")
SEED = 606
# The ten modules with the most usable sentences on pages the course model was pretrained on.
LABELS = ("argparse", "ctypes", "datetime", "decimal", "logging", "pickle", "threading", "tkinter", "unittest", "xml")
SYSTEM = (
    "You say which standard-library module's documentation a sentence comes from. "
    f"Answer with one of: {', '.join(LABELS)}."
)
MIN_CHARS, MAX_CHARS = 40, 200  # a sentence long enough to carry a clue, short enough to keep chats < 100 tokens
TEST_SHARE, VALIDATION_SHARE = 5, 2  # out of 20 hash buckets: 25% test, 10% validation, 65% train

_TITLE = re.compile(r"^([a-z_][\w]*(?:\.[a-z_]\w*)*)\s+---")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_BOILERPLATE = ("Changed in version", "New in version", "Deprecated since", "Source code:", "See also")


def page_module(page: dict) -> str | None:
    """Top-level module of a library page, from its title (``xml.etree.ElementTree --- ...`` -> ``xml``)."""
    if "/library/" not in page["source"]:
        return None
    title = _TITLE.match(page["text"].lstrip().split("\n", 1)[0])
    return title[1].split(".")[0] if title else None


def sentences(text: str) -> list[str]:
    """Prose sentences of a page: no code, no doctest, no version notes; MIN_CHARS..MAX_CHARS long."""
    found = []
    for para in re.split(r"\n\s*\n", text):
        lines = para.splitlines()
        if not lines or lines[0][:1] in (" ", "\t") or ">>>" in para:
            continue  # an indented block is code or a signature body; a doctest is code
        for s in _SENTENCE_END.split(" ".join(para.split())):
            if MIN_CHARS <= len(s) <= MAX_CHARS and s.endswith(".") and not s.startswith(_BOILERPLATE):
                found.append(s)
    return found


def _bucket(sentence: str) -> str:
    """Split of a sentence, from a hash of its text (stable across rebuilds and machines)."""
    b = hashlib.sha256(sentence.encode()).digest()[0] % 20
    return "test" if b < TEST_SHARE else "validation" if b < TEST_SHARE + VALIDATION_SHARE else "train"


def labelled_sentences(pages, labels: tuple[str, ...] = LABELS) -> list[dict]:
    """``{"sentence", "module", "source"}`` for every sentence on a page of one of ``labels``.

    A sentence that occurs on two pages (or twice) is kept once, under its first page.
    """
    items, seen = [], set()
    for page in pages:
        module = page_module(page)
        if module not in labels:
            continue
        for s in sentences(page["text"]):
            if s not in seen:
                seen.add(s)
                items.append({"sentence": s, "module": module, "source": page["source"]})
    return items


def make_record(item: dict) -> dict:
    """The chat record of one labelled sentence."""
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": item["sentence"]},
        {"role": "assistant", "content": item["module"]},
    ]
    return {"messages": messages, "answer": item["module"], "source": item["source"]}


def build_records(seed: int = SEED) -> dict[str, list[dict]]:
    """All splits as lists of records, built from the corpus; ``seed`` shuffles each split."""
    pages = list(load_corpus("train")) + list(load_corpus("validation"))
    items = labelled_sentences(pages)
    if not items:
        raise ValueError("no labelled sentences found; is the corpus in data/corpus/? (git checkout -- data/corpus)")
    rng = random.Random(seed)
    records = {}
    for split in SPLITS:
        recs = [make_record(it) for it in items if _bucket(it["sentence"]) == split]
        rng.shuffle(recs)
        records[split] = recs
    return records


def write_jsonl_gz(records: list[dict], path: Path) -> None:
    """Gzipped JSON Lines with ``mtime=0``, so a rebuild is byte-identical."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as fh:
        for rec in records:
            fh.write((json.dumps(rec, ensure_ascii=False) + "\n").encode())


def _readme(records: dict[str, list[dict]]) -> str:
    counts = {s: Counter(r["answer"] for r in recs) for s, recs in records.items()}
    rows = "\n".join(
        f"| {label} | {counts['train'][label]} | {counts['validation'][label]} | {counts['test'][label]} |"
        for label in LABELS
    )
    totals = " | ".join(str(len(records[s])) for s in SPLITS)
    return f"""# {TASK_NAME}: the fine-tuning task of lessons 06-07

Which standard-library module's documentation is this sentence from? One
sentence from the Python 3.11 library docs in, one of ten module names out.
Built from the course corpus (`data/corpus/`) by

    python -m lq_edu.tasks build          # seed {SEED}; byte-identical on every rebuild (this file too)

| label | train | validation | test |
|---|---:|---:|---:|
{rows}
| **total** | {totals} |

Record: `{{"messages": [system, user, assistant], "answer": str, "source": str}}`.
The system line lists the ten labels; the user turn is the sentence; the answer is the label.

Sentences are prose only (no code, doctests or version notes), {MIN_CHARS}-{MAX_CHARS} characters,
deduplicated across pages. Each goes to one split by a hash of its text
({TEST_SHARE * 5}% test, {VALIDATION_SHARE * 5}% validation, the rest train). All ten modules' pages are in
the corpus's train split, so the course model read every sentence during pretraining; the
task asks it to recall where.

Measured with the course model (seed 0, test split): untuned 0%, always the majority label
14.5%, LoRA r=16 57.6% after 60 steps and 76.0% after 300 (lessons 06-07).

Metrics (`lq_edu.tasks`): `heldout_loss` (mean cross-entropy on assistant tokens),
`evaluate_task` (greedy answer, then `exact_match`: first non-empty line, surrounding
backticks/quotes and a trailing full stop removed, lowercased) and `majority_baseline`
(always answering the most common training label).

Licence: derived from the Python documentation, PSF licence; see
`data/corpus/LICENSE-PSF.txt`.
"""


def build(out_dir: Path = TASK_DIR, seed: int = SEED) -> dict[str, int]:
    """Write ``{train,validation,test}.jsonl.gz`` and README.md to ``out_dir``; returns records per split."""
    records = build_records(seed)
    for split, recs in records.items():
        write_jsonl_gz(recs, Path(out_dir) / f"{split}.jsonl.gz")
    (Path(out_dir) / "README.md").write_text(_readme(records))
    return {s: len(r) for s, r in records.items()}


def task_files(task_dir: Path = TASK_DIR) -> dict[str, str]:
    """The ``data_files`` mapping for ``datasets.load_dataset("json", ...)``."""
    files = {s: Path(task_dir) / f"{s}.jsonl.gz" for s in SPLITS}
    for split, path in files.items():
        if not path.is_file():
            raise FileNotFoundError(
                f"task split {split!r} is missing at {path}; restore it with `git checkout -- data/tasks` "
                "or rebuild it with `python -m lq_edu.tasks build`"
            )
    return {s: str(p) for s, p in files.items()}


def load_task(split: str = "train", task_dir: Path = TASK_DIR):
    """One split of the task as a ``datasets.Dataset`` (columns: messages, answer, source)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not a task split; use one of {SPLITS}")
    from datasets import load_dataset

    return load_dataset("json", data_files={split: task_files(task_dir)[split]}, split=split)


def normalize(text: str) -> str:
    """The normalisation behind :func:`exact_match`.

    Keep the first non-empty line, strip spaces, then surrounding backticks and
    quotes, then a trailing full stop, and lowercase. So ```` `json`. ```` and
    ``JSON`` both become ``json``; ``json.dumps`` stays ``json.dumps``.
    """
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    first = lines[0] if lines else ""
    first = first.strip().strip("`'\"").strip()
    first = first.removesuffix(".").strip().strip("`'\"").strip()
    return first.lower()


def exact_match(prediction: str, answer: str) -> bool:
    """True when ``prediction`` equals ``answer`` after :func:`normalize` (an empty answer never matches)."""
    gold = normalize(answer)
    return bool(gold) and normalize(prediction) == gold


def _examples(split_or_records, max_examples: int | None) -> list[dict]:
    records = load_task(split_or_records) if isinstance(split_or_records, str) else split_or_records
    records = list(records)
    return records if max_examples is None else records[:max_examples]


def majority_baseline(split="test", train="train") -> float:
    """Accuracy of always answering the most common label of ``train`` on ``split``: the floor to beat."""
    top, _ = Counter(r["answer"] for r in _examples(train, None)).most_common(1)[0]
    answers = [r["answer"] for r in _examples(split, None)]
    if not answers:
        raise ValueError("no examples to score; give a non-empty split")
    return sum(a == top for a in answers) / len(answers)


@torch.no_grad()
def evaluate_task(
    model, tokenizer, split="validation", max_examples: int | None = None, max_new_tokens: int = 6, batch_size: int = 32
) -> dict:
    """Exact-match accuracy of greedy answers on ``split`` (a split name or a list of records).

    The prompt is every message before the last assistant turn, rendered with
    ``add_generation_prompt=True``; prompts are left-padded into batches of
    ``batch_size`` and generation stops at ``<|im_end|>``.
    Returns ``{"accuracy": float, "n": int, "examples": [{"question", "answer", "prediction", "correct"}]}``.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    stop = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id]
    records = _examples(split, max_examples)
    if not records:
        raise ValueError("no examples to evaluate; give max_examples >= 1 and a non-empty split")
    examples = []
    for i in range(0, len(records), batch_size):
        chunk = records[i : i + batch_size]
        prompts = [[m for m in rec["messages"] if m["role"] != "assistant"] for rec in chunk]
        ids = [
            tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
            for p in prompts
        ]
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, x in enumerate(ids):  # left padding: every prompt ends where generation starts
            input_ids[row, width - len(x) :] = torch.tensor(x)
            attention_mask[row, width - len(x) :] = 1
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stop,
            pad_token_id=tokenizer.pad_token_id,
        )
        for rec, prompt, row in zip(chunk, prompts, out[:, width:], strict=True):
            prediction = tokenizer.decode(row, skip_special_tokens=True)
            examples.append(
                {"question": prompt[-1]["content"], "answer": rec["answer"], "prediction": prediction,
                 "correct": exact_match(prediction, rec["answer"])}
            )
    if was_training:
        model.train()
    accuracy = sum(e["correct"] for e in examples) / len(examples)
    return {"accuracy": accuracy, "n": len(examples), "examples": examples}


@torch.no_grad()
def heldout_loss(model, tokenizer, split="validation", max_examples: int | None = None, batch_size: int = 16) -> float:
    """Mean cross-entropy (nats per token) on assistant tokens only, over ``split``."""
    from lq_edu.sft import collate, render

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rendered = [render(tokenizer, rec["messages"]) for rec in _examples(split, max_examples)]
    if not rendered:
        raise ValueError("no examples to score; give max_examples >= 1 and a non-empty split")
    total, count = 0.0, 0
    for i in range(0, len(rendered), batch_size):
        batch = collate(rendered[i : i + batch_size], pad_id=tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        labels = batch["labels"][:, 1:].to(device)  # token t is predicted from position t-1
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total += loss.item()
        count += int((labels != -100).sum())
    if was_training:
        model.train()
    return total / count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lq_edu.tasks", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help=f"rebuild data/tasks/{TASK_NAME} from the corpus")
    b.add_argument("--out", type=Path, default=TASK_DIR)
    b.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    for split, n in build(args.out, args.seed).items():
        print(f"{split:>10}: {n} records")


if __name__ == "__main__":
    main()
