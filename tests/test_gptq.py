"""GPTQ on one layer: RTN when H = I, never worse than RTN, equal to a slow textbook OBS loop, robust to bad H."""

from __future__ import annotations

import warnings

import pytest
import torch

from lq_edu.gptq import gptq, gptq_quantize, inverse_hessian_cholesky, proxy_loss
from lq_edu.quant import QuantizedWeight, dequantize, int_codebook, nf_codebook, quantize
from lq_edu.quant_linear import QuantLinear

FORMATS = ["nf4", "nf3", "nf2", "int8", "int4", "int3", "fp4"]


def _correlated(n_tokens: int = 1024, in_features: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs whose channels move together and differ in scale, as real activations do; returns (X, H = XᵀX / n)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(in_features, in_features, generator=g) / in_features**0.5
    scale = torch.exp(torch.randn(in_features, generator=g))  # channels of very different size
    x = (torch.randn(n_tokens, in_features, generator=g) @ mix + 0.5 * torch.randn(n_tokens, 1, generator=g)) * scale
    return x, x.T @ x / n_tokens


def _weight(out_features: int = 48, in_features: int = 128, seed: int = 1) -> torch.Tensor:
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)) * 0.02


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("act_order", [False, True])
def test_identity_hessian_gives_round_to_nearest_codes(fmt, act_order):
    """With H = I no column can help another, so GPTQ must be RTN: same codes, same scales, bit for bit."""
    w = _weight(40, 256)
    got = gptq_quantize(w, torch.eye(256), fmt, block_size=64, act_order=act_order)
    want = quantize(w, fmt, block_size=64)
    assert torch.equal(got.packed, want.packed)
    assert torch.equal(got.scales, want.scales)
    assert (got.format, got.bits, got.shape, got.block_size) == (want.format, want.bits, want.shape, want.block_size)


@pytest.mark.parametrize("fmt", ["nf4", "nf3", "int4", "int3", "fp4"])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_proxy_loss_is_below_round_to_nearest(fmt, act_order, seed):
    _, h = _correlated(seed=seed)
    w = _weight(seed=seed + 10)
    result = gptq(w, h, fmt, block_size=32, act_order=act_order)
    rtn = quantize(w, fmt, block_size=32).dequantize()
    written_out = torch.trace((w - result.qweight.dequantize()) @ h @ (w - result.qweight.dequantize()).T)
    assert result.loss == pytest.approx(float(written_out), rel=1e-4)
    assert result.rtn_loss == pytest.approx(proxy_loss(w, rtn, h), rel=1e-6)
    assert result.loss < 0.8 * result.rtn_loss  # correlated inputs: GPTQ is clearly better, not just equal


def test_proxy_loss_is_the_mean_squared_output_error():
    """tr((W - Q) H (W - Q)ᵀ) with H = XᵀX / n is the mean over tokens of ||(W - Q) x||²."""
    x, h = _correlated()
    w = _weight()
    q = gptq_quantize(w, h, "nf3", block_size=32).dequantize()
    direct = ((x @ (w - q).T) ** 2).sum(dim=1).mean()
    assert proxy_loss(w, q, h) == pytest.approx(float(direct), rel=1e-3)


def _textbook_gptq(w: torch.Tensor, h: torch.Tensor, fmt: str, block_size: int, damp: float = 0.01) -> torch.Tensor:
    """The OBS loop as first written down: after each column, invert the Hessian of the columns still left.

    No Cholesky trick, no lazy blocks, float64. Scales from the current weights at each group's first column.
    Returns the dequantized weight (out, in).
    """
    w = w.double().clone()
    h = h.double() + damp * h.diagonal().mean().double() * torch.eye(h.shape[0], dtype=torch.float64)
    bits = int(fmt[-1])
    codebook = (nf_codebook(bits) if fmt.startswith("nf") else int_codebook(bits)).double()
    qmax = None if fmt.startswith("nf") else 2 ** (bits - 1) - 1
    q = torch.zeros_like(w)
    scale = None
    n = w.shape[1]
    for j in range(n):
        if j % block_size == 0:
            absmax = w[:, j : j + block_size].abs().amax(dim=1)
            scale = absmax if qmax is None else absmax / qmax
        nearest = (w[:, j : j + 1] / scale[:, None] - codebook[None, :]).abs().argmin(dim=1)
        q[:, j] = codebook[nearest] * scale
        h_inv = torch.linalg.inv(h[j:, j:])  # inverse Hessian of the columns not yet quantized
        w[:, j:] -= ((w[:, j] - q[:, j]) / h_inv[0, 0])[:, None] * h_inv[0][None, :]
    return q


@pytest.mark.parametrize("fmt", ["nf4", "int4"])
@pytest.mark.parametrize("lazy_block", [1, 16, 128])
def test_equals_the_textbook_obs_loop(fmt, lazy_block):
    _, h = _correlated(n_tokens=512, in_features=64)
    w = _weight(16, 64)
    got = gptq(w, h, fmt, block_size=16, lazy_block=lazy_block).qweight.dequantize().double()
    want = _textbook_gptq(w, h, fmt, block_size=16)
    same = torch.isclose(got, want, rtol=1e-4, atol=1e-7).float().mean()
    assert same > 0.99, f"only {same:.1%} of the weights agree with the textbook loop"  # a rare tie may flip


