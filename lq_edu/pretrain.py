"""Train the course base model from the shipped corpus: tokenizer, then model.

    python -m lq_edu.pretrain              # the committed model (about 40 min, 2 cores)
    python -m lq_edu.pretrain --steps 50 --out /tmp/tiny   # a quick smoke run

Why the kit trains its own model: quantization is only interesting on trained
weights (they have outliers and layers that matter more than others), and no
model hub is reachable from a classroom or CI box. The model is a plain
``LlamaForCausalLM`` with a byte-level BPE tokenizer, so every Hugging Face
tool (and PEFT) works on it exactly as on a hub model.

Recipe: next-token prediction on 512-token windows cut from the concatenated
training pages (documents joined by ``<|endoftext|>``), AdamW, linear warmup
then cosine decay, fixed seed. The output folder gets ``config.json``,
``model.safetensors``, the tokenizer files, ``training_log.json`` and a model
card (``README.md``) with held-out perplexity next to a unigram baseline.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lq_edu.corpus import load_corpus
from lq_edu.evaluate import token_stream
from lq_edu.paths import COURSE_MODEL_DIR

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]

# ChatML-style template. {% generation %} marks assistant text so that
# `apply_chat_template(..., return_assistant_tokens_mask=True)` can find it.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{ message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{ '\\n' }}"
    "{%- else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass
class PretrainConfig:
    """Everything that decides the result; written into the model card."""

    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 576
    num_hidden_layers: int = 6
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    context: int = 512
    batch_size: int = 8  # sequences of `context` tokens per step
    steps: int = 2000
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 1234


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE on the training pages; returns a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        unk_token=None,
        model_max_length=512,
        chat_template=CHAT_TEMPLATE,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )


def unigram_perplexity(train_ids: torch.Tensor, valid_ids: torch.Tensor, vocab_size: int) -> float:
    """Perplexity of the best context-free model: add-one smoothed token counts."""
    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1.0
    logp = (counts / counts.sum()).log()
    return math.exp(-logp[valid_ids].mean().item())


def lr_at(step: int, cfg: PretrainConfig) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio * lr``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def pretrain(cfg: PretrainConfig, out_dir: Path = COURSE_MODEL_DIR, progress: bool = True) -> dict:
    """Build tokenizer and model from the corpus and save them to ``out_dir``."""
    from tqdm.auto import tqdm
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    t0 = time.time()
    train_texts = list(load_corpus("train")["text"])
    valid_texts = list(load_corpus("validation")["text"])
    tokenizer = train_tokenizer(train_texts, cfg.vocab_size)
    train_ids = token_stream(tokenizer, train_texts)
    valid_ids = token_stream(tokenizer, valid_texts)

    model_cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.context,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(model_cfg)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    # Random windows from the token stream; a seeded generator makes the order reproducible.
    gen = torch.Generator().manual_seed(cfg.seed)
    n_windows = len(train_ids) - cfg.context - 1
    log: list[dict] = []
    bar = tqdm(range(cfg.steps), desc="pretrain", disable=not progress)
    for step in bar:
        starts = torch.randint(0, n_windows, (cfg.batch_size,), generator=gen)
        batch = torch.stack([train_ids[s : s + cfg.context] for s in starts.tolist()])  # (B, T)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        log.append({"step": step, "loss": round(loss.item(), 5), "lr": group["lr"]})
        bar.set_postfix(loss=f"{loss.item():.3f}")

    model.eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    stats = {
        "train_tokens": len(train_ids),
        "validation_tokens": len(valid_ids),
        "tokens_seen": cfg.steps * cfg.batch_size * cfg.context,
        "parameters": sum(p.numel() for p in model.parameters()),
        "final_train_loss": log[-1]["loss"],
        "minutes": round((time.time() - t0) / 60, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    (out_dir / "training_log.json").write_text(
        json.dumps({"config": asdict(cfg), "stats": stats, "log": log}, indent=1) + "\n"
    )
    return write_card(out_dir, progress=progress)


def write_card(out_dir: Path = COURSE_MODEL_DIR, progress: bool = True) -> dict:
    """Measure the saved model on the validation split and (re)write its model card.

    Reads the recipe from ``training_log.json``; run it alone with
    ``python -m lq_edu.pretrain --card-only`` after changing evaluation code.
    """
    from lq_edu.evaluate import perplexity
    from lq_edu.models import load_course_model

    out_dir = Path(out_dir)
    record = json.loads((out_dir / "training_log.json").read_text())
    cfg = PretrainConfig(**record["config"])
    model, tokenizer = load_course_model(out_dir)
    train_ids = token_stream(tokenizer, list(load_corpus("train")["text"]))
    valid_texts = list(load_corpus("validation")["text"])
    valid_ids = token_stream(tokenizer, valid_texts)
    stats = dict(record["stats"])
    stats["validation_perplexity"] = round(perplexity(model, tokenizer, valid_texts, context=cfg.context, progress=progress), 3)
    stats["unigram_perplexity"] = round(unigram_perplexity(train_ids, valid_ids, len(tokenizer)), 3)
    record["stats"] = stats
    (out_dir / "training_log.json").write_text(json.dumps(record, indent=1) + "\n")
    (out_dir / "README.md").write_text(model_card(cfg, stats, _sample(model, tokenizer)))
    return stats


def _sample(model, tokenizer, prompt: str = "The json module") -> str:
    from lq_edu.evaluate import generate

    return generate(model, tokenizer, prompt, max_new_tokens=40)


def model_card(cfg: PretrainConfig, stats: dict, sample: str) -> str:
    """The model card: what it is, what it saw, how it was trained, how good it is."""
    return f"""---
