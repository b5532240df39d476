"""Float formats: decoding agrees with torch bit for bit, encoding rounds like torch, limits match finfo."""

from __future__ import annotations

import math
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lq_edu.formats import (
    BF16,
    FLOAT_FORMATS,
    FP4_E2M1,
    FP8_E4M3,
    FP8_E5M2,
    FP16,
    FP32,
    FloatFields,
    FloatFormat,
    decode_bits,
    encode,
    explain,
    fields,
    representable_values,
    round_to,
)

HAS_FP8 = hasattr(torch, "float8_e4m3fn") and hasattr(torch, "float8_e5m2")
needs_fp8 = pytest.mark.skipif(not HAS_FP8, reason="this torch has no float8 dtypes")


def _torch_peers() -> list[tuple[FloatFormat, torch.dtype, torch.dtype]]:
    """(our format, torch float dtype, same-width int dtype to reinterpret bits)."""
    peers = [(FP16, torch.float16, torch.int16), (BF16, torch.bfloat16, torch.int16)]
    if HAS_FP8:
        peers += [(FP8_E4M3, torch.float8_e4m3fn, torch.uint8), (FP8_E5M2, torch.float8_e5m2, torch.uint8)]
    return peers


PEERS = _torch_peers()
PEER_IDS = [f.name for f, _, _ in PEERS]


def _torch_values(dtype: torch.dtype, int_dtype: torch.dtype, n_bits: int) -> list[float]:
    """torch's value for every bit pattern 0 .. 2^n_bits - 1 of ``dtype``."""
    patterns = torch.arange(2**n_bits, dtype=torch.int64)
    if int_dtype == torch.int16:  # int16 holds patterns >= 0x8000 as negatives
        patterns = torch.where(patterns >= 2**15, patterns - 2**16, patterns)
    return patterns.to(int_dtype).view(dtype).to(torch.float64).tolist()


def _torch_bits(x: torch.Tensor, dtype: torch.dtype, int_dtype: torch.dtype, n_bits: int) -> list[int]:
    """Unsigned bit patterns of ``x`` cast to ``dtype`` by torch."""
    return [b % 2**n_bits for b in x.to(dtype).view(int_dtype).to(torch.int64).tolist()]


# --- the layouts -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "bits", "max_normal", "min_normal", "min_subnormal", "epsilon"),
    [
        (FP32, 32, 3.4028234663852886e38, 2.0**-126, 2.0**-149, 2.0**-23),
        (FP16, 16, 65504.0, 2.0**-14, 2.0**-24, 2.0**-10),
        (BF16, 16, 3.3895313892515355e38, 2.0**-126, 2.0**-133, 2.0**-7),
        (FP8_E4M3, 8, 448.0, 2.0**-6, 2.0**-9, 0.125),
        (FP8_E5M2, 8, 57344.0, 2.0**-14, 2.0**-16, 0.25),
        (FP4_E2M1, 4, 6.0, 1.0, 0.5, 0.5),
    ],
    ids=lambda v: v.name if isinstance(v, FloatFormat) else None,
)
def test_limits_written_out(fmt, bits, max_normal, min_normal, min_subnormal, epsilon):
    assert fmt.bits == bits
    assert fmt.max_normal == max_normal
    assert fmt.min_normal == min_normal
    assert fmt.min_subnormal == min_subnormal
    assert fmt.epsilon == epsilon


@pytest.mark.parametrize(
    ("fmt", "dtype"),
    [(FP32, torch.float32), (FP16, torch.float16), (BF16, torch.bfloat16)]
    + ([(FP8_E4M3, torch.float8_e4m3fn), (FP8_E5M2, torch.float8_e5m2)] if HAS_FP8 else []),
    ids=lambda v: v.name if isinstance(v, FloatFormat) else str(v),
)
def test_limits_match_torch_finfo(fmt, dtype):
    info = torch.finfo(dtype)
    assert fmt.bits == info.bits
    assert fmt.max_normal == info.max
    assert -fmt.max_normal == info.min
    assert fmt.min_normal == info.smallest_normal
    assert fmt.epsilon == info.eps


def test_decimal_digits():
    assert round(FP32.decimal_digits, 2) == 7.22
    assert round(FP16.decimal_digits, 2) == 3.31
    assert round(BF16.decimal_digits, 2) == 2.41
    assert FP16.decimal_digits > BF16.decimal_digits  # fp16 trades range for precision


def test_format_registry_and_str():
    assert set(FLOAT_FORMATS) == {"fp32", "fp16", "bf16", "fp8_e4m3", "fp8_e5m2", "fp4_e2m1"}
    assert str(FP8_E4M3) == "fp8_e4m3 (1 sign + 4 exponent + 3 mantissa bits, bias 7)"


def test_bad_format_definitions_are_explained():
    with pytest.raises(ValueError, match="exponent_bits=0"):
        FloatFormat("bad", exponent_bits=0, mantissa_bits=3, bias=0, has_inf=False)
    with pytest.raises(ValueError, match="set has_nan=True"):
        FloatFormat("bad", exponent_bits=4, mantissa_bits=3, bias=7, has_inf=True, has_nan=False)


