"""Calibration: train-only seeded data, exact running statistics, sequential GPTQ on a whole model, and the target."""

from __future__ import annotations

import copy
import weakref

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import lq_edu.calibration as calibration
from lq_edu.calibration import (
    ActivationStats,
    calibrate_model,
    calibration_data,
    collect_stats,
    train_token_stream,
)
from lq_edu.corpus import load_corpus
from lq_edu.evaluate import perplexity
from lq_edu.quant_linear import QuantLinear
from lq_edu.surgery import linear_names, quantize_model


def _tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=1,
        eos_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def _ids(n: int = 6, t: int = 24, vocab: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------------------
# Calibration data
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def course_tokenizer(course_model):
    return course_model[1]


def test_calibration_data_is_seeded_and_shaped(course_model):
    model, tokenizer = course_model
    a = calibration_data(tokenizer, n_samples=6, seq_len=32, seed=3, model=model)
    assert a.shape == (6, 32) and a.dtype == torch.long
    assert torch.equal(a, calibration_data(tokenizer, n_samples=6, seq_len=32, seed=3))
    assert not torch.equal(a, calibration_data(tokenizer, n_samples=6, seq_len=32, seed=4))
    assert int(a.max()) < model.config.vocab_size


def test_calibration_windows_come_from_the_train_split_only(course_tokenizer, monkeypatch):
    """Every window is a run of consecutive tokens of the train stream, and only the train split is ever read."""
    read = []
    real_load = calibration.load_corpus
    monkeypatch.setattr(calibration, "load_corpus", lambda split: read.append(split) or real_load(split))
    monkeypatch.setattr(calibration, "_STREAMS", weakref.WeakKeyDictionary())  # no cached stream: really tokenize
    windows = calibration_data(course_tokenizer, n_samples=8, seq_len=48, seed=0)
    assert read == ["train"]
    stream = train_token_stream(course_tokenizer).numpy().astype(np.int16)  # vocabulary 4096 fits in int16
    haystack = stream.tobytes()
    for window in windows.numpy().astype(np.int16):
        needle, at = window.tobytes(), -1
        while True:  # find an occurrence that starts on a token boundary (an even byte offset)
            at = haystack.find(needle, at + 1)
            if at < 0 or at % 2 == 0:
                break
        assert at >= 0, "a calibration window is not a substring of the train token stream"
    # and the train stream is not the validation text
    validation = list(load_corpus("validation")["text"])
    first_page = course_tokenizer(validation[0], add_special_tokens=False)["input_ids"][:64]
    assert np.asarray(first_page, dtype=np.int16).tobytes() not in haystack


def test_calibration_data_bad_inputs(course_model):
    model, tokenizer = course_model
    with pytest.raises(ValueError, match="n_samples=0"):
        calibration_data(tokenizer, n_samples=0)
    with pytest.raises(ValueError, match="longer than the model's context of 512"):
        calibration_data(tokenizer, seq_len=513, model=model)
    with pytest.raises(ValueError, match="don't belong together"):
        calibration_data(tokenizer, n_samples=2, seq_len=16, model=_tiny_llama())  # 4096 tokens, 128 embeddings


# ---------------------------------------------------------------------------------------------------------
# Activation statistics
# ---------------------------------------------------------------------------------------------------------


def test_running_stats_equal_a_direct_computation_on_stored_activations():
    model = _tiny_llama()
    data = _ids()
    stored: dict[str, list[torch.Tensor]] = {n: [] for n in linear_names(model)}
    handles = [
        model.get_submodule(n).register_forward_pre_hook(lambda _m, a, n=n: stored[n].append(a[0].reshape(-1, a[0].shape[-1])))
        for n in stored
    ]
    with torch.no_grad():
        model(input_ids=data)
    for h in handles:
        h.remove()

    stats = collect_stats(model, data, batch_size=4)  # 2 batches of unequal size (4 + 2): the running mean must cope
    assert set(stats) == set(stored)
    for name, chunks in stored.items():
        x = torch.cat(chunks).double()  # (tokens, in)
        s = stats[name]
        assert s.n_tokens == 6 * 24
        torch.testing.assert_close(s.gram.double(), x.T @ x, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(s.abs_mean.double(), x.abs().mean(dim=0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s.abs_max.double(), x.abs().amax(dim=0), rtol=0, atol=0)
        torch.testing.assert_close(s.hessian.double(), x.T @ x / x.shape[0], rtol=1e-4, atol=1e-5)


def test_stats_hold_a_fixed_size_whatever_the_tokens():
    s = ActivationStats.empty(16, dtype=torch.float64)
    for t in (3, 300):
        s.update(torch.randn(t, 16))
    assert s.n_tokens == 303 and s.gram.shape == (16, 16) and s.abs_mean.shape == s.abs_max.shape == (16,)
    assert s.gram.dtype == torch.float64
    with pytest.raises(ValueError, match="no tokens"):
        _ = ActivationStats.empty(4).hessian


# ---------------------------------------------------------------------------------------------------------
# Sequential calibration
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("true_sequential", [True, False])
def test_each_layer_is_calibrated_on_inputs_through_the_quantized_layers_before_it(monkeypatch, true_sequential):
    """GPTQ's Hessians must come from the model as quantized so far, not from the float model.

    With true-sequential order, every layer's inputs come only through layers quantized before it, so the Hessian it
    was given equals the statistics of the *final* quantized model. Without it, that holds for the first layers of
    every block (q/k/v, whose inputs are the quantized earlier blocks' outputs), while the rest see the float block.
    """
    model = _tiny_llama()
    float_model = copy.deepcopy(model)
    data = _ids()
    seen: dict[str, torch.Tensor] = {}
    real_gptq = calibration.gptq

    def spy(weight, hessian, *args, **kwargs):
        seen[spy.name] = hessian.clone()
        return real_gptq(weight, hessian, *args, **kwargs)

    real_quantize_layer = calibration._quantize_layer

    def named(name, *args, **kwargs):
        spy.name = name
        return real_quantize_layer(name, *args, **kwargs)

    monkeypatch.setattr(calibration, "gptq", spy)
    monkeypatch.setattr(calibration, "_quantize_layer", named)
    report = calibrate_model(model, data, fmt="nf3", block_size=16, true_sequential=true_sequential, progress=False)
    assert len(seen) == len(report.layers) == 14

    final = collect_stats(model, data)
    floats = collect_stats(float_model, data)
    for name, h in seen.items():
        first_in_block = name.endswith(("q_proj", "k_proj", "v_proj"))
        if true_sequential or first_in_block:
            torch.testing.assert_close(h, final[name].hessian, rtol=1e-4, atol=1e-5)
        elif name.startswith("model.layers.0."):  # without true-sequential, block 0 sees only the float model
            torch.testing.assert_close(h, floats[name].hessian, rtol=1e-4, atol=1e-5)
    later = "model.layers.1.self_attn.q_proj"  # its inputs went through quantized block 0: not the float statistics
    assert not torch.allclose(seen[later], floats[later].hessian, rtol=1e-3, atol=1e-5)


def test_calibrated_model_is_quantized_finite_and_better_than_rtn():
    model = _tiny_llama()
    data = _ids(n=8, t=32)
    report = calibrate_model(model, data, fmt="nf3", block_size=16, progress=False)
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert sorted(quantized) == sorted(report.replaced) and len(quantized) == 14
    assert all(layer.loss <= layer.rtn_loss * 1.0001 for layer in report.layers)
    assert report.loss_ratio < 0.9
    assert (report.n_samples, report.seq_len, report.n_blocks) == (8, 32, 2)
    assert "gptq nf3" in str(report)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=data).logits).all()


def test_rtn_method_equals_quantize_model():
    a, b = _tiny_llama(), _tiny_llama()
    report = calibrate_model(a, _ids(), method="rtn", fmt="int4", block_size=16, progress=False)
    quantize_model(b, fmt="int4", block_size=16)
    assert report.loss_ratio is None and len(report.layers) == 14
    for name in report.replaced:
        assert torch.equal(a.get_submodule(name).qweight.packed, b.get_submodule(name).qweight.packed)


def test_layers_can_be_picked_and_the_rest_stay_float():
    model = _tiny_llama()
    report = calibrate_model(model, _ids(), include=[r"layers\.1\.mlp"], block_size=16, progress=False)
    assert sorted(report.replaced) == [f"model.layers.1.mlp.{p}" for p in ("down_proj", "gate_proj", "up_proj")]
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 3


def test_act_order_and_double_quant_run_end_to_end():
    model = _tiny_llama()
    report = calibrate_model(model, _ids(), fmt="int4", block_size=16, act_order=True, double_quant=True, progress=False)
    assert report.act_order and all(model.get_submodule(n).qweight.double_quant for n in report.replaced)
    assert report.loss_ratio < 1.0


def test_a_failure_midway_leaves_the_model_as_it_was(monkeypatch):
    model = _tiny_llama()
    before = _state(model)
    calls = []
    real_gptq = calibration.gptq

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 9:  # in block 1, after all of block 0 was swapped in
            raise RuntimeError("boom")
        return real_gptq(*args, **kwargs)

    monkeypatch.setattr(calibration, "gptq", failing)
    with pytest.raises(RuntimeError, match="boom"):
        calibrate_model(model, _ids(), block_size=16, progress=False)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    after = _state(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_calibrate_model_bad_inputs():
    model = _tiny_llama()
    with pytest.raises(ValueError, match="zero calibration samples"):
        calibrate_model(model, torch.zeros(0, 16, dtype=torch.long), block_size=16, progress=False)
    with pytest.raises(ValueError, match="longer than the model's context of 64"):
        calibrate_model(model, _ids(t=65), block_size=16, progress=False)
    with pytest.raises(ValueError, match="tokenizer doesn't match the model"):
        calibrate_model(model, _ids(vocab=4096), block_size=16, progress=False)
    with pytest.raises(ValueError, match="token ids"):
        calibrate_model(model, torch.randn(2, 8), block_size=16, progress=False)
    with pytest.raises(ValueError, match="method='awq' is not supported"):
        calibrate_model(model, _ids(), method="awq", block_size=16, progress=False)
    with pytest.raises(ValueError, match="not a multiple of block_size=256"):
        calibrate_model(model, _ids(), block_size=256, progress=False)
    with pytest.raises(ValueError, match="block_size=48 is not supported"):
        calibrate_model(model, _ids(), block_size=48, progress=False)
    with pytest.raises(ValueError, match="not a known format"):
        calibrate_model(model, _ids(), fmt="nf5", block_size=16, progress=False)
    with pytest.raises(ValueError, match="damp=-1"):
        calibrate_model(model, _ids(), damp=-1, block_size=16, progress=False)
    with pytest.raises(ValueError, match="inside the decoder blocks"):
        calibrate_model(model, _ids(), include=["lm_head"], exclude=[], block_size=16, progress=False)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())  # every refusal came before any change

    quantize_model(model, fmt="nf4", block_size=16, include=["q_proj"])
    with pytest.raises(ValueError, match="already quantized"):
        calibrate_model(model, _ids(), block_size=16, progress=False)

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(ValueError, match="Llama-style"):
        calibrate_model(gpt2, _ids(vocab=64), progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_calibrates_on_cuda():
    model = _tiny_llama().cuda()
    report = calibrate_model(model, _ids(), fmt="nf4", block_size=16, progress=False)
    assert all(model.get_submodule(n).qweight.device.type == "cuda" for n in report.replaced)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=_ids().cuda()).logits).all()