def test_result_is_a_quantized_weight_that_quantlinear_holds():
    _, h = _correlated()
    w = _weight()
    bias = torch.randn(48)
    for double_quant in (False, True):
        qw = gptq_quantize(w, h, "nf4", block_size=64, double_quant=double_quant)
        assert isinstance(qw, QuantizedWeight) and qw.shape == (48, 128) and qw.double_quant == double_quant
        assert qw.packed.dtype == torch.uint8 and qw.packed.numel() == 48 * 128 * 4 // 8
        assert int(qw.codes().max()) < 16
        layer = QuantLinear(qw, bias, name="test")
        x = torch.randn(3, 5, 128)
        torch.testing.assert_close(layer(x), x @ dequantize(qw).T + bias)
    assert gptq_quantize(w, h, "int3", block_size=32).codes().max() <= 6  # int3 codes 0..6 mean -3..3


def test_dead_input_channels_get_zero_weight_and_no_nan():
    x, _ = _correlated()
    dead = torch.tensor([0, 5, 77, 127])
    x[:, dead] = 0.0  # these inputs never fire
    h = x.T @ x / x.shape[0]
    w = _weight()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a dead channel is handled, not warned about
        result = gptq(w, h, "nf4", block_size=32)
    deq = result.qweight.dequantize()
    assert result.dead == 4 and torch.isfinite(deq).all()
    assert (deq[:, dead] == 0).all()
    assert result.loss <= result.rtn_loss


def test_all_dead_layer_quantizes_to_zero():
    result = gptq(_weight(), torch.zeros(128, 128), "nf4", block_size=64)
    assert result.dead == 128 and (result.qweight.dequantize() == 0).all() and result.loss == 0.0


def test_singular_hessian_gets_more_damping_with_a_warning():
    x = torch.randn(3, 128)  # 3 tokens for 128 inputs: H has rank 3
    h = x.T @ x / 3
    with pytest.warns(RuntimeWarning, match="singular or ill-conditioned"):
        result = gptq(_weight(), h, "nf3", block_size=64, damp=0.0)
    assert result.damp > 0
    assert torch.isfinite(result.qweight.dequantize()).all() and result.loss <= result.rtn_loss * 1.001


def test_hessian_that_is_not_positive_falls_back_to_rtn():
    h = -torch.eye(128) * 1e3 + 1.0  # negative definite: no damping up to the limit helps
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qw = gptq_quantize(_weight(), h, "nf4", block_size=64)
    messages = [str(w.message) for w in caught]
    assert all(w.category is RuntimeWarning for w in caught)
    assert "falls back to round-to-nearest" in messages[-1] and all("retrying" in m for m in messages[:-1])
    assert torch.equal(qw.packed, quantize(_weight(), "nf4", block_size=64).packed)


def test_inverse_hessian_cholesky_is_the_upper_factor_of_the_damped_inverse():
    _, h = _correlated(in_features=32)
    u, damp = inverse_hessian_cholesky(h, 0.05)
    damped = h + 0.05 * h.diagonal().mean() * torch.eye(32)
    assert damp == 0.05 and torch.equal(u, torch.triu(u))
    torch.testing.assert_close(u.T @ u, torch.linalg.inv(damped), rtol=1e-3, atol=1e-4)


def test_act_order_visits_active_inputs_first_with_static_scales():
    _, h = _correlated()
    w = _weight()
    result = gptq(w, h, "nf4", block_size=32, act_order=True)
    assert torch.equal(result.perm, torch.argsort(h.diagonal(), descending=True))
    # static groups: scales come from the original weights, so they are RTN's
    assert torch.equal(result.qweight.scales, quantize(w, "nf4", block_size=32).scales)
    assert result.loss < result.rtn_loss
    assert gptq(w, h, "nf4", block_size=32).perm is None


def test_runs_on_other_dtypes_and_keeps_the_device():
    _, h = _correlated()
    w = _weight().to(torch.bfloat16)
    qw = gptq_quantize(w, h.double(), "nf4", block_size=64)
    assert qw.device == w.device and torch.isfinite(qw.dequantize()).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    _, h = _correlated()
    w = _weight()
    cpu = gptq(w, h, "nf4", block_size=32)
    gpu = gptq(w.cuda(), h.cuda(), "nf4", block_size=32)
    assert gpu.qweight.device.type == "cuda"
    assert gpu.loss == pytest.approx(cpu.loss, rel=0.02)


def test_bad_inputs_say_what_to_do():
    _, h = _correlated()
    w = _weight()
    with pytest.raises(ValueError, match="not a multiple of block_size=64"):
        gptq(torch.randn(8, 96), torch.eye(96), block_size=64)
    with pytest.raises(ValueError, match=r"hessian must be \(128, 128\)"):
        gptq(w, torch.eye(64))
    with pytest.raises(ValueError, match="2-D float tensor"):
        gptq(torch.randn(128), h)
    with pytest.raises(ValueError, match="not a known format"):
        gptq(w, h, fmt="nf5")
    with pytest.raises(ValueError, match="damp"):
        gptq(w, h, damp=-0.1)
    with pytest.raises(ValueError, match="lazy_block"):
        gptq(w, h, lazy_block=0)
    with pytest.raises(ValueError, match="block_size=48 is not supported"):
        gptq(w, h, block_size=48)
    bad = h.clone()
    bad[3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf"):
        gptq(w, bad)
