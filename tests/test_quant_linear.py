"""QuantLinear and model surgery: exact against a float twin, frozen, atomic on failure."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.pytorch_utils import Conv1D

from lq_edu.quant import QuantizedWeight
from lq_edu.quant_linear import QuantLinear
from lq_edu.surgery import linear_names, quantize_model


def _twin(q: QuantLinear) -> nn.Linear:
    """An nn.Linear holding exactly QuantLinear's dequantized weight."""
    lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None)
    with torch.no_grad():
        lin.weight.copy_(q.dequantized_weight())
        if q.bias is not None:
            lin.bias.copy_(q.bias)
    return lin


@pytest.mark.parametrize("fmt", ["nf4", "nf3", "int8", "int4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_forward_and_input_gradient_match_a_float_twin(fmt, double_quant):
    torch.manual_seed(0)
    src = nn.Linear(96, 40)  # 96*40 is not a multiple of 64: a partial last block
    q = QuantLinear.from_linear(src, fmt=fmt, double_quant=double_quant)
    twin = _twin(q)
    x = torch.randn(3, 5, 96, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y, y2 = q(x), twin(x2)
    torch.testing.assert_close(y, y2)
    grad = torch.randn_like(y)
    y.backward(grad)
    y2.backward(grad)
    torch.testing.assert_close(x.grad, x2.grad)


def test_the_base_is_frozen():
    q = QuantLinear.from_linear(nn.Linear(64, 32))
    assert all(not p.requires_grad for p in q.parameters())
    x = torch.randn(2, 64, requires_grad=True)
    q(x).sum().backward()
    assert q.bias.grad is None


def test_no_dequantized_weight_is_saved_for_backward():
    """Between forward and backward, autograd holds nothing of the weight's size."""
    q = QuantLinear.from_linear(nn.Linear(256, 256, bias=False))
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    x = torch.randn(4, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = q(x)
    assert all(n < 256 * 256 for n in saved), saved
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_conv1d_is_quantized_with_its_transposed_layout():
    torch.manual_seed(0)
    conv = Conv1D(48, 64)  # GPT-2 style: weight (in=64, out=48), y = x @ W + b
    nn.init.normal_(conv.weight, std=0.02)
    q = QuantLinear.from_linear(conv, fmt="int8")
    x = torch.randn(2, 7, 64)
    assert (q.in_features, q.out_features) == (64, 48)
    torch.testing.assert_close(q(x), conv(x), atol=2e-3, rtol=0.05)


def test_to_moves_state_but_keeps_its_dtypes():
    q = QuantLinear.from_linear(nn.Linear(64, 64), double_quant=True)
    q.half()
    assert q.qweight.packed.dtype == torch.uint8
    assert q.qweight.scales.absmax.dtype == torch.float32 and q.bias.dtype == torch.float16
    y = q(torch.randn(2, 64, dtype=torch.float16))
    assert y.dtype == torch.float16
    q.to("cpu")
    assert isinstance(q.qweight, QuantizedWeight) and q.qweight.device.type == "cpu"


def test_bad_weights_are_refused():
    with pytest.raises(ValueError, match="not supported|use one of|supported"):
        QuantLinear.from_linear(nn.Linear(64, 64), fmt="nf5")
    with pytest.raises(TypeError, match="nn.Linear or transformers' Conv1D"):
        QuantLinear.from_linear(nn.Conv2d(3, 3, 1))


# ---- surgery --------------------------------------------------------------------


def _tiny(kind: str):
    model, per_layer = _build_tiny(kind)
    return model.eval(), per_layer  # eval: GPT-2's dropout would blur the comparisons


def _build_tiny(kind: str):
    torch.manual_seed(0)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2)), 7
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2)), 7
    cfg = GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg), 4


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_surgery_on_tiny_random_models(kind):
    model, per_layer = _tiny(kind)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    report = quantize_model(model, fmt="int8")
    assert len(report.replaced) == 2 * per_layer
    assert not any("lm_head" in n for n in report.replaced)
    assert all(isinstance(model.get_submodule(n), QuantLinear) for n in report.replaced)
    assert report.bytes_after < report.bytes_before
    assert report.bits_per_param == pytest.approx(8.5, abs=0.2)  # int8 codes + an fp32 scale per 64
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert (after - before).abs().max() < 0.02 * before.abs().max()  # int8 barely moves the logits
    assert "replaced" in str(report)


def test_surgery_on_the_course_model(course_model):
    import copy

    model = copy.deepcopy(course_model[0])
    report = quantize_model(model, fmt="nf4", double_quant=True)
    n_layers = model.config.num_hidden_layers
    assert len(report.replaced) == 7 * n_layers
    assert report.skipped == ["lm_head"]
    assert report.bits_per_param == pytest.approx(4.127, abs=0.01)
    assert report.linear_bytes_before / report.linear_bytes_after > 7.5


def test_include_pattern():
    model, _ = _tiny("llama")
    report = quantize_model(model, include=r"mlp\.(gate|up)_proj")
    assert report.replaced == [f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("gate", "up")]


def test_pattern_matching_nothing_lists_candidates():
    model, _ = _tiny("llama")
    with pytest.raises(ValueError, match=r"matches no linear layer; candidates are: model.layers.0.self_attn.q_proj"):
        quantize_model(model, include="attention.query")


def test_nan_weight_is_refused_before_anything_changes():
    model, _ = _tiny("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, :3] = float("nan")
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.down_proj has 3 NaN/inf"):
        quantize_model(model)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    assert set(model.state_dict()) == set(state)


def test_failure_midway_leaves_the_model_unchanged(monkeypatch):
    """Quantization fails on the 5th layer: no layer may have been swapped."""
    model, _ = _tiny("llama")
    from lq_edu import quant_linear

    calls = {"n": 0}
    original = quant_linear.QuantLinear.from_linear

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("out of memory (simulated)")
        return original(*args, **kwargs)

    monkeypatch.setattr(quant_linear.QuantLinear, "from_linear", flaky)
    with pytest.raises(RuntimeError, match="simulated"):
        quantize_model(model)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_quantizing_twice_is_refused():
    model, _ = _tiny("llama")
    quantize_model(model, include=r"q_proj")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model)
    assert sum(isinstance(model.get_submodule(n), QuantLinear) for n in linear_names(model)) == 2