# ---------------------------------------------------------------------------------------------------------
# The target, on the course model
# ---------------------------------------------------------------------------------------------------------


def test_gptq_closes_the_gap_to_fp32_on_the_course_model(course_model):
    """Held-out perplexity: 3-bit GPTQ closes >= 50% of RTN's gap to fp32, 4-bit >= 30%.

    CI size: 32 calibration sequences of 256 tokens, the first 16,384 validation tokens, act-order on. (Measured:
    nf4 about 56%, nf3 about 75%; without act-order both are near 50%, too close to test.)
    """
    base, tokenizer = course_model
    validation = list(load_corpus("validation")["text"])
    data = calibration_data(tokenizer, n_samples=32, seq_len=256, seed=0, model=base)

    def ppl(model) -> float:
        return perplexity(model, tokenizer, validation, max_tokens=16384, progress=False)

    fp32 = ppl(base)
    for fmt, target in (("nf3", 0.5), ("nf4", 0.3)):
        rtn = copy.deepcopy(base)
        quantize_model(rtn, fmt=fmt)
        calibrated = copy.deepcopy(base)
        calibrate_model(calibrated, data, fmt=fmt, act_order=True, progress=False)
        rtn_ppl, gptq_ppl = ppl(rtn), ppl(calibrated)
        closed = (rtn_ppl - gptq_ppl) / (rtn_ppl - fp32)
        assert rtn_ppl > fp32, f"{fmt}: RTN ({rtn_ppl:.3f}) should be worse than fp32 ({fp32:.3f})"
        assert closed >= target, f"{fmt}: fp32 {fp32:.3f}, RTN {rtn_ppl:.3f}, GPTQ {gptq_ppl:.3f}: closed {closed:.0%}"
