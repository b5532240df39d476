"""Float formats, bit by bit: what fp32, bf16, fp8 and fp4 can and cannot hold.

Every floating-point format in this course is the same recipe with different
field widths::

    [ sign | exponent (E bits) | mantissa (M bits) ]

    normal     (exponent field e > 0):  (-1)^s * (1 + m / 2^M) * 2^(e - bias)
    subnormal  (exponent field e = 0):  (-1)^s * (    m / 2^M) * 2^(1 - bias)

More exponent bits buy *range* (how large and how small); more mantissa bits
buy *precision* (how many values between two powers of two). That trade is
why bf16 (8 exponent bits) trains where fp16 (5) overflows, and why an 8-bit
or 4-bit float alone is too coarse to hold weights without a scale.

Formats differ in what the all-ones exponent means:

- IEEE style (fp32, fp16, bf16, fp8 e5m2), ``has_inf=True``: the top exponent
  is reserved: mantissa 0 is ±inf, anything else is NaN.
- "fn" style (fp8 e4m3fn, the OCP / NVIDIA convention), ``has_inf=False,
  has_nan=True``: the top exponent holds ordinary numbers, except the single
  all-ones pattern, which is NaN. One code lost instead of eight: max 448.
- No specials (fp4 e2m1), ``has_inf=False, has_nan=False``: every code is a number.

This module works on one Python float at a time, for reading and teaching;
it is not a fast tensor cast. It leaves out NaN payloads (every NaN encodes
to one canonical pattern) and signalling NaNs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch


@dataclass(frozen=True)
class FloatFormat:
    """A sign-exponent-mantissa float format.

    ``has_inf``: the top exponent is reserved for ±inf and NaN (IEEE style).
    ``has_nan``: some pattern means NaN. Without inf, only the all-ones
    pattern (per sign) does, as in fp8 e4m3fn.
    """

    name: str
    exponent_bits: int
    mantissa_bits: int
    bias: int
    has_inf: bool
    has_nan: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.exponent_bits, int) or self.exponent_bits < 1:
            raise ValueError(f"exponent_bits={self.exponent_bits!r} for {self.name}; use an int of at least 1")
        if not isinstance(self.mantissa_bits, int) or self.mantissa_bits < 0:
            raise ValueError(f"mantissa_bits={self.mantissa_bits!r} for {self.name}; use an int of at least 0")
        if self.has_inf and not self.has_nan:
            raise ValueError(
                f"{self.name}: has_inf=True with has_nan=False is not a format this module knows; "
                "IEEE-style formats reserve the top exponent for both inf and NaN, so set has_nan=True"
            )

    @property
    def bits(self) -> int:
        """Total width in bits: 1 sign + exponent + mantissa."""
        return 1 + self.exponent_bits + self.mantissa_bits

    @property
    def max_exponent_field(self) -> int:
        """Largest exponent field that still holds finite numbers."""
        top = 2**self.exponent_bits - 1
        return top - 1 if self.has_inf else top

    @property
    def max_normal(self) -> float:
        """Largest finite value. fp16: 65504; bf16: about 3.39e38; fp8 e4m3: 448."""
        largest_mantissa = 2**self.mantissa_bits - 1
        if self.has_nan and not self.has_inf:
            largest_mantissa -= 1  # the all-ones pattern is NaN, so the top code is one step down
        return math.ldexp(1 + largest_mantissa / 2**self.mantissa_bits, self.max_exponent_field - self.bias)

    @property
    def min_normal(self) -> float:
        """Smallest positive normal value, 2^(1 - bias): below it, precision starts to drain away."""
        return math.ldexp(1.0, 1 - self.bias)

    @property
    def min_subnormal(self) -> float:
        """Smallest positive value, 2^(1 - bias - M): anything much smaller rounds to zero."""
        return math.ldexp(1.0, 1 - self.bias - self.mantissa_bits)

    @property
    def epsilon(self) -> float:
        """Machine epsilon, 2^-M: the gap between 1.0 and the next value up (same as ``torch.finfo().eps``)."""
        return math.ldexp(1.0, -self.mantissa_bits)

    @property
    def decimal_digits(self) -> float:
        """Significant decimal digits a value carries, (M + 1) * log10(2). fp32: 7.2, fp16: 3.3, bf16: 2.4."""
        return (self.mantissa_bits + 1) * math.log10(2)

    def __str__(self) -> str:
        layout = f"1 sign + {self.exponent_bits} exponent + {self.mantissa_bits} mantissa bits"
        return f"{self.name} ({layout}, bias {self.bias})"


FP32 = FloatFormat("fp32", exponent_bits=8, mantissa_bits=23, bias=127, has_inf=True)
FP16 = FloatFormat("fp16", exponent_bits=5, mantissa_bits=10, bias=15, has_inf=True)
BF16 = FloatFormat("bf16", exponent_bits=8, mantissa_bits=7, bias=127, has_inf=True)
FP8_E4M3 = FloatFormat("fp8_e4m3", exponent_bits=4, mantissa_bits=3, bias=7, has_inf=False, has_nan=True)
FP8_E5M2 = FloatFormat("fp8_e5m2", exponent_bits=5, mantissa_bits=2, bias=15, has_inf=True)
FP4_E2M1 = FloatFormat("fp4_e2m1", exponent_bits=2, mantissa_bits=1, bias=1, has_inf=False, has_nan=False)

FLOAT_FORMATS: dict[str, FloatFormat] = {f.name: f for f in (FP32, FP16, BF16, FP8_E4M3, FP8_E5M2, FP4_E2M1)}


class FloatFields(NamedTuple):
    """The three raw bit fields of an encoded value, as unsigned integers."""

    sign: int  # 0 or 1
    exponent: int  # biased exponent field, 0 .. 2^E - 1
    mantissa: int  # fraction field, 0 .. 2^M - 1


def _split(bits: int, fmt: FloatFormat) -> FloatFields:
    mantissa = bits & (2**fmt.mantissa_bits - 1)
    exponent = (bits >> fmt.mantissa_bits) & (2**fmt.exponent_bits - 1)
    sign = bits >> (fmt.exponent_bits + fmt.mantissa_bits)
    return FloatFields(sign, exponent, mantissa)


def _join(sign: int, exponent: int, mantissa: int, fmt: FloatFormat) -> int:
    return (sign << (fmt.exponent_bits + fmt.mantissa_bits)) | (exponent << fmt.mantissa_bits) | mantissa


def _nan_bits(fmt: FloatFormat) -> int:
    """The one NaN pattern ``encode`` writes: the quiet NaN (top mantissa bit set) or, without inf, all ones."""
    top = 2**fmt.exponent_bits - 1
    if fmt.has_inf:
        return _join(0, top, 2 ** max(fmt.mantissa_bits - 1, 0), fmt)
    return _join(0, top, 2**fmt.mantissa_bits - 1, fmt)


def decode_bits(bits: int, fmt: FloatFormat) -> float:
    """The value a bit pattern stands for, as a Python float (exact: every format here fits in a double).

    ``bits`` is the pattern as an unsigned integer, 0 .. 2^fmt.bits - 1, e.g.
    ``decode_bits(0x3C00, FP16) == 1.0``.
    """
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"bits={bits!r} is a {type(bits).__name__}; pass the pattern as an int, e.g. 0x3C00")
    if not 0 <= bits < 2**fmt.bits:
        raise ValueError(
            f"bits={bits} does not fit {fmt.name}; "
            f"use 0 .. {2**fmt.bits - 1} (the pattern as an unsigned {fmt.bits}-bit int)"
        )
    sign, exponent, mantissa = _split(bits, fmt)
    top = 2**fmt.exponent_bits - 1
    if fmt.has_inf and exponent == top:  # IEEE specials
        return math.nan if mantissa else (-math.inf if sign else math.inf)
    if fmt.has_nan and not fmt.has_inf and exponent == top and mantissa == 2**fmt.mantissa_bits - 1:
        return math.nan  # fn style: only all-ones is NaN
    if exponent == 0:  # subnormal: no implicit leading 1, exponent pinned at 1 - bias
        magnitude = math.ldexp(mantissa, 1 - fmt.bias - fmt.mantissa_bits)
    else:  # normal: implicit leading 1
        magnitude = math.ldexp(2**fmt.mantissa_bits + mantissa, exponent - fmt.bias - fmt.mantissa_bits)
    return -magnitude if sign else magnitude


def encode(x: float, fmt: FloatFormat) -> int:
    """The bit pattern of ``x`` in ``fmt``, rounding to nearest, ties to even.

    Too large a value becomes ±inf where the format has inf (IEEE behaviour)
    and saturates to ±max_normal where it has none (fp8 e4m3, fp4): a
    quantizer would rather clip than lose the value. NaN encodes to the
    format's canonical NaN pattern; fp4 has none, so NaN is an error there.
    The sign of zero is kept: ``encode(-0.0, FP16) == 0x8000``.
    """
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"x={x!r} is a {type(x).__name__}; pass a Python float (use .item() on a tensor)")
    x = float(x)
    if math.isnan(x):
        if not fmt.has_nan:
            raise ValueError(f"{fmt.name} has no NaN pattern, so NaN cannot be encoded; filter NaNs out first")
        return _nan_bits(fmt)
    sign = 1 if math.copysign(1.0, x) < 0 else 0
    magnitude = abs(x)

    # 1. Round the magnitude onto the grid of the binade it falls in.
    if math.isinf(magnitude):
        rounded = math.inf  # beyond every finite value: step 2 treats it as overflow
    else:
        if magnitude < fmt.min_normal:
            step = fmt.min_subnormal  # subnormals share one even spacing
        else:
            _, e = math.frexp(magnitude)  # magnitude = f * 2^e with 0.5 <= f < 1
            step = math.ldexp(1.0, e - 1 - fmt.mantissa_bits)  # spacing of values in [2^(e-1), 2^e)
        rounded = round(magnitude / step) * step  # Python's round() breaks ties to even; the division is exact

    # 2. Overflow: inf if the format has it, otherwise clip to the largest value.
    if rounded > fmt.max_normal:
        if fmt.has_inf:
            return _join(sign, 2**fmt.exponent_bits - 1, 0, fmt)
        rounded = fmt.max_normal

    # 3. Write the fields of the (now exactly representable) value.
    if rounded < fmt.min_normal:
        return _join(sign, 0, int(rounded / fmt.min_subnormal), fmt)
    _, e = math.frexp(rounded)
    exponent = e - 1 + fmt.bias
    mantissa = int(math.ldexp(rounded, -(e - 1) + fmt.mantissa_bits)) - 2**fmt.mantissa_bits
    return _join(sign, exponent, mantissa, fmt)


def round_to(x: float, fmt: FloatFormat) -> float:
    """``x`` rounded to the nearest value ``fmt`` can hold: ``decode_bits(encode(x, fmt), fmt)``."""
    return decode_bits(encode(x, fmt), fmt)


def fields(x: float, fmt: FloatFormat) -> FloatFields:
    """Sign, biased exponent and mantissa fields of ``x`` once rounded into ``fmt``.

    ``fields(1.5, FP16) == FloatFields(sign=0, exponent=15, mantissa=512)``:
    1.5 = (1 + 512/1024) * 2^(15 - 15).
    """
    return _split(encode(x, fmt), fmt)


def explain(x: float, fmt: FloatFormat) -> str:
    """One line showing how ``x`` is stored, e.g. ``fp16  0 10001 0100000000  = +1.25 * 2^2 = 5.0``."""
    bits = encode(x, fmt)
    s, e, m = _split(bits, fmt)
    pattern = (
        f"{s} {e:0{fmt.exponent_bits}b} {m:0{fmt.mantissa_bits}b}"
        if fmt.mantissa_bits
        else f"{s} {e:0{fmt.exponent_bits}b}"
    )
    value = decode_bits(bits, fmt)
    sign = "-" if s else "+"
    if math.isnan(value) or math.isinf(value):
        return f"{fmt.name}  {pattern}  = {value}"
    if e == 0:
        return f"{fmt.name}  {pattern}  = {sign}({m}/{2**fmt.mantissa_bits}) * 2^{1 - fmt.bias} = {value!r} (subnormal)"
    return f"{fmt.name}  {pattern}  = {sign}{1 + m / 2**fmt.mantissa_bits:g} * 2^{e - fmt.bias} = {value!r}"


def representable_values(fmt: FloatFormat) -> torch.Tensor:
    """Every distinct finite value of a format of at most 8 bits, sorted. Shape (n,), float32.

    +0 and -0 count once. fp4 e2m1 gives 15 values, fp8 e4m3 253, fp8 e5m2 247.
    Plotting them shows the point of floats: dense near zero, sparse far out.
    """
    if fmt.bits > 8:
        raise ValueError(
            f"{fmt.name} has {fmt.bits} bits ({2**fmt.bits} patterns); representable_values lists formats of "
            "at most 8 bits; for wider ones call decode_bits on the patterns you care about"
        )
    values = [decode_bits(b, fmt) for b in range(2**fmt.bits)]
    finite = torch.tensor([v for v in values if math.isfinite(v)], dtype=torch.float32)
    return torch.unique(finite)  # sorted, and -0.0 == 0.0 so zero appears once
