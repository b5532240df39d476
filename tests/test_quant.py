"""Quantizers: codebooks against published values, round trips, error bounds, and NF4 equal to bitsandbytes."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lq_edu.quant import (
    DoubleQuantizedScales,
    QuantizedWeight,
    absmax_dequantize,
    absmax_quantize,
    byte_table,
    dequantize,
    double_quantize,
    dynamic_codebook,
    fp4_codebook,
    fp4_quantize,
    int_codebook,
    int_quantize,
    nf_codebook,
    nf_quantize,
    pack,
    quantize,
    unpack,
    zeropoint_dequantize,
    zeropoint_quantize,
)

# QLoRA's NF4 table, as published (and shipped by bitsandbytes).
NF4_PUBLISHED = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]  # fmt: skip

ODD_SHAPES = [(3, 7), (1,), (65,), (5, 130), (2, 3, 33), (64,), (128, 64)]

fast = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def randn(shape: tuple[int, ...], seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


@st.composite
def weights(draw, max_numel: int = 600) -> torch.Tensor:
    """A float32 tensor of 1-3 dims with some structure: normal values, a scale, maybe zeros and outliers."""
    dims = draw(st.lists(st.integers(1, 70), min_size=1, max_size=3).filter(lambda s: math.prod(s) <= max_numel))
    w = randn(tuple(dims), seed=draw(st.integers(0, 2**31 - 1)), scale=10.0 ** draw(st.integers(-6, 4)))
    flat = w.view(-1)
    if draw(st.booleans()):  # a run of exact zeros (a whole block, when long enough)
        start = draw(st.integers(0, flat.numel() - 1))
        flat[start : start + draw(st.integers(1, 200))] = 0.0
    if draw(st.booleans()):  # an outlier
        flat[draw(st.integers(0, flat.numel() - 1))] *= 1000.0
    return w


# ---------------------------------------------------------------------------------------------------------
# Codebooks
# ---------------------------------------------------------------------------------------------------------


def test_nf4_codebook_is_qloras_published_table():
    assert nf_codebook(4).dtype == torch.float32
    torch.testing.assert_close(nf_codebook(4), torch.tensor(NF4_PUBLISHED), rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_nf_codebook_shape(bits):
    cb = nf_codebook(bits)
    half = 2 ** (bits - 1)
    assert cb.shape == (2**bits,)
    assert bool((cb[1:] > cb[:-1]).all()), "sorted, no repeats"
    assert cb[0].item() == -1.0 and cb[-1].item() == 1.0
    assert int((cb == 0).sum()) == 1, "exactly one exact zero"
    assert int((cb > 0).sum()) == half and int((cb < 0).sum()) == half - 1, "QLoRA's asymmetric halves"


def test_nf_codebook_small_k_written_out():
    torch.testing.assert_close(nf_codebook(2), torch.tensor([-1.0, 0.0, 0.4358, 1.0]), rtol=0, atol=1e-4)
    expected3 = [-1.0, -0.5350, -0.2469, 0.0, 0.1833, 0.3820, 0.6230, 1.0]
    torch.testing.assert_close(nf_codebook(3), torch.tensor(expected3), rtol=0, atol=1e-4)


def test_fp4_codebook_is_e2m1_over_6():
    magnitudes = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    expected = torch.tensor(sorted({s * m for m in magnitudes for s in (-1, 1)})) / 6
    assert expected.numel() == 15
    assert torch.equal(fp4_codebook(), expected)


def test_fp4_codebook_agrees_with_formats_module():
    formats = pytest.importorskip("lq_edu.formats")
    values = formats.representable_values(formats.FP4_E2M1)
    assert torch.equal(fp4_codebook(), values / values.max())


def test_int_codebook():
    assert torch.equal(int_codebook(4), torch.arange(-7, 8, dtype=torch.float32))
    assert int_codebook(8).numel() == 255


def test_dynamic_codebook_written_out():
    cb = dynamic_codebook()
    assert cb.shape == (256,) and bool((cb[1:] > cb[:-1]).all())
    assert cb[-1].item() == 1.0 and cb[127].item() == 0.0
    torch.testing.assert_close(cb[128], torch.tensor(5.5e-7))  # 10^-6 * centre of [0.1, 1]
    torch.testing.assert_close(cb[0], torch.tensor(-0.99296875))  # 1 - 0.9 / 128: centre of the last bin
    assert int((cb > 0).sum()) == 128 and int((cb < 0).sum()) == 127


@pytest.mark.parametrize("bits", [1, 5, 8, "4"])
def test_nf_codebook_rejects_unsupported_bits(bits):
    with pytest.raises(ValueError, match=r"not supported for NF codebooks; use 2, 3 or 4"):
        nf_codebook(bits)


# ---------------------------------------------------------------------------------------------------------
# Bit packing
# ---------------------------------------------------------------------------------------------------------


def test_pack_written_out():
    assert pack(torch.tensor([4, 10]), 4).tolist() == [0x4A]  # first code in the high nibble
    assert pack(torch.tensor([1, 2, 3, 0]), 2).tolist() == [0b01_10_11_00]
    # 3 bits: 000 001 010 011 100 101 110 111 -> 00000101 00111001 01110111
    assert pack(torch.arange(8), 3).tolist() == [0b00000101, 0b00111001, 0b01110111]
    assert pack(torch.tensor([5]), 4).tolist() == [0x50]  # an odd count pads with code 0


@fast
@given(bits=st.integers(1, 8), data=st.data())
def test_pack_unpack_round_trip(bits, data):
    codes = data.draw(st.lists(st.integers(0, 2**bits - 1), min_size=0, max_size=300))
    c = torch.tensor(codes, dtype=torch.uint8)
    packed = pack(c, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == math.ceil(len(codes) * bits / 8), "3 bits really takes 3/8 of a byte"
    assert torch.equal(unpack(packed, bits, len(codes)), c)


def test_pack_sizes():
    assert pack(torch.zeros(8, dtype=torch.uint8), 3).numel() == 3
    assert pack(torch.zeros(4096, dtype=torch.uint8), 4).numel() == 2048
    assert pack(torch.zeros(4096, dtype=torch.uint8), 2).numel() == 1024


def test_pack_errors():
    with pytest.raises(ValueError, match=r"1 code\(s\) are outside \[0, 15\]"):
        pack(torch.tensor([3, 16]), 4)
    with pytest.raises(ValueError, match=r"outside \[0, 7\]"):
        pack(torch.tensor([-1, 2]), 3)
    with pytest.raises(TypeError, match="integer tensor"):
        pack(torch.tensor([0.5]), 4)
    with pytest.raises(ValueError, match=r"bits=9 is not supported for pack; use 1, 2, 3, 4, 5, 6, 7 or 8"):
        pack(torch.tensor([1]), 9)
    with pytest.raises(ValueError, match=r"packed has 3 bytes, but 4 codes of 4 bits take"):
        unpack(torch.zeros(3, dtype=torch.uint8), 4, 4)
    with pytest.raises(TypeError, match="uint8"):
        unpack(torch.zeros(2, dtype=torch.int32), 4, 4)


def test_byte_table_is_unpack_of_every_byte():
    cb = nf_codebook(4)
    table = byte_table(cb, 4)
    assert table.shape == (256, 2)
    assert torch.equal(table[0x4A], torch.stack([cb[4], cb[10]]))
    assert byte_table(int_codebook(2), 2).shape == (256, 4)
    with pytest.raises(ValueError, match="use 1, 2, 4 or 8"):
        byte_table(nf_codebook(3), 3)


# ---------------------------------------------------------------------------------------------------------
# Integer quantizers
# ---------------------------------------------------------------------------------------------------------


def test_absmax_written_out():
    q = absmax_quantize(torch.tensor([1.0, -0.5, 0.25, 0.0]), bits=8)
    # scale = 1 / 127; -63.5 rounds half to even -> -64
    assert q.codes.tolist() == [127, -64, 32, 0] and q.codes.dtype == torch.int8
    torch.testing.assert_close(q.scale, torch.tensor([1 / 127]))
    assert q.zero_point is None


def test_zeropoint_written_out():
    q = zeropoint_quantize(torch.tensor([-1.0, 0.0, 1.0, 2.0]), bits=2)
    assert q.codes.tolist() == [0, 1, 2, 3] and q.codes.dtype == torch.uint8
    assert q.scale.tolist() == [1.0] and q.zero_point.tolist() == [1]
    assert zeropoint_dequantize(q).tolist() == [-1.0, 0.0, 1.0, 2.0]
    # all positive: the range is widened to include 0, so 0 is code 0
    q = zeropoint_quantize(torch.tensor([1.0, 2.0, 3.0]), bits=2)
    assert q.zero_point.tolist() == [0] and q.codes.tolist() == [1, 2, 3]


def _granularities(w: torch.Tensor) -> list:
    return ["tensor", 16, 64] + (["channel"] if w.dim() >= 2 else [])


@fast
@given(w=weights(), bits=st.integers(2, 8))
def test_absmax_error_is_at_most_half_a_step(w, bits):
    for g in _granularities(w):
        q = absmax_quantize(w, bits, g)
        qmax = 2 ** (bits - 1) - 1
        assert q.codes.shape == w.shape and int(q.codes.abs().max()) <= qmax
        step = _per_element(q.scale, w, g)
        err = (w - absmax_dequantize(q)).abs()
        assert bool((err <= step / 2 + 1e-6 * w.abs()).all()), f"granularity {g}: {float((err - step / 2).max())}"


@fast
@given(w=weights(), bits=st.integers(2, 8))
def test_zeropoint_error_is_at_most_one_step_and_zero_is_exact(w, bits):
    for g in _granularities(w):
        q = zeropoint_quantize(w, bits, g)
        assert int(q.codes.max()) <= 2**bits - 1
        step = _per_element(q.scale, w, g)
        back = q.dequantize()
        assert bool(((w - back).abs() <= step + 1e-6 * w.abs()).all())
        assert bool((back[w == 0] == 0).all()), "0.0 is exactly representable"


def _per_element(scale: torch.Tensor, w: torch.Tensor, granularity) -> torch.Tensor:
    """Broadcast per-group scales back to w's shape."""
    if granularity == "tensor":
        return scale.expand(w.numel()).view(w.shape)
    if granularity == "channel":
        return scale.view(-1, *[1] * (w.dim() - 1)).expand(w.shape)
    return scale.repeat_interleave(granularity)[: w.numel()].view(w.shape)