license: psf-2.0
library_name: transformers
pipeline_tag: text-generation
tags: [llama, lq-edu, course-model]
---

# lq-course-llama

The lq-edu course base model: a small `LlamaForCausalLM` trained from scratch
on the Python 3.11 documentation, so that every lesson has real trained
weights to quantize, calibrate and fine-tune without a model hub.

| | |
|---|---|
| parameters | {stats['parameters']:,} ({stats['parameters'] * 4 / 2**20:.1f} MiB in fp32) |
| layers / hidden / MLP | {cfg.num_hidden_layers} / {cfg.hidden_size} / {cfg.intermediate_size} |
| attention heads (key-value heads) | {cfg.num_attention_heads} ({cfg.num_key_value_heads}) |
| context | {cfg.context} tokens |
| tokenizer | byte-level BPE, {cfg.vocab_size} tokens, ChatML-style chat template |

## Data

`data/corpus/` (Python 3.11 documentation from Debian's `python3.11-doc`,
PSF licence): {stats['train_tokens']:,} training tokens and
{stats['validation_tokens']:,} held-out validation tokens (whole pages held out).

## Training recipe

`python -m lq_edu.pretrain` (seed {cfg.seed}): {cfg.steps} steps of
{cfg.batch_size} x {cfg.context} tokens ({stats['tokens_seen']:,} tokens seen), AdamW
(betas 0.9/0.95, weight decay {cfg.weight_decay}), peak learning rate {cfg.lr},
{cfg.warmup} warmup steps then cosine decay to {cfg.min_lr_ratio:g} x peak, gradient
clipping at {cfg.grad_clip}, fp32 on CPU ({stats['threads']} threads, torch {stats['torch']}).
It took {stats['minutes']} minutes. Final training loss: {stats['final_train_loss']:.3f}.
The full loss curve is in `training_log.json`.

## Evaluation (held-out validation split)

| model | perplexity |
|---|---|
| lq-course-llama | {stats['validation_perplexity']:.3f} |
| unigram baseline (add-one smoothed) | {stats['unigram_perplexity']:.3f} |

Perplexity is measured by `lq_edu.evaluate.perplexity` over non-overlapping
{cfg.context}-token windows of the validation pages; `tests/test_course_model.py`
re-measures it and checks it against this table.

## Sample (greedy)

```
{sample}
```

## Limits

A teaching model: it writes Python-documentation-flavoured English, knows no
facts beyond its 8 MB corpus, and is not meant for any use outside the course.
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lq_edu.pretrain", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=COURSE_MODEL_DIR, help="output folder")
    parser.add_argument("--steps", type=int, default=PretrainConfig.steps)
    parser.add_argument("--seed", type=int, default=PretrainConfig.seed)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (results depend on it slightly)")
    parser.add_argument("--card-only", action="store_true", help="re-measure the saved model and rewrite its card")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.card_only:
        print(json.dumps(write_card(args.out), indent=1))
        return
    if args.steps <= 0:
        parser.error(f"--steps={args.steps}: give a positive number of steps")
    stats = pretrain(PretrainConfig(steps=args.steps, seed=args.seed), args.out)
    print(json.dumps(stats, indent=1))


if __name__ == "__main__":
    main()
