"""The shipped course model: loads through the real HF API, matches its card, writes text."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from lq_edu import COURSE_MODEL_DIR, count_parameters, generate, load_corpus, load_course_model, perplexity
from lq_edu.pretrain import PretrainConfig


def _card_value(label: str) -> float:
    card = (COURSE_MODEL_DIR / "README.md").read_text()
    match = re.search(rf"^\| {re.escape(label)} \| ([0-9.]+) \|$", card, flags=re.M)
    assert match, f"the model card has no row {label!r}"
    return float(match.group(1))


def test_loads_with_auto_classes_from_its_folder():
    model = AutoModelForCausalLM.from_pretrained(COURSE_MODEL_DIR, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(COURSE_MODEL_DIR, local_files_only=True)
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.vocab_size == len(tokenizer)
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "<|pad|>"


def test_files_are_safetensors_and_small_enough():
    files = {p.name for p in COURSE_MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files), "weights are safetensors only"
    assert (COURSE_MODEL_DIR / "model.safetensors").stat().st_size <= 25 * 2**20


def test_card_matches_the_training_recipe(course_model):
    model, _ = course_model
    record = json.loads((COURSE_MODEL_DIR / "training_log.json").read_text())
    cfg = PretrainConfig(**record["config"])
    assert model.config.hidden_size == cfg.hidden_size and model.config.num_hidden_layers == cfg.num_hidden_layers
    assert record["stats"]["parameters"] == count_parameters(model)
    losses = [row["loss"] for row in record["log"]]
    assert len(losses) == cfg.steps
    assert sum(losses[-50:]) / 50 < sum(losses[:50]) / 50 - 3, "training loss fell by at least 3 nats"


def test_validation_perplexity_matches_the_card(course_model):
    """Re-measure on the whole validation split; the card must not drift from the weights."""
    model, tokenizer = course_model
    record = json.loads((COURSE_MODEL_DIR / "training_log.json").read_text())
    ppl = perplexity(model, tokenizer, load_corpus("validation")["text"], context=record["config"]["context"], progress=False)
    card = _card_value("lq-course-llama")
    assert ppl == pytest.approx(card, rel=2e-3), f"measured {ppl:.3f}, the card says {card}"


def test_far_better_than_the_unigram_baseline():
    assert _card_value("lq-course-llama") < 0.2 * _card_value("unigram baseline (add-one smoothed)")


def test_greedy_generation_is_recognisable_text(course_model):
    """Most generated words are real words from the corpus, not byte soup."""
    model, tokenizer = course_model
    vocabulary = set(re.findall(r"[A-Za-z]+", " ".join(load_corpus("train")["text"][:150])))
    prompts = ["The json module", "To open a file, use", "A dictionary is"]
    for prompt in prompts:
        text = generate(model, tokenizer, prompt, max_new_tokens=30)
        continuation = text[len(prompt) :]
        words = re.findall(r"[A-Za-z]+", continuation)
        assert len(words) >= 5, f"too few words in {continuation!r}"
        known = sum(w in vocabulary for w in words) / len(words)
        assert known >= 0.8, f"only {known:.0%} known words in {continuation!r}"


def test_chat_template_marks_assistant_tokens():
    tokenizer = AutoTokenizer.from_pretrained(COURSE_MODEL_DIR, local_files_only=True)
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
    enc = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    marked = [t for t, m in zip(enc["input_ids"], enc["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(marked) == "4<|im_end|>"
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")


def test_forward_backward_shape(course_model):
    """The size the lessons are built around: 8 sequences of 256 tokens."""
    model, _ = course_model
    ids = torch.randint(0, model.config.vocab_size, (8, 256), generator=torch.Generator().manual_seed(0))
    model.train()
    try:
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        assert out.logits.shape == (8, 256, model.config.vocab_size)
        assert all(p.grad is not None for p in model.parameters())
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


# ---- broken folders -------------------------------------------------------------


def test_missing_folder_names_path_and_rebuild_command(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no model folder at .*nowhere.*python -m lq_edu.pretrain"):
        load_course_model(tmp_path / "nowhere")


def test_folder_missing_weights(tmp_path):
    shutil.copy(COURSE_MODEL_DIR / "config.json", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"lacks model.safetensors, tokenizer.json.*python -m lq_edu.pretrain"):
        load_course_model(tmp_path)


def _copy_model(tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(COURSE_MODEL_DIR, dst)
    return dst


def test_truncated_weights_are_refused(tmp_path):
    dst = _copy_model(tmp_path)
    weights = dst / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"model.safetensors is damaged.*python -m lq_edu.pretrain"):
        load_course_model(dst)


def test_garbage_weights_are_refused(tmp_path):
    dst = _copy_model(tmp_path)
    (dst / "model.safetensors").write_bytes(b"\x00" * 1000)
    with pytest.raises(ValueError, match="damaged"):
        load_course_model(dst)


def test_corrupt_config_is_refused(tmp_path):
    dst = _copy_model(tmp_path)
    (dst / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json is not valid JSON.*python -m lq_edu.pretrain"):
        load_course_model(dst)