@pytest.mark.parametrize("quantize", [absmax_quantize, zeropoint_quantize])
@pytest.mark.parametrize("granularity", ["tensor", "channel", 16])
def test_int_all_zeros(quantize, granularity):
    q = quantize(torch.zeros(4, 40), 4, granularity)
    back = q.dequantize()
    assert not bool(back.isnan().any()) and bool((back == 0).all())


def test_channel_scales_are_per_row():
    w = torch.tensor([[1.0, -2.0], [0.5, 0.25]])
    q = absmax_quantize(w, 8, "channel")
    torch.testing.assert_close(q.scale, torch.tensor([2 / 127, 0.5 / 127]))
    assert q.codes.tolist() == [[64, -127], [127, 64]]


# ---------------------------------------------------------------------------------------------------------
# Blockwise codebook quantization
# ---------------------------------------------------------------------------------------------------------


def _codes(qw: QuantizedWeight) -> torch.Tensor:
    return unpack(qw.packed, qw.bits, qw.n_blocks * qw.block_size)[: qw.numel].long()


def _scales(qw: QuantizedWeight) -> torch.Tensor:
    return qw.scales.dequantize() if isinstance(qw.scales, DoubleQuantizedScales) else qw.scales


@fast
@given(w=weights(), bits=st.sampled_from([2, 3, 4]), block_size=st.sampled_from([16, 64, 256]), dq=st.booleans())
def test_nf_dequantize_lands_on_codebook_times_scale(w, bits, block_size, dq):
    qw = nf_quantize(w, bits, block_size, double_quant=dq)
    back = qw.dequantize()
    assert back.shape == w.shape and back.dtype == torch.float32
    scale = _scales(qw).repeat_interleave(block_size)[: w.numel()]
    expected = qw.codebook[_codes(qw)] * scale  # exactly codebook value times block scale
    assert torch.equal(back.reshape(-1), expected)


