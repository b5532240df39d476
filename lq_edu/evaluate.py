"""How good is a causal LM? Held-out perplexity and a short greedy generation.

Both work on any Hugging Face causal LM (the course model, a quantized copy of
it, or a hub model) and run on whatever device the model is on.

Perplexity is exp(mean negative log-likelihood per predicted token). Long text
is cut into windows of ``context`` tokens. By default they don't overlap
(fast; each window's first token goes unscored). With ``stride < context`` the
windows overlap and only the last ``stride`` tokens of each window are scored,
so every scored token sees at least ``context - stride`` tokens of history
(the sliding-window evaluation of the Hugging Face docs): slower, a little
lower, and closer to how the model is used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def token_stream(tokenizer, texts: str | Sequence[str]) -> torch.Tensor:
    """Texts as one 1-D id tensor, each text followed by EOS: how pretraining, evaluation and calibration see text."""
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts:
        raise ValueError("texts is empty; give at least one string to evaluate on")
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for enc in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]:
        ids.extend(enc)
        if eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def eval_windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows ``(begin, end, first)`` over ``n_tokens`` tokens for strided evaluation.

    Window ``[begin, end)`` is fed to the model; positions ``max(first, 1)`` and
    later inside it are scored. With ``stride < context`` every token but the
    very first is scored exactly once, with at least ``context - stride`` tokens
    of history (fewer only at the start of the text). With ``stride == context``
    the windows don't overlap and each window's first token, which has no
    history inside its window, is not scored.
    """
    if not 0 < stride <= context:
        raise ValueError(f"stride={stride} must be between 1 and context={context}")
    windows: list[tuple[int, int, int]] = []
    scored_to = 0  # tokens before this position are already scored (or are token 0)
    while scored_to < n_tokens:
        end = min(scored_to + stride, n_tokens) if windows else min(context, n_tokens)
        begin = max(0, end - context)
        windows.append((begin, end, scored_to - begin if windows else 0))
        scored_to = end
        if end >= n_tokens:
            break
    return windows


@torch.no_grad()
def perplexity(
    model,
    tokenizer,
    texts: str | Sequence[str],
    context: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    progress: bool = True,
) -> float:
    """Perplexity of ``model`` on ``texts`` (a string or a list of strings).

    context: window length in tokens (default: the model's max positions, at most 512).
    stride: tokens scored per window (default: ``context``, i.e. no overlap).
    max_tokens: evaluate only the first ``max_tokens`` tokens (for quick profiles).
    """
    from tqdm.auto import tqdm

    max_pos = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", 512)
    context = min(512, max_pos) if context is None else context
    stride = context if stride is None else stride
    if context < 2:
        raise ValueError(f"context={context} is too short; a window needs at least 2 tokens")
    if context > max_pos:
        raise ValueError(f"context={context} is longer than the model's {max_pos} positions; use context<={max_pos}")
    if not 0 < stride <= context:
        raise ValueError(f"stride={stride} must be between 1 and context={context}")
    ids = token_stream(tokenizer, texts)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError(f"only {len(ids)} token(s) to evaluate; give more text")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()

    windows = eval_windows(len(ids), context, stride)

    nll, count = 0.0, 0
    for i in tqdm(range(0, len(windows), batch_size), desc="perplexity", disable=not progress, leave=False):
        group = windows[i : i + batch_size]
        width = max(e - b for b, e, _ in group)
        batch = torch.full((len(group), width), 0, dtype=torch.long)
        labels = torch.full((len(group), width), -100, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, (b, e, first) in enumerate(group):
            batch[row, : e - b] = ids[b:e]
            mask[row, : e - b] = 1
            labels[row, max(first, 1) : e - b] = ids[b + max(first, 1) : e]
        logits = model(input_ids=batch.to(device), attention_mask=mask.to(device)).logits.float()  # (B, T, V)
        shift_logits = logits[:, :-1].reshape(-1, logits.size(-1))
        shift_labels = labels[:, 1:].reshape(-1).to(device)
        loss = torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
        nll += loss.item()
        count += int((shift_labels != -100).sum())
    if was_training:
        model.train()
    return math.exp(nll / count)


@torch.no_grad()
def generate(model, tokenizer, prompt: str, max_new_tokens: int = 40) -> str:
    """Greedy continuation of ``prompt``; returns prompt plus continuation as text."""
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
    device = next(model.parameters()).device
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(device)
    out = model.generate(
        **enc,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    return tokenizer.decode(out[0], skip_special_tokens=True)
