"""Activation-aware scaling: the α search, folding into the previous op, and ScaledQuantLinear."""

from __future__ import annotations

import copy

import pytest
import torch

from lq_edu.awq import (
    ScaledQuantLinear,
    awq_quantize_model,
    awq_scales,
    awq_search,
    capture_inputs,
    fold_scales,
)
from lq_edu.quant import quantize
from lq_edu.quant_linear import QuantLinear


@pytest.fixture(scope="module")
def calib(course_model):
    """Calibration tokens (2 x 128) from the training corpus, and layer 0's q/k/v inputs."""
    from lq_edu import load_corpus

    model, tokenizer = course_model
    text = "\n".join(load_corpus("train")["text"][:4])
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :256].view(2, 128)
    return ids


def test_alpha_zero_is_rtn():
    torch.manual_seed(0)
    W, x = torch.randn(32, 64), torch.randn(100, 64) * torch.linspace(0.1, 5, 64)
    result = awq_search(W, x.abs().mean(0), x, "nf3", 16, grid=4)
    assert result.alphas == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert torch.equal(awq_scales(x.abs().mean(0), 0.0), torch.ones(64))
    w_hat = quantize(W, "nf3", 16).dequantize()
    rtn = float(((x @ (w_hat - W).T) ** 2).sum() / ((x @ W.T) ** 2).sum())
    assert result.rtn_error == pytest.approx(rtn, rel=1e-6)
    assert result.error <= result.rtn_error and result.gain >= 1


def test_awq_helps_outlier_channels():
    """A few input channels 20x larger than the rest: protecting them cuts the output error clearly."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(64, 128, generator=g)
    scale = torch.ones(128)
    scale[::16] = 20.0
    x = torch.randn(256, 128, generator=g) * scale
    result = awq_search(W, x.abs().mean(0), x, "int4", 128, grid=10)
    assert result.alpha > 0 and result.gain > 1.5


def test_fold_into_norm_keeps_float_outputs(course_model, calib):
    """Folding 1/s into input_layernorm and post_attention_layernorm and s into q/k/v, gate/up changes nothing."""
    model = copy.deepcopy(course_model[0])
    with torch.no_grad():
        before = model(input_ids=calib).logits
    layer = model.model.layers[0]
    g = torch.Generator().manual_seed(0)
    s1, s2 = torch.rand(256, generator=g) + 0.5, torch.rand(256, generator=g) + 0.5
    fold_scales(layer.input_layernorm, [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj], s1)
    fold_scales(layer.post_attention_layernorm, [layer.mlp.gate_proj, layer.mlp.up_proj], s2)
    s3 = torch.rand(576, generator=g) + 0.5
    fold_scales(layer.mlp.up_proj, [layer.mlp.down_proj], s3)  # up rows feed down through silu(gate) * up
    with torch.no_grad():
        after = model(input_ids=calib).logits
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(layer.self_attn.q_proj.weight, course_model[0].model.layers[0].self_attn.q_proj.weight)


def test_fold_refuses_mismatched_gqa(course_model):
    layer = copy.deepcopy(course_model[0].model.layers[0])
    with pytest.raises(ValueError, match="ScaledQuantLinear"):  # v_proj has 128 outputs, o_proj 256 inputs
        fold_scales(layer.self_attn.v_proj, [layer.self_attn.o_proj], torch.ones(256))


def test_scaled_quant_linear_equals_folded_weights():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    s = torch.rand(64) + 0.5
    layer = ScaledQuantLinear.from_linear(lin, s, "nf4", 64)
    x = torch.randn(5, 64)
    w_hat = quantize(lin.weight.detach() * s, "nf4", 64).dequantize() / s  # what the layer stands for
    torch.testing.assert_close(layer(x), x @ w_hat.T + lin.bias.detach(), atol=1e-5, rtol=1e-5)
    assert layer.nbytes == layer.base_layer.nbytes + 64 * 4


def test_qkv_share_one_scale_and_model_level_awq(course_model, calib):
    model = copy.deepcopy(course_model[0])
    report = awq_quantize_model(model, calib, fmt="nf3", grid=5)
    assert len(report.results) == 24 and len(report.folded) == 18  # 6 layers x (qkv, gate_up, down)
    assert report.kept == [f"model.layers.{i}.self_attn.o_proj" for i in range(6)]  # GQA: kept in the layer
    assert isinstance(model.model.layers[0].self_attn.o_proj, ScaledQuantLinear)
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantLinear)
    assert all(r.error <= r.rtn_error for r in report.results.values())
    # the folded q weight is quantize(W·diag(s)) with the one qkv scale
    s = report.results["model.layers.0.qkv"].scales
    W = course_model[0].model.layers[0].self_attn.q_proj.weight.detach()
    torch.testing.assert_close(
        model.model.layers[0].self_attn.q_proj.dequantized_weight(), quantize(W * s, "nf3").dequantize()
    )
    # capture_inputs gives one row per token: (B*T, in)
    inputs = capture_inputs(course_model[0], ["model.layers.0.mlp.gate_proj"], calib)
    assert inputs["model.layers.0.mlp.gate_proj"].shape == (256, 256)


def test_bad_stats():
    W = torch.randn(8, 16)
    with pytest.raises(ValueError, match=r"x_abs_mean has shape"):
        awq_search(W, torch.ones(8), torch.randn(4, 16))
    with pytest.raises(ValueError, match=r"x_sample has shape"):
        awq_search(W, torch.ones(16), torch.randn(16))
    with pytest.raises(ValueError, match="grid="):
        awq_search(W, torch.ones(16), torch.randn(4, 16), grid=0)