@fast
@given(w=weights(), bits=st.sampled_from([2, 3, 4]))
def test_nf_codes_are_nearest(w, bits):
    qw = nf_quantize(w, bits, 64)
    absmax = qw.scales.repeat_interleave(64)[: w.numel()]
    scaled = w.reshape(-1) / absmax.clamp(min=1e-30)
    dist = (scaled[:, None] - qw.codebook[None, :]).abs()  # (numel, 2^bits)
    chosen = dist.gather(1, _codes(qw)[:, None]).squeeze(1)
    assert bool((chosen <= dist.min(dim=1).values + 1e-6).all())
    half_gap = (qw.codebook[1:] - qw.codebook[:-1]).max() / 2
    assert bool(((w.reshape(-1) - qw.dequantize().reshape(-1)).abs() <= half_gap * absmax * (1 + 1e-6)).all())


@pytest.mark.parametrize("shape", ODD_SHAPES)
@pytest.mark.parametrize("fmt", ["nf4", "nf3", "nf2", "fp4", "int4", "int3", "int8"])
def test_odd_shapes_round_trip(shape, fmt):
    w = randn(shape, seed=1)
    bits = int(fmt[-1])
    qw = {"nf": lambda: nf_quantize(w, bits), "fp": lambda: fp4_quantize(w), "in": lambda: int_quantize(w, bits)}[
        fmt[:2]
    ]()
    assert qw.format == fmt and qw.shape == shape and qw.numel == w.numel()
    assert qw.n_blocks == math.ceil(w.numel() / 64)
    assert qw.packed.numel() == qw.n_blocks * 64 * bits // 8
    back = qw.dequantize()
    assert back.shape == w.shape and bool(back.isfinite().all())
    absmax = w.abs().max()
    assert float((back - w).abs().max()) <= 0.5 * float(absmax)  # loose: 2 bits is coarse
    if fmt == "nf4":
        assert float((back - w).abs().max()) <= 0.17 * float(absmax)  # half the widest NF4 gap (1 - 0.723) / 2


