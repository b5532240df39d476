"""The fine-tuning task of lessons 06-07: short questions about standard-library signatures.

    python -m lq_edu.tasks build        # rewrites data/tasks/api-signatures/ (seeded, a few seconds)

Each record is one chat: a system line, a user question about a function
signature taken from the course corpus (the library pages of the Python 3.11
docs), and a one-word assistant answer::

    {"messages": [{"role": "system", ...}, {"role": "user", ...}, {"role": "assistant", "content": "json"}],
     "answer": "json", "kind": "module", "source": "python3.11-doc/library/json.rst"}

Three kinds of question, several phrasings each:

- ``module``: which module does ``json.dumps(obj, *, skipkeys=False)`` come from? -> ``json``
- ``name``: what is the callable called, without its module? -> ``dumps``
- ``first_param``: what is its first parameter? -> ``obj``

Why this task: the answer is short (exact match is fair), it is read off text
the course model was pretrained on, and it needs the chat format, which the
base model has never seen (so the untuned model scores near 0 and a LoRA run
of a few hundred steps can teach it). It is not the capstone's tool-use task.

Splits are disjoint by documentation page: a page (module) whose path hashes
into the test bucket gives only test questions, and likewise for validation,
so no test signature, and no test module name, appears in training.

Two metrics: :func:`heldout_loss` (mean cross-entropy on assistant tokens) and
:func:`evaluate_task` (greedy generation, then :func:`exact_match`).
"""

from __future__ import annotations

import argparse
import builtins
import gzip
import hashlib
import json
import random
import re
from pathlib import Path

import torch

from lq_edu.corpus import load_corpus
from lq_edu.paths import DATA_DIR

TASK_NAME = "api-signatures"
TASKS_DIR = DATA_DIR / "tasks"
TASK_DIR = TASKS_DIR / TASK_NAME
SPLITS = ("train", "validation", "test")
SIZES = {"train": 3000, "validation": 300, "test": 300}
SEED = 606
SYSTEM = "You answer questions about the Python standard library with a single name."

# One phrasing is drawn per question; {sig} is the qualified signature.
TEMPLATES = {
    "module": [
        "Which module does `{sig}` come from?",
        "Name the standard-library module that provides `{sig}`.",
        "`{sig}` is documented in which module?",
        "In the signature `{sig}`, what is the module?",
    ],
    "name": [
        "What is the name of the callable in `{sig}`, without its module?",
        "Give the bare function name in `{sig}`.",
        "`{sig}`: what is the function or class called?",
        "Strip the module from `{sig}`. What name is left?",
    ],
    "first_param": [
        "What is the first parameter of `{sig}`?",
        "Name the first argument that `{sig}` takes.",
        "`{sig}`: which parameter comes first?",
        "In `{sig}`, what is the first parameter called?",
    ],
}

_SIGNATURE = re.compile(r"^([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)\(([^()]*)\)$")
_MODULE = re.compile(r"^([a-z_][\w]*(?:\.[a-z_]\w*)*)\s+---")
_PARAM = re.compile(r"[\[\]]*(|/|\*|\*{0,2}[A-Za-z_]\w*(\s*=\s*[^,\[\]]+)?)[\[\]]*")  # a parameter, maybe with a default
_BUILTINS = set(dir(builtins))  # `print(...)` on a module page is an example call
_MAX_SIGNATURE_CHARS = 90  # keeps every chat well under 100 tokens


def _bucket(source: str) -> str:
    """Split of a documentation page, from a hash of its path (stable across rebuilds)."""
    b = hashlib.sha256(source.encode()).digest()[0] % 10
    return "test" if b == 0 else "validation" if b == 1 else "train"


def _first_param(params: str) -> str | None:
    """First named parameter of a signature's parameter text, or None."""
    for part in params.split(","):
        name = part.strip().lstrip("*").split("=")[0].strip().strip("[]").strip()
        if name in ("", "/", "self", "cls"):
            continue
        return name if re.fullmatch(r"[A-Za-z_]\w*", name) else None
    return None


