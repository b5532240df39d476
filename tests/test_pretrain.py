"""`python -m lq_edu.pretrain` end to end, at toy size."""

from __future__ import annotations

import json
import re

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from lq_edu.pretrain import PretrainConfig, lr_at, pretrain


def test_lr_schedule_warms_up_then_decays():
    cfg = PretrainConfig(steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_toy_pretrain_writes_a_loadable_model_with_a_card(tmp_path):
    cfg = PretrainConfig(
        vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, context=64, batch_size=2, steps=3, warmup=1,
    )
    stats = pretrain(cfg, tmp_path, progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert model.config.num_hidden_layers == 1 and len(tokenizer) == 512
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    record = json.loads((tmp_path / "training_log.json").read_text())
    assert [row["step"] for row in record["log"]] == [0, 1, 2]
    card = (tmp_path / "README.md").read_text()
    ppl = float(re.search(r"^\| lq-course-llama \| ([0-9.]+) \|$", card, flags=re.M).group(1))
    assert ppl == pytest.approx(stats["validation_perplexity"])
    assert stats["unigram_perplexity"] > 1