def test_all_zero_blocks_dequantize_to_exact_zeros():
    w = randn((4, 64), seed=2)
    w[1] = 0.0  # one whole block of zeros
    for qw in [nf_quantize(w), nf_quantize(w, double_quant=True), fp4_quantize(w), int_quantize(w, 4)]:
        back = qw.dequantize()
        assert not bool(back.isnan().any())
        assert bool((back[1] == 0).all()), qw.format
    assert bool((nf_quantize(torch.zeros(3, 7)).dequantize() == 0).all())
    assert bool((nf_quantize(torch.zeros(1000), double_quant=True).dequantize() == 0).all())


def test_int_quantize_matches_absmax_quantize():
    w = randn((37, 129), seed=3)
    for bits in [2, 3, 4, 5, 8]:
        qw = int_quantize(w, bits, block_size=16)
        assert torch.equal(qw.dequantize(), absmax_quantize(w, bits, 16).dequantize())
        assert int(_codes(qw).max()) <= 2 * (2 ** (bits - 1) - 1)


def test_quantize_by_format_name():
    w = randn((8, 64), seed=10)
    for fmt in ["nf2", "nf3", "nf4", "fp4", "int2", "int5", "int8"]:
        qw = quantize(w, fmt, block_size=32, double_quant=True)
        assert qw.format == fmt and qw.block_size == 32 and qw.double_quant
    assert torch.equal(quantize(w, "nf4").dequantize(), nf_quantize(w).dequantize())
    assert torch.equal(quantize(w, "int4").dequantize(), int_quantize(w, 4).dequantize())
    with pytest.raises(ValueError, match=r"fmt='nf5' is not a known format; use one of nf2, nf3, nf4, fp4, int2"):
        quantize(w, "nf5")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_in_and_out(dtype):
    w = randn((8, 64), seed=4).to(dtype)
    qw = nf_quantize(w)
    assert torch.equal(qw.dequantize(), nf_quantize(w.float()).dequantize())
    assert qw.dequantize(dtype).dtype == dtype and dequantize(qw, torch.bfloat16).dtype == torch.bfloat16