# --- decoding: bit for bit against torch ------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "dtype", "int_dtype"), PEERS, ids=PEER_IDS)
def test_decode_matches_torch_for_every_pattern(fmt, dtype, int_dtype):
    expected = _torch_values(dtype, int_dtype, fmt.bits)
    n_finite = 0
    for bits, want in enumerate(expected):
        got = decode_bits(bits, fmt)
        if math.isnan(want):
            assert math.isnan(got), f"{fmt.name} pattern {bits:#x}: got {got}, torch says NaN"
            continue
        assert got == want, f"{fmt.name} pattern {bits:#x}: got {got}, torch says {want}"
        assert math.copysign(1, got) == math.copysign(1, want)  # -0.0 stays negative
        n_finite += math.isfinite(want)
    assert n_finite == {"fp16": 63488, "bf16": 65280, "fp8_e4m3": 254, "fp8_e5m2": 248}[fmt.name]


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_decode_fp32_matches_struct(bits):
    want = struct.unpack("<f", struct.pack("<I", bits))[0]
    got = decode_bits(bits, FP32)
    assert (math.isnan(got) and math.isnan(want)) or got == want


def test_decode_written_out():
    assert decode_bits(0x3C00, FP16) == 1.0
    assert decode_bits(0x7BFF, FP16) == 65504.0
    assert decode_bits(0x0001, FP16) == 2.0**-24  # smallest subnormal
    assert decode_bits(0x7C00, FP16) == math.inf
    assert math.isnan(decode_bits(0x7F, FP8_E4M3))  # e4m3fn: only all-ones is NaN ...
    assert decode_bits(0x78, FP8_E4M3) == 256.0  # ... the top exponent still holds numbers
    assert decode_bits(0x7C, FP8_E5M2) == math.inf  # e5m2 is IEEE-style
    assert decode_bits(0b0111, FP4_E2M1) == 6.0


def test_decode_rejects_bad_patterns():
    with pytest.raises(ValueError, match=r"bits=256 does not fit fp8_e4m3; use 0 \.\. 255"):
        decode_bits(256, FP8_E4M3)
    with pytest.raises(ValueError, match="does not fit"):
        decode_bits(-1, FP16)
    with pytest.raises(TypeError, match="pass the pattern as an int"):
        decode_bits(1.0, FP16)


# --- encoding: round trips and rounding like torch ----------------------------------------------------------------


@pytest.mark.parametrize("fmt", [FP8_E4M3, FP8_E5M2, FP4_E2M1], ids=lambda f: f.name)
def test_encode_decode_round_trip_every_non_nan_pattern(fmt):
    """Every pattern that is not NaN comes back unchanged, -0.0 and ±inf included; NaN maps to one canonical code."""
    for bits in range(2**fmt.bits):
        value = decode_bits(bits, fmt)
        if math.isnan(value):
            continue
        assert encode(value, fmt) == bits, (
            f"{fmt.name} pattern {bits:#x} ({value}) came back as {encode(value, fmt):#x}"
        )


@pytest.mark.parametrize("fmt", [FP16, BF16], ids=lambda f: f.name)
def test_encode_decode_round_trip_16_bit(fmt):
    for bits in range(0, 2**16, 7):  # every 7th pattern: all exponents, both signs
        value = decode_bits(bits, fmt)
        if not math.isnan(value):
            assert encode(value, fmt) == bits


# float32 inputs, so torch's float32 -> dtype cast rounds once, exactly as encode does
float32s = st.floats(width=32, allow_nan=False)


@pytest.mark.parametrize(("fmt", "dtype", "int_dtype"), PEERS, ids=PEER_IDS)
@settings(max_examples=400, deadline=None)
@given(x=float32s)
def test_encode_matches_torch_cast(fmt, dtype, int_dtype, x):
    want = _torch_bits(torch.tensor([x], dtype=torch.float32), dtype, int_dtype, fmt.bits)[0]
    assert encode(x, fmt) == want, f"{fmt.name}: encode({x!r}) = {encode(x, fmt):#x}, torch gives {want:#x}"