def signatures(pages) -> list[dict]:
    """Signatures found on library pages: ``{"module", "name", "sig", "first_param", "source"}``.

    ``pages`` is an iterable of corpus records. The module is the page title's
    first word (``json --- JSON encoder and decoder`` -> ``json``); the
    signature is made qualified (``dumps(...)`` -> ``json.dumps(...)``).
    """
    items, seen = [], set()
    for page in pages:
        if "/library/" not in page["source"]:
            continue
        title = _MODULE.match(page["text"].lstrip().split("\n", 1)[0])
        if not title:
            continue
        module = title[1]
        for line in page["text"].splitlines():
            m = _SIGNATURE.match(line.strip())
            if not m:
                continue
            name, params = m[1], " ".join(m[2].split())
            head = name.split(".")[0]
            if "." in name and not (name.startswith(module + ".") or head[:1].isupper()):
                continue  # e.g. `writer.close()` in a code example: not this module's API
            if not all(_PARAM.fullmatch(p.strip()) for p in params.split(",")) or name in _BUILTINS:
                continue  # a call in an example (`print(f.reason)`), not a signature
            qualified = name if name.startswith(module + ".") else f"{module}.{name}"
            sig = f"{qualified}({params})"
            if len(sig) > _MAX_SIGNATURE_CHARS or sig in seen:
                continue
            seen.add(sig)
            items.append(
                {"module": module, "name": qualified.split(".")[-1], "sig": sig,
                 "first_param": _first_param(params), "source": page["source"]}
            )
    return items


def make_records(items: list[dict], n: int, rng: random.Random) -> list[dict]:
    """``n`` chat records drawn from ``items`` (question kind and phrasing chosen by ``rng``)."""
    if not items:
        raise ValueError("no signatures to make questions from; is the corpus in data/corpus/?")
    records, seen = [], set()
    for _ in range(50 * n):
        if len(records) == n:
            break
        item = rng.choice(items)
        kind = rng.choice(list(TEMPLATES))
        answer = item[kind] if kind != "module" else item["module"]
        if answer is None:
            continue
        question = rng.choice(TEMPLATES[kind]).format(sig=item["sig"])
        if question in seen:
            continue
        seen.add(question)
        messages = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
        records.append({"messages": messages, "answer": answer, "kind": kind, "source": item["source"]})
    if len(records) < n:
        raise ValueError(f"only {len(records)} distinct questions could be made, {n} were asked for")
    return records


def build_records(seed: int = SEED, sizes: dict[str, int] | None = None) -> dict[str, list[dict]]:
    """All splits as lists of records, built from the corpus with ``seed``."""
    sizes = SIZES if sizes is None else sizes
    pages = list(load_corpus("train")) + list(load_corpus("validation"))
    items = signatures(pages)
    by_split = {s: [it for it in items if _bucket(it["source"]) == s] for s in SPLITS}
    rng = random.Random(seed)
    return {s: make_records(by_split[s], sizes[s], rng) for s in SPLITS}


def write_jsonl_gz(records: list[dict], path: Path) -> None:
    """Gzipped JSON Lines with ``mtime=0``, so a rebuild is byte-identical."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as fh:
        for rec in records:
            fh.write((json.dumps(rec, ensure_ascii=False) + "\n").encode())


def build(out_dir: Path = TASK_DIR, seed: int = SEED) -> dict[str, int]:
    """Write ``{train,validation,test}.jsonl.gz`` to ``out_dir``; returns records per split."""
    records = build_records(seed)
    for split, recs in records.items():
        write_jsonl_gz(recs, Path(out_dir) / f"{split}.jsonl.gz")
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
    """One split of the task as a ``datasets.Dataset`` (columns: messages, answer, kind, source)."""
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


@torch.no_grad()
def evaluate_task(model, tokenizer, split="validation", max_examples: int | None = 200, max_new_tokens: int = 12):
    """Exact-match accuracy of greedy answers on ``split`` (a split name or a list of records).

    The prompt is every message before the last assistant turn, rendered with
    ``add_generation_prompt=True``; generation stops at ``<|im_end|>``.
    Returns ``{"accuracy": float, "n": int, "examples": [{"question", "answer", "prediction", "correct"}]}``.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    stop = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id]
    examples = []
    for rec in _examples(split, max_examples):
        prompt = [m for m in rec["messages"] if m["role"] != "assistant"]
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
        input_ids = torch.tensor([ids["input_ids"]], device=device)
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stop,
            pad_token_id=tokenizer.pad_token_id,
        )
        prediction = tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)
        examples.append(
            {"question": prompt[-1]["content"], "answer": rec["answer"], "prediction": prediction,
             "correct": exact_match(prediction, rec["answer"])}
        )
    if was_training:
        model.train()
    if not examples:
        raise ValueError("no examples to evaluate; give max_examples >= 1 and a non-empty split")
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