def test_device_round_trip():
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    w = randn((16, 80), seed=5)
    ref = nf_quantize(w, double_quant=True).dequantize()
    for device in devices:
        qw = nf_quantize(w.to(device), double_quant=True)
        assert qw.device.type == device and qw.codebook.device.type == device
        torch.testing.assert_close(qw.dequantize().cpu(), ref, rtol=0, atol=1e-6)
        assert torch.equal(qw.to("cpu").dequantize(), qw.dequantize().cpu())


# ---------------------------------------------------------------------------------------------------------
# Double quantization and bits per parameter
# ---------------------------------------------------------------------------------------------------------


def test_double_quantize_error_is_half_a_code_step():
    scales = randn((5000,), seed=6).abs() + 0.1
    dq = double_quantize(scales)
    assert dq.codes.dtype == torch.uint8 and dq.codes.numel() == 5000 and dq.absmax.shape == (20,)
    torch.testing.assert_close(dq.offset, scales.mean())
    back = dq.dequantize()
    assert back.shape == scales.shape
    half_gap = (dq.codebook[1:] - dq.codebook[:-1]).max() / 2  # 0.9 / 128 / 2
    bound = half_gap * dq.absmax.repeat_interleave(256)[:5000] * (1 + 1e-6) + 1e-7
    assert bool(((back - scales).abs() <= bound).all())


def test_constant_scales_survive_double_quantization():
    back = double_quantize(torch.full((300,), 0.25)).dequantize()
    assert bool((back == 0.25).all())


def test_bits_per_param_nf4_block_64():
    w = randn((1024, 1024), seed=7)
    plain, dq = nf_quantize(w, 4, 64), nf_quantize(w, 4, 64, double_quant=True)
    assert plain.nbytes == 1024 * 1024 // 2 + 16384 * 4
    assert plain.bits_per_param == 4.5
    # codes + one byte per block scale + fp32 absmax per 256 scales + the fp32 offset
    assert dq.nbytes == 1024 * 1024 // 2 + 16384 + 64 * 4 + 4
    assert round(dq.bits_per_param, 3) == 4.127 == round(4 + 8 / 64 + 32 / (64 * 256), 3)
    assert "4.127 bits/param" in repr(dq) and "4.500 bits/param" in repr(plain)


def test_bits_per_param_counts_the_padding():
    qw = nf_quantize(randn((5, 130)), 4, 64)  # 650 weights -> 11 blocks -> 704 codes
    assert qw.nbytes == 704 // 2 + 11 * 4
    assert qw.bits_per_param == pytest.approx(8 * qw.nbytes / 650)
    assert nf_quantize(randn((5, 130)), 4, 64, double_quant=True).nbytes == 704 // 2 + 11 + 4 + 4  # 11 scale codes
    assert int_quantize(randn((1024,)), 3, 64).nbytes == 1024 * 3 // 8 + 16 * 4


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [0, -64, 100, 8, 8192, True, 64.0])
def test_bad_block_size(block_size):
    with pytest.raises(ValueError, match=r"block_size=.* is not supported; use a power of two from 16 to 4096"):
        nf_quantize(torch.randn(128), block_size=block_size)
    with pytest.raises(ValueError, match=r"is not supported; use a power of two from 16 to 4096"):
        int_quantize(torch.randn(128), 4, block_size=block_size)