@pytest.mark.parametrize(("fmt", "dtype", "int_dtype"), PEERS, ids=PEER_IDS)
def test_encode_matches_torch_on_ties_and_edges(fmt, dtype, int_dtype):
    """Midpoints between neighbours are where round-half-even shows; overflow and underflow edges too."""
    values = [decode_bits(b, fmt) for b in range(0, 2**fmt.bits, max(1, 2**fmt.bits // 4096))]
    finite = sorted({v for v in values if math.isfinite(v)})
    mids = [(a + b) / 2 for a, b in zip(finite, finite[1:], strict=False)]
    edges = [fmt.max_normal * 1.01, fmt.max_normal * 2, fmt.min_subnormal / 2, fmt.min_subnormal * 0.49, 1e38]
    xs = torch.tensor(mids + edges + [-e for e in edges], dtype=torch.float32)
    want = _torch_bits(xs, dtype, int_dtype, fmt.bits)
    got = [encode(x, fmt) for x in xs.tolist()]
    assert got == want


def test_rounding_written_out():
    assert encode(65519.99, FP16) == 0x7BFF  # just under max + half a step: rounds down to 65504
    assert encode(65520.0, FP16) == 0x7C00  # exactly halfway, ties to even: overflows to inf
    assert encode(1 + 2**-11, FP16) == 0x3C00  # tie between 1 and 1 + 2^-10: even mantissa (1.0) wins
    assert encode(1 + 3 * 2**-11, FP16) == 0x3C02  # tie between odd 0x3C01 and even 0x3C02
    assert encode(1000.0, FP8_E4M3) == 0x7E  # no inf in e4m3: saturates to 448
    assert encode(-math.inf, FP8_E4M3) == 0xFE  # -448
    assert encode(1e6, FP8_E5M2) == 0x7C  # e5m2 has inf
    assert encode(100.0, FP4_E2M1) == 0b0111  # saturates to 6
    assert encode(2.5, FP4_E2M1) == encode(2.0, FP4_E2M1)  # tie between 2 (even) and 3 (odd)
    assert encode(-0.0, FP16) == 0x8000
    assert encode(1e-30, FP16) == 0x0000  # underflows to zero, sign kept
    assert encode(-1e-30, FP16) == 0x8000
    assert round_to(0.1, BF16) == 0.10009765625


def test_nan_encodes_canonically_or_is_refused():
    assert encode(math.nan, FP16) == 0x7E00
    assert encode(math.nan, FP32) == 0x7FC00000
    assert encode(math.nan, FP8_E4M3) == 0x7F
    assert math.isnan(decode_bits(encode(math.nan, FP8_E5M2), FP8_E5M2))
    with pytest.raises(ValueError, match="fp4_e2m1 has no NaN pattern"):
        encode(math.nan, FP4_E2M1)


def test_encode_rejects_non_numbers():
    with pytest.raises(TypeError, match=r"use \.item\(\) on a tensor"):
        encode(torch.tensor(1.0), FP16)
    with pytest.raises(TypeError, match="pass a Python float"):
        encode("1.0", FP16)


@settings(max_examples=300, deadline=None)
@given(x=st.floats(min_value=-448.0, max_value=448.0))
def test_rounding_error_is_at_most_half_a_step(x):
    """Round to nearest: the error is at most half the spacing at x (and half a subnormal near zero)."""
    y = round_to(x, FP8_E4M3)
    spacing = (
        FP8_E4M3.min_subnormal if abs(x) < FP8_E4M3.min_normal else 2.0 ** (math.frexp(x)[1] - 1) * FP8_E4M3.epsilon
    )
    assert abs(y - x) <= spacing / 2


# --- fields and explain -------------------------------------------------------------------------------------------


def test_fields():
    assert fields(1.5, FP16) == FloatFields(sign=0, exponent=15, mantissa=512)
    assert fields(-2.0, FP32) == (1, 128, 0)
    assert fields(2.0**-24, FP16) == (0, 0, 1)  # subnormal: exponent field 0
    assert fields(3.0, FP4_E2M1) == (0, 2, 1)  # 3 = 1.5 * 2^(2 - 1)


def test_explain_lines():
    assert explain(5.0, FP16) == "fp16  0 10001 0100000000  = +1.25 * 2^2 = 5.0"
    assert (
        explain(2.0**-23, FP16) == "fp16  0 00000 0000000010  = +(2/1024) * 2^-14 = 1.1920928955078125e-07 (subnormal)"
    )
    assert explain(-3.0, FP4_E2M1) == "fp4_e2m1  1 10 1  = -1.5 * 2^1 = -3.0"
    assert explain(math.inf, FP16) == "fp16  0 11111 0000000000  = inf"


# --- listing every value of a small format ------------------------------------------------------------------------


def test_fp4_values_exactly():
    magnitudes = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    expected = torch.tensor(sorted({-m for m in magnitudes} | set(magnitudes)), dtype=torch.float32)
    got = representable_values(FP4_E2M1)
    assert got.dtype == torch.float32
    assert torch.equal(got, expected)
    assert got.numel() == 15


@needs_fp8
@pytest.mark.parametrize(("fmt", "dtype", "count"), [(FP8_E4M3, "float8_e4m3fn", 253), (FP8_E5M2, "float8_e5m2", 247)])
def test_fp8_values_match_torch(fmt, dtype, count):
    patterns = torch.arange(256, dtype=torch.int64).to(torch.uint8).view(getattr(torch, dtype)).float()
    expected = torch.unique(patterns[torch.isfinite(patterns)])
    got = representable_values(fmt)
    assert got.numel() == count
    assert torch.equal(got, expected)
    assert bool((got[1:] > got[:-1]).all())  # sorted, no duplicates (one zero)


def test_representable_values_refuses_wide_formats():
    with pytest.raises(ValueError, match="fp16 has 16 bits .* at most 8 bits"):
        representable_values(FP16)
