"""LoRALinear / LQLinear: init, scaling, merge symmetry, quantized bases, bad input, the step-0 error target."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lq_edu.lora import LoRALinear, LQLinear, initial_error, lora_scaling
from lq_edu.quant_linear import QuantLinear


def _linear(in_f=64, out_f=48, seed=0, bias=True):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias)


def _randomize_B(layer: LoRALinear, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)


def test_init_is_the_base_and_matches_the_formula():
    base = _linear()
    layer = LoRALinear(base, r=4, alpha=8, seed=0)
    x = torch.randn(3, 5, 64)
    assert torch.equal(layer(x), base(x))  # B = 0 at step 0
    assert layer.lora_A.weight.shape == (4, 64) and layer.lora_B.weight.shape == (48, 4)
    assert layer.lora_A.weight.abs().max() <= 1 / math.sqrt(64)
    assert layer.lora_A.weight.std() > 0
    _randomize_B(layer)
    expected = base(x) + (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T) * (8 / 4)
    torch.testing.assert_close(layer(x), expected)
    assert torch.equal(LoRALinear(_linear(), r=4, seed=3).lora_A.weight, LoRALinear(_linear(), r=4, seed=3).lora_A.weight)


def test_rslora_scaling():
    assert lora_scaling(16, 32) == 2.0
    assert lora_scaling(16, 32, use_rslora=True) == 8.0
    assert LoRALinear(_linear(), r=4, alpha=8, use_rslora=True).scaling == 4.0


def test_only_lora_params_train_and_grads_flow():
    layer = LoRALinear(_linear(), r=4)
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A.weight", "lora_B.weight"}
    layer(torch.randn(2, 64)).sum().backward()
    assert layer.lora_B.weight.grad.abs().sum() > 0


def test_dropout_only_in_training():
    layer = LoRALinear(_linear(), r=4, dropout=0.5)
    _randomize_B(layer)
    x = torch.randn(8, 64)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    torch.manual_seed(0)
    a = layer(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, layer(x))
    assert torch.allclose(layer.base_layer(x), layer.base_layer(x))


@pytest.mark.parametrize("quantized", [False, True])
def test_merge_unmerge_symmetry(quantized):
    base = _linear()
    if quantized:
        base = QuantLinear.from_linear(base, fmt="nf4")
    layer = LoRALinear(base, r=4, alpha=8)
    _randomize_B(layer)
    w0 = layer.base_layer.dequantized_weight() if quantized else layer.base_layer.weight.detach().clone()
    x = torch.randn(4, 64)
    y = layer(x)
    if quantized:
        with pytest.warns(UserWarning, match="float nn.Linear"):
            layer.merge()
        assert type(layer.base_layer) is nn.Linear  # not silently re-quantized
    else:
        layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="already merged"):
        layer.merge()
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)
    if quantized:
        assert isinstance(layer.base_layer, QuantLinear)
        assert torch.equal(layer.base_layer.dequantized_weight(), w0)
    else:
        torch.testing.assert_close(layer.base_layer.weight, w0, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="not merged"):
        layer.unmerge()


@pytest.mark.parametrize("r", [0, -1, 49, 2.0, True])
def test_bad_rank(r):
    with pytest.raises(ValueError, match=r"min\(in, out\) = 48"):
        LoRALinear(_linear(), r=r)


def test_bad_alpha_and_dropout():
    with pytest.raises(ValueError, match="alpha=-1"):
        LoRALinear(_linear(), r=4, alpha=-1)
    with pytest.raises(ValueError, match="dropout=1.0"):
        LoRALinear(_linear(), r=4, dropout=1.0)
    with pytest.raises(TypeError, match="Conv1d"):
        LoRALinear(nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match="lq-data' needs stats"):
        LQLinear(_linear(), r=4, init="lq-data")
    with pytest.raises(ValueError, match="init='svd'"):
        LQLinear(_linear(), r=4, init="svd")


def test_lq_start_is_q_plus_l1l2():
    base = _linear(128, 64)
    W = base.weight.detach()
    zero = LQLinear(base, r=8, alpha=16, init="zero")
    lq = LQLinear(base, r=8, alpha=16, init="lq")
    d = lq.decomposition
    torch.testing.assert_close(lq.delta_weight(), d.L1 @ d.L2, atol=1e-5, rtol=1e-4)
    assert initial_error(lq, W) == pytest.approx(d.error, rel=1e-4)
    assert initial_error(zero, W) == pytest.approx(
        float((W - zero.base_layer.dequantized_weight()).norm() / W.norm()), rel=1e-6)
    assert initial_error(lq, W) < initial_error(zero, W)
    x = torch.randn(4, 128)
    assert (lq(x) - base(x)).norm() < (zero(x) - base(x)).norm()


def test_lq_data_uses_stats():
    base = _linear(128, 64)
    torch.manual_seed(0)
    X = torch.randn(512, 128) * torch.linspace(0.05, 3, 128)  # a few loud input channels
    gram = X.T @ X / X.shape[0]
    lq = LQLinear(base, r=8, init="lq")
    lqd = LQLinear(base, r=8, init="lq-data", stats=gram)
    assert lqd.decomposition.method == "lq-weighted"
    y = X @ base.weight.T

    def out_err(m):
        return float((m(X) - base.bias - y).norm())
    assert out_err(lqd) < out_err(lq)


def test_initial_error_target_on_course_model():
    from lq_edu.models import load_course_model

    model, _ = load_course_model()
    rows = []
    for i in (0, 5):
        for name in ("self_attn.q_proj", "mlp.down_proj"):
            lin = model.get_submodule(f"model.layers.{i}.{name}")
            W = lin.weight.detach()
            e_zero = initial_error(LQLinear(lin, r=16, init="zero"), W)
            e_lq = initial_error(LQLinear(lin, r=16, init="lq", iters=3), W)
            rows.append((i, name, e_zero, e_lq))
            assert e_lq < e_zero, f"layer {i}.{name}: lq {e_lq:.4f} >= zero {e_zero:.4f}"
    print("\n".join(f"layer {i} {n}: zero {z:.4f} lq {q:.4f}" for i, n, z, q in rows))