def test_bad_bits():
    with pytest.raises(ValueError, match=r"bits=5 is not supported for NF codebooks; use 2, 3 or 4"):
        nf_quantize(torch.randn(64), bits=5)
    with pytest.raises(ValueError, match=r"bits=1 is not supported for integer quantizers; use 2, 3, 4, 5, 6, 7 or 8"):
        absmax_quantize(torch.randn(64), bits=1)
    with pytest.raises(ValueError, match=r"bits=9 is not supported"):
        zeropoint_quantize(torch.randn(64), bits=9)
    with pytest.raises(ValueError, match=r"bits=16 is not supported for int_quantize"):
        int_quantize(torch.randn(64), bits=16)


def test_bad_granularity():
    with pytest.raises(ValueError, match=r"granularity='row' is not supported; use 'tensor', 'channel' or a block"):
        absmax_quantize(torch.randn(4, 4), 8, "row")
    with pytest.raises(ValueError, match=r"granularity='channel' .* got shape \(16,\)"):
        absmax_quantize(torch.randn(16), 8, "channel")
    with pytest.raises(ValueError, match=r"granularity=100 is not supported"):
        zeropoint_quantize(torch.randn(4, 4), 8, 100)


@pytest.mark.parametrize(
    "fn", [nf_quantize, fp4_quantize, int_quantize, absmax_quantize, zeropoint_quantize, double_quantize]
)
def test_bad_tensors(fn):
    with pytest.raises(TypeError, match=r"has dtype torch.int64; quantizers take float tensors"):
        fn(torch.arange(64))
    with pytest.raises(TypeError, match="must be a torch.Tensor; got list"):
        fn([1.0, 2.0])
    with pytest.raises(ValueError, match=r"is empty \(shape \(0, 4\)\)"):
        fn(torch.zeros(0, 4))
    w = torch.randn(64)
    w[[3, 9]] = float("nan")
    w[20] = float("inf")
    with pytest.raises(ValueError, match=r"has 3 NaN/inf value\(s\) out of 64"):
        fn(w)


