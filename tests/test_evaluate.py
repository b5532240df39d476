"""Perplexity windows and the evaluation helpers, on a tiny random Llama."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from lq_edu import COURSE_MODEL_DIR
from lq_edu.evaluate import eval_windows, generate, perplexity


@pytest.fixture(scope="module")
def tiny():
    tokenizer = AutoTokenizer.from_pretrained(COURSE_MODEL_DIR, local_files_only=True)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(cfg).eval(), tokenizer


@given(n=st.integers(1, 300), context=st.integers(2, 64), data=st.data())
@settings(max_examples=200, deadline=None)
def test_windows_score_each_token_once(n, context, data):
    stride = data.draw(st.integers(1, context))
    windows = eval_windows(n, context, stride)
    scored = [b + k for b, e, first in windows for k in range(max(first, 1), e - b)]
    assert len(scored) == len(set(scored)), "a token is scored twice"
    assert all(e - b <= context for b, e, _ in windows)
    if stride < context:
        assert sorted(scored) == list(range(1, n))
        # each scored token has at least context - stride tokens of history (or all it can have)
        for b, e, first in windows:
            for k in range(max(first, 1), e - b):
                assert k >= min(context - stride, b + k)
    else:
        starts = {b for b, _, _ in windows}
        assert set(range(1, n)) - set(scored) <= starts


def test_single_window_equals_hf_loss(tiny):
    model, tokenizer = tiny
    text = "The json module encodes and decodes JSON."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert perplexity(model, tokenizer, text, progress=False) == pytest.approx(math.exp(loss), rel=1e-5)


def test_strided_equals_manual_sum(tiny):
    """Overlapping windows, batched and padded, equal a one-window-at-a-time computation."""
    model, tokenizer = tiny
    text = " ".join(["Lists are mutable sequences, typically used to store collections."] * 12)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    context, stride = 48, 16
    nll, count = 0.0, 0
    with torch.no_grad():
        for b, e, first in eval_windows(len(ids), context, stride):
            logp = model(input_ids=torch.tensor([ids[b:e]])).logits[0].log_softmax(-1)
            for k in range(max(first, 1), e - b):
                nll -= logp[k - 1, ids[b + k]].item()
                count += 1
    want = math.exp(nll / count)
    got = perplexity(model, tokenizer, text, context=context, stride=stride, batch_size=3, progress=False)
    assert got == pytest.approx(want, rel=1e-4)


def test_bad_arguments(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="longer than the model's 64 positions"):
        perplexity(model, tokenizer, "hello", context=128)
    with pytest.raises(ValueError, match="stride=0"):
        perplexity(model, tokenizer, "hello", context=32, stride=0)
    with pytest.raises(ValueError, match="texts is empty"):
        perplexity(model, tokenizer, [])
    with pytest.raises(ValueError, match="non-empty string"):
        generate(model, tokenizer, "")


def test_generate_returns_prompt_plus_new_text(tiny):
    model, tokenizer = tiny
    text = generate(model, tokenizer, "The json module", max_new_tokens=5)
    assert text.startswith("The json module") and len(text) > len("The json module")
