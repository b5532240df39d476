"""Lesson 07's comparison: one run per (method, bits) and the retention targets of the issue, at ci size.

The grid runs once per session (a module fixture): 16-bit LoRA, then QLoRA (``zero``), ``lq`` and ``lq-data`` at
the bit widths the targets name, each with the ci profile's steps, the same data order and seed.
"""

from __future__ import annotations

import pytest

from lq_edu.finetune import (
    FinetuneResult,
    check_run,
    data_stats,
    finetune,
    memory_bytes,
    model_card,
    plot_retention,
    retention,
    retention_rows,
)
from lq_edu.models import load_course_model
from lq_edu.profiles import get_profile
from lq_edu.tasks import evaluate_task

RUNS = [("lora", None), ("lq", 4), ("zero", 3), ("lq", 3), ("lq-data", 3), ("zero", 2), ("lq", 2), ("lq-data", 2)]


def _fake(method, bits, accuracy, loss) -> FinetuneResult:
    return FinetuneResult(method, bits, accuracy, loss, 0.1, 1000, 100, 200, 1.0)


@pytest.mark.parametrize(
    "method, bits, message",
    [("qlora", 4, "not known"), ("lora", 4, "bits=None"), ("lq", None, "one of"), ("zero", 8, "one of")],
)
def test_bad_runs_are_refused(method, bits, message):
    with pytest.raises(ValueError, match=message):
        check_run(method, bits)
    with pytest.raises(ValueError, match=message):
        finetune(method, bits, steps=1)


def test_steps_must_be_positive():
    with pytest.raises(ValueError, match="at least 1"):
        finetune("lora", None, steps=0)


def test_retention_arithmetic_written_out():
    ref, run = _fake("lora", None, 0.60, 0.80), _fake("lq", 4, 0.57, 1.00)
    assert retention(run, ref) == pytest.approx({"accuracy": 0.95, "loss": 0.80})
    rows = retention_rows([run, _fake("zero", 2, 0.3, 2.0), ref])
    assert [r["run"] for r in rows] == ["16-bit LoRA", "LQ (lq) 4-bit", "QLoRA (zero) 2-bit"]
    assert rows[0]["accuracy retention"] == 1.0 and rows[2]["loss retention"] == pytest.approx(0.4)
    with pytest.raises(ValueError, match="16-bit LoRA"):
        retention_rows([run])
    with pytest.raises(ValueError, match="0 accuracy"):
        retention(run, _fake("lora", None, 0.0, 1.0))
    assert len(plot_retention([ref, run]).axes) == 2


def test_model_card_says_what_was_trained_and_how_to_load_it():
    ref, run = _fake("lora", None, 0.60, 0.80), _fake("lq", 3, 0.57, 1.00)
    run.settings = {"steps": 60, "r": 16, "alpha": 32, "lr": 2e-3, "batch_size": 16, "seed": 0,
                    "eval_split": "test", "eval_examples": 413}
    card = model_card(run, ref)
    assert card.startswith("---\nlibrary_name: peft\n")
    assert "3-bit NF3 base (start: `lq`)" in card and "60 AdamW steps" in card
    assert "| exact-match accuracy | 0.570 | 95.0% |" in card and "| held-out loss (nats/token) | 1.0000 | 80.0% |" in card
    assert "lq.load_adapter" in card and "use `lq_edu.load_adapter`" in card
    float_card = model_card(ref)  # no reference: no retention column, no quantized-base warning
    assert "retention" not in float_card and "lq_edu_base.safetensors" not in float_card


@pytest.fixture(scope="module")
def grid():
    model, tok = load_course_model()
    untuned = evaluate_task(model, tok, "test")["accuracy"]
    stats = data_stats(model, tok)
    del model
    steps = get_profile("ci").train_steps
    return untuned, {(m, b): finetune(m, b, steps=steps, stats=stats) for m, b in RUNS}


def test_lora_clearly_beats_the_untuned_model(grid):
    untuned, runs = grid
    assert runs["lora", None].accuracy - untuned >= 0.30


def test_lq_retention_targets(grid):
    _, runs = grid
    ref = runs["lora", None]
    four, three = retention(runs["lq", 4], ref), retention(runs["lq", 3], ref)
    assert four["accuracy"] >= 0.99 and four["loss"] >= 0.99, four
    assert three["accuracy"] >= 0.97 and three["loss"] >= 0.97, three


@pytest.mark.parametrize("bits", [3, 2])
def test_lq_is_at_least_as_good_as_qlora(grid, bits):
    _, runs = grid
    zero, best = runs["zero", bits], [runs["lq", bits], runs["lq-data", bits]]
    assert max(r.accuracy for r in best) >= zero.accuracy
    assert min(r.loss for r in best) <= zero.loss


def test_lq_starts_closer_to_the_float_weights(grid):
    _, runs = grid
    for bits in (3, 2):
        assert runs["lq", bits].initial_error < runs["zero", bits].initial_error
    assert runs["lora", None].initial_error == 0.0


def test_memory_accounting(grid):
    _, runs = grid
    ref = runs["lora", None]
    for (_, bits), r in runs.items():
        assert r.adapter_bytes == ref.adapter_bytes  # same rank, same layers
        assert r.optimizer_bytes == 2 * r.adapter_bytes
        if bits is not None:
            assert r.base_bytes < ref.base_bytes
    assert runs["lq", 2].base_bytes < runs["lq", 3].base_bytes < runs["lq", 4].base_bytes
    model, _ = load_course_model()
    frozen, trainable = memory_bytes(model)
    assert trainable == sum(p.numel() * 4 for p in model.parameters())  # nothing frozen yet
    assert frozen == 0