def test_values_beyond_float32_are_caught():
    with pytest.raises(ValueError, match=r"1 NaN/inf value\(s\) out of 2 \(after conversion to float32\)"):
        nf_quantize(torch.tensor([1.0, 1e300], dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------------
# Equality with bitsandbytes
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bnbf():
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnbf

    return bnbf


def _bnb_codes(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """bitsandbytes' packed NF4 bytes -> codes (its order: first code in the high nibble)."""
    flat = packed.reshape(-1)
    return torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)[:numel].long()


def test_codebooks_equal_bitsandbytes_bit_for_bit(bnbf):
    assert torch.equal(nf_codebook(4), bnbf.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_codebook(), bnbf.create_dynamic_map(signed=True))


@pytest.mark.parametrize("shape", [(1024, 1024), *ODD_SHAPES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_equals_bitsandbytes(bnbf, shape, dtype):
    w = randn(shape, seed=8).to(dtype)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    qw = nf_quantize(w, 4, 64)
    assert torch.equal(_codes(qw), _bnb_codes(packed, w.numel()))
    assert torch.equal(qw.packed[: packed.numel()], packed.reshape(-1)), "same nibble order, so same bytes"
    assert torch.equal(qw.scales, state.absmax)
    theirs = bnbf.dequantize_4bit(packed, state)
    # bitsandbytes quirk: its CPU kernel returns a 1-D weight of even length as (1, n); we keep (n,).
    theirs = theirs.view(w.shape) if theirs.shape == (1, w.numel()) and w.dim() == 1 else theirs
    ours = qw.dequantize(dtype)
    assert ours.shape == theirs.shape == w.shape and ours.dtype == theirs.dtype
    assert float((ours.float() - theirs.float()).abs().max()) == 0.0


def test_nf4_ties_match_bitsandbytes(bnbf):
    cb = nf_codebook(4)
    midpoints = (cb[:-1] + cb[1:]) / 2  # exactly halfway between neighbours, in fp32
    block = torch.cat([torch.tensor([1.0]), midpoints, torch.zeros(64 - 16)])  # absmax 1: scaling is exact
    w = torch.cat([block, 2 * block])  # and a second block, absmax 2: still exact (a power of two)
    packed, _ = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    ours = _codes(nf_quantize(w))
    assert torch.equal(ours, _bnb_codes(packed, 128))
    assert ours[1:16].tolist() == ours[65:80].tolist() == list(range(15)), "a tie goes to the lower entry"


def test_nf4_double_quant_agrees_with_bitsandbytes(bnbf):
    w = randn((1024, 1024), seed=9)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    qw = nf_quantize(w, 4, 64, double_quant=True)
    dq, n = qw.scales, qw.n_blocks
    assert torch.equal(_codes(qw), _bnb_codes(packed, w.numel())), "4-bit codes use the fp32 absmax in both"
    assert torch.equal(dq.offset, state.offset) and torch.equal(dq.absmax, state.state2.absmax)
    assert torch.equal(dq.codebook, state.state2.code)

    # 8-bit scale codes: bitsandbytes' CPU kernel rounds values within ~1e-5 of a midpoint either way, and
    # never to the tiny codes around 0; ours are exactly nearest. So: the same for almost all, never worse.
    same = dq.codes == state.absmax
    assert float(same.float().mean()) > 0.99
    true_scales = nf_quantize(w, 4, 64).scales
    theirs = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    assert bool(((dq.dequantize() - true_scales).abs() <= (theirs - true_scales).abs() + 1e-7).all())

    # Given the same stored state, our dequantization is theirs, to fp32 rounding.
    bnb_dq = DoubleQuantizedScales(state.absmax, state.state2.absmax, state.offset, state.state2.code, 256, n)
    from_theirs = QuantizedWeight(packed.reshape(-1), bnb_dq, tuple(w.shape), 64, "nf4", 4, nf_codebook(4))
    expected = bnbf.dequantize_4bit(packed, state)
    torch.testing.assert_close(from_theirs.dequantize(), expected, rtol=0, atol=1e-6 * float(w.abs().max()))

    # And our own double-quantized weight equals theirs wherever the scale codes agree.
    ours = qw.dequantize().reshape(n, 64)[same]
    torch.testing.assert_close(ours, expected.reshape(n, 64)[same], rtol=0, atol=1e-6 * float(w.abs().max()))


@pytest.mark.parametrize("fmt", ["nf2", "nf3", "nf4", "fp4", "int2", "int3", "int4", "int8"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_fast_dequantize_equals_the_textbook_lookup(fmt, double_quant):
    """The word-table fast path must equal codebook[code] * scale, element for element."""
    from lq_edu.quant import quantize

    w = torch.randn(5, 130, generator=torch.Generator().manual_seed(1))
    qw = quantize(w, fmt, block_size=32, double_quant=double_quant)
    scales = qw.scales.dequantize() if double_quant else qw.scales
    textbook = (qw.codebook[qw.codes().long()] * scales[:, None]).reshape(-1)[: w.numel()].view(w.shape)
    assert torch.equal(qw.dequantize(), textbook)


def test_codes_are_the_unpacked_packed_state():
    w = torch.randn(3, 100, generator=torch.Generator().manual_seed(0))
    qw = nf_quantize(w, 4, block_size=64)
    codes = qw.codes()
    assert codes.shape == (qw.n_blocks, 64) and codes.dtype == torch.uint8
    values = qw.codebook[codes.long()] * qw.scales[:, None]
    torch.testing.assert_close(values.reshape(-1)[: w.numel()].view(w.shape), qw.dequantize())


def test_word_reading_is_the_same_on_old_torch(monkeypatch):
    """torch < 2.3 has no uint16: the signed-view-and-mask fallback must read the same words."""
    from lq_edu.quant import _words

    packed = torch.randint(0, 256, (1000,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    new = _words(packed)
    monkeypatch.delattr(torch, "uint16")
    old = _words(packed)
    assert torch.equal(new, old) and int(old.min()) >= 0 and int(old.max()) <= 0xFFFF
