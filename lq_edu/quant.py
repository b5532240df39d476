"""Quantizers: integer (absmax, zero-point), NF-k and FP4 codebooks, double quantization, bit packing.

Lesson 03's ``nf4_quantize``, grown up. The file reads in the order the lesson builds it:

1. integer quantizers: ``absmax_quantize`` (symmetric) and ``zeropoint_quantize`` (affine), per tensor,
   per output channel or per block;
2. codebooks: NF-k (normal quantiles with an exact zero, QLoRA), FP4 (E2M1), and the 8-bit dynamic code
   that double quantization stores the block scales in;
3. bit packing: ``pack`` / ``unpack`` for 1 to 8 bits per code (3 bits: 8 codes in 3 bytes);
4. blockwise quantization into a ``QuantizedWeight``: ``nf_quantize``, ``fp4_quantize``, ``int_quantize``,
   with optional double quantization of the scales (``DoubleQuantizedScales``);
5. ``dequantize``, with a 256-entry byte table so that one gather decodes every code in a byte.

Every stored weight means ``w ≈ codebook[code] * scale[block]``. For NF/FP the codebook lies in [-1, 1] and
the scale is the block's absmax; for intN the codebook is the integers -qmax..qmax and the scale is
absmax / qmax, so one ``dequantize`` serves every format.

NF4 matches bitsandbytes bit for bit: same codebook, same codes (ties go to the lower entry), same nibble
order (first code in the high nibble), same dequantized values (tests/test_quant.py checks all four).

Follows QLoRA (Dettmers et al., 2023). Leaves out: GPU kernels, stochastic rounding, quantized matmul (a
QuantLinear dequantizes and calls ``F.linear``), and storage dtypes other than uint8. Math runs in fp32 on
whatever device the input is on.
"""

from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F

Granularity = Literal["tensor", "channel"] | int

INT_BITS = (2, 3, 4, 5, 6, 7, 8)  # integer quantizers
NF_BITS = (2, 3, 4)  # NF-k codebooks
PACK_BITS = (1, 2, 3, 4, 5, 6, 7, 8)  # pack / unpack
BLOCK_SIZES = tuple(2**i for i in range(4, 13))  # 16, 32, ..., 4096: any power of two in that range
DQ_BLOCK_SIZE = 256  # block scales that share one second-level scale under double quantization (QLoRA)

# Blocks are scaled by 1 / max(absmax, tiny): an all-zero block stays 0 instead of NaN (0 * inf), as in
# bitsandbytes. A block whose absmax is below tiny (fp32 subnormals, < 1.2e-38) comes back as ~0.
_TINY = torch.finfo(torch.float32).tiny


# ---------------------------------------------------------------------------------------------------------
# Checking inputs
# ---------------------------------------------------------------------------------------------------------


def _choices(allowed: tuple[int, ...]) -> str:
    """(2, 3, 4) -> '2, 3 or 4'."""
    return ", ".join(map(str, allowed[:-1])) + f" or {allowed[-1]}" if len(allowed) > 1 else str(allowed[0])


def _check_bits(bits: object, allowed: tuple[int, ...], what: str) -> int:
    if isinstance(bits, bool) or bits not in allowed:
        raise ValueError(f"bits={bits!r} is not supported for {what}; use {_choices(allowed)}")
    return int(bits)


def _check_block_size(block_size: object, what: str = "block_size") -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size not in BLOCK_SIZES:
        raise ValueError(
            f"{what}={block_size!r} is not supported; use a power of two from {BLOCK_SIZES[0]} to "
            f"{BLOCK_SIZES[-1]} (64 is QLoRA's default for weights, 256 for double quantization)"
        )
    return block_size


def _as_float32(x: object, name: str) -> torch.Tensor:
    """Check that ``x`` is a non-empty, finite float tensor and return it as fp32 (same device)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{name} has dtype {x.dtype}; quantizers take float tensors (float32, bfloat16, float16); "
            f"convert it first, e.g. {name}.float()"
        )
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); there is nothing to quantize")
    x32 = x.detach().to(torch.float32)
    lo, hi = torch.aminmax(x32)  # NaN and inf show up here, in one pass; count them only if they do
    if not (torch.isfinite(lo) and torch.isfinite(hi)):
        bad = int((~torch.isfinite(x32)).sum())
        raise ValueError(
            f"{name} has {bad} NaN/inf value(s) out of {x.numel()} (after conversion to float32); one inf makes "
            "its whole block's scale inf; find where they come from, or clean them with torch.nan_to_num"
        )
    return x32


# ---------------------------------------------------------------------------------------------------------
# Groups: the rows that share one scale
# ---------------------------------------------------------------------------------------------------------


def _to_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Flatten and zero-pad to whole blocks: any shape -> (n_blocks, block_size). Zeros change no absmax."""
    flat = x.reshape(-1)
    return F.pad(flat, (0, -flat.numel() % block_size)).view(-1, block_size)


def _groups(x: torch.Tensor, granularity: Granularity) -> torch.Tensor:
    """The rows that share one scale: (1, numel) per tensor, (rows, numel // rows) per channel, else blocks."""
    if granularity == "tensor":
        return x.reshape(1, -1)
    if granularity == "channel":
        return x.reshape(x.shape[0], -1)
    return _to_blocks(x, int(granularity))


def _check_granularity(granularity: object, x: torch.Tensor) -> None:
    if granularity == "channel" and x.dim() < 2:
        raise ValueError(
            f"granularity='channel' means one scale per output row of a weight (out_features, in_features); "
            f"got shape {tuple(x.shape)}; use 'tensor' or a block size"
        )
    if granularity in ("tensor", "channel"):
        return
    if isinstance(granularity, str):
        raise ValueError(f"granularity={granularity!r} is not supported; use 'tensor', 'channel' or a block size")
    _check_block_size(granularity, "granularity")


# ---------------------------------------------------------------------------------------------------------
# 1. Integer quantizers
# ---------------------------------------------------------------------------------------------------------


@dataclass(repr=False)
class IntQuantized:
    """Integer codes and the scales that turn them back into numbers: ``x ≈ (codes - zero_point) * scale``.

    codes: same shape as x; int8 in [-qmax, qmax] (absmax) or uint8 in [0, 2^bits - 1] (zero-point).
    scale: fp32 (groups,): one step of the grid per group; (1,) per tensor, (rows,) per channel,
        (n_blocks,) per block (blocks run over the flattened tensor; the last may be partial).
    zero_point: uint8 (groups,), the code that stands for 0.0; None for absmax (symmetric) quantization.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    bits: int
    granularity: Granularity

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Back to floats, shape ``self.shape``."""
        if self.zero_point is None:
            return absmax_dequantize(self, dtype)
        return zeropoint_dequantize(self, dtype)

    def __repr__(self) -> str:
        kind = "absmax" if self.zero_point is None else "zero-point"
        return f"IntQuantized({kind}, int{self.bits}, shape={self.shape}, granularity={self.granularity!r})"


def _divisor(scale: torch.Tensor) -> torch.Tensor:
    """The scale, with 1 where it is 0 (an all-zero group): its codes come out 0 instead of NaN."""
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _ungroup(groups: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of ``_groups``: drop the block padding and restore the shape."""
    return groups.reshape(-1)[: math.prod(shape)].view(shape)


def absmax_quantize(x: torch.Tensor, bits: int = 8, granularity: Granularity = "tensor") -> IntQuantized:
    """Symmetric quantization: ``codes = round(x / scale)``, ``scale = absmax / qmax`` per group.

    x: float tensor of any shape. bits: 2..8. codes lie in [-qmax, qmax] with qmax = 2^(bits-1) - 1, so
    int8 uses -127..127 and int4 -7..7 (the code -2^(bits-1) is left unused to keep the grid symmetric).
    Error: |x - dequantize| <= scale / 2 per element. Rounding is half-to-even (``torch.round``).

    Why: the largest |x| lands exactly on ±qmax and 0 stays exactly 0; dequantizing is one multiply.
    """
    x32 = _as_float32(x, "x")
    bits = _check_bits(bits, INT_BITS, "integer quantizers")
    _check_granularity(granularity, x32)
    qmax = 2 ** (bits - 1) - 1
    groups = _groups(x32, granularity)  # (G, group_size)
    scale = groups.abs().amax(dim=1) / qmax  # (G,)
    codes = torch.round(groups / _divisor(scale)[:, None]).clamp(-qmax, qmax)
    return IntQuantized(_ungroup(codes, tuple(x.shape)).to(torch.int8), scale, None, bits, granularity)


def absmax_dequantize(q: IntQuantized, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``codes * scale``, back in the original shape."""
    codes = _groups(q.codes.float(), q.granularity)  # (G, group_size)
    return _ungroup(codes * q.scale[:, None], q.shape).to(dtype)


def zeropoint_quantize(x: torch.Tensor, bits: int = 8, granularity: Granularity = "tensor") -> IntQuantized:
    """Affine (asymmetric) quantization: ``codes = round(x / scale) + zero_point`` in [0, 2^bits - 1].

    scale = (max - min) / (2^bits - 1) per group, with the range widened to include 0, so 0.0 is always
    exactly representable (by the code ``zero_point``). Error: at most one step (scale) per element, usually
    scale / 2; a group that is all zeros gets scale 0 and dequantizes to exact zeros.

    Why: a lopsided range (say activations after a ReLU, all >= 0) uses all 2^bits codes, where absmax
    would waste half of them on negative values that never occur.
    """
    x32 = _as_float32(x, "x")
    bits = _check_bits(bits, INT_BITS, "integer quantizers")
    _check_granularity(granularity, x32)
    top = 2**bits - 1
    groups = _groups(x32, granularity)  # (G, group_size)
    lo = groups.amin(dim=1).clamp(max=0.0)  # (G,) the range always contains 0
    hi = groups.amax(dim=1).clamp(min=0.0)
    scale = (hi - lo) / top  # (G,)
    step = _divisor(scale)
    zero_point = torch.round(-lo / step).clamp(0, top)  # (G,) the code that means 0.0
    codes = (torch.round(groups / step[:, None]) + zero_point[:, None]).clamp(0, top)
    return IntQuantized(
        _ungroup(codes, tuple(x.shape)).to(torch.uint8), scale, zero_point.to(torch.uint8), bits, granularity
    )


def zeropoint_dequantize(q: IntQuantized, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(codes - zero_point) * scale``, back in the original shape."""
    if q.zero_point is None:
        raise ValueError("this IntQuantized has no zero_point (it came from absmax_quantize); use absmax_dequantize")
    codes = _groups(q.codes.float(), q.granularity)  # (G, group_size)
    return _ungroup((codes - q.zero_point.float()[:, None]) * q.scale[:, None], q.shape).to(dtype)


# ---------------------------------------------------------------------------------------------------------
# 2. Codebooks
# ---------------------------------------------------------------------------------------------------------


def nf_codebook(bits: int = 4) -> torch.Tensor:
    """The NF-k codebook (QLoRA): fp32 (2^bits,), sorted, from -1 to 1, with one entry exactly 0.

    Why: trained weights are roughly normal, so levels at normal quantiles give every code about the same
    share of the weights. QLoRA's construction: 2^(k-1) quantiles for the positive half and 2^(k-1) - 1 for
    the negative half, plus an exact zero (so zero padding and zero weights stay exact), normalised to [-1, 1].

    The outermost probability cannot be 1 (the quantile is infinite); QLoRA takes ``offset`` halfway between
    1 - 1/(2(n-1)) and 1 - 1/(2n) for n = 2^k levels and publishes it rounded to 7 decimals (0.9677083 for
    NF4). Building the grid in fp32 and normalising in fp32, as below, reproduces QLoRA's (and
    bitsandbytes') NF4 table bit for bit.
    """
    bits = _check_bits(bits, NF_BITS, "NF codebooks")
    n = 2**bits
    offset = round(((1 - 1 / (2 * (n - 1))) + (1 - 1 / (2 * n))) / 2, 7)  # NF4: 0.9677083
    half = 2 ** (bits - 1)
    p_pos = torch.linspace(offset, 0.5, half + 1, dtype=torch.float32)[:-1]  # 2^(k-1) probabilities > 0.5
    p_neg = torch.linspace(offset, 0.5, half, dtype=torch.float32)[:-1]  # 2^(k-1) - 1 of them
    positive = torch.special.ndtri(p_pos.double()).float()  # normal quantiles, computed in float64
    negative = -torch.special.ndtri(p_neg.double()).float()
    values = torch.cat([negative, torch.zeros(1), positive]).sort().values
    return values / values.max()


def fp4_codebook() -> torch.Tensor:
    """FP4 (E2M1) values divided by 6: fp32 (15,), sorted, from -1 to 1.

    E2M1 has 2 exponent bits (bias 1) and 1 mantissa bit: magnitudes 0, 0.5 (subnormals), 1, 1.5, 2, 3, 4, 6.
    Its 16 bit patterns hold only 15 numbers (+0 and -0 are the same), so this codebook has 15 entries and
    code 15 is never produced. Codes index the sorted list; they are not the E2M1 bit patterns.
    (bitsandbytes' "fp4" is a different table with its own bias; it is a comparison point, not this format.)
    Why: a float grid is dense near 0 and sparse far out, like NF, but comes from hardware, not statistics.
    """
    magnitudes = torch.tensor(
        [m / 2 if e == 0 else 2 ** (e - 1) * (1 + m / 2) for e in range(4) for m in range(2)]  # e: exponent field
    )
    values = torch.cat([-magnitudes[1:], magnitudes]).sort().values
    return values / values.max()


def int_codebook(bits: int) -> torch.Tensor:
    """The integers -qmax..qmax as fp32 (2^bits - 1,): what a symmetric intN code stands for before scaling.

    Code c means the integer c - qmax (so int4 codes 0..14 mean -7..7; code 15 is never produced).
    """
    bits = _check_bits(bits, INT_BITS, "integer formats")
    qmax = 2 ** (bits - 1) - 1
    return torch.arange(-qmax, qmax + 1, dtype=torch.float32)


def dynamic_codebook() -> torch.Tensor:
    """The signed 8-bit dynamic code for double-quantized scales: fp32 (256,), sorted, in [-0.993, 1].

    For each decade e = 0..6 it holds 2^e evenly spaced magnitudes in [0.1, 1) * 10^(e-6) (bin centres), with
    both signs, plus 0 and 1: 127 + 127 + 2 = 256 values from 5.5e-7 to 1. Why not plain int8: scales minus
    their mean include tiny values, and a float-like code keeps their relative error small. QLoRA calls this
    "8-bit floats"; it is the dynamic tree code of Dettmers (2016), which bitsandbytes also uses.
    Computed in fp32, it equals bitsandbytes' table bit for bit.
    """
    positive = []
    for e in range(7):
        edges = torch.linspace(0.1, 1.0, 2**e + 1, dtype=torch.float32)
        centres = (edges[:-1] + edges[1:]) / 2  # 2^e values in [0.1, 1)
        positive.append(10.0 ** (e - 6) * centres)
    magnitudes = torch.cat(positive)  # (127,)
    return torch.cat([-magnitudes, torch.zeros(1), magnitudes, torch.ones(1)]).sort().values


def _nearest(scaled: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook entry for each value: uint8, same shape as ``scaled``.

    Compares against the midpoints between neighbours; a value exactly on a midpoint goes to the lower
    entry (``bucketize`` counts boundaries < x), which is what bitsandbytes does for NF4.
    """
    midpoints = (codebook[:-1] + codebook[1:]) / 2  # (len - 1,), sorted because the codebook is
    return torch.bucketize(scaled, midpoints, out_int32=True).to(torch.uint8)


# ---------------------------------------------------------------------------------------------------------
# 3. Bit packing
# ---------------------------------------------------------------------------------------------------------


def _group_layout(bits: int) -> tuple[int, int, torch.dtype]:
    """How codes tile bytes: (codes per group, bytes per group, an integer dtype that holds one group).

    A group is the fewest codes that fill whole bytes: 4 bits -> 2 codes in 1 byte; 3 bits -> 8 codes in 3.
    """
    group_bits = math.lcm(bits, 8)
    word_dtype = torch.uint8 if group_bits == 8 else torch.int64  # 1, 2, 4, 8 bits: stay in bytes (fast)
    return group_bits // bits, group_bits // 8, word_dtype


def _packed_bytes(numel: int, bits: int) -> int:
    return -(-numel * bits // 8)  # ceil(numel * bits / 8)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (each < 2^bits) into bytes: any shape -> uint8 (ceil(numel * bits / 8),).

    Codes go in groups that fill whole bytes (2 per byte at 4 bits, 4 at 2 bits, 8 codes in 3 bytes at 3
    bits), most significant bits first: at 4 bits, byte 0x4A holds code 4 then code 10, the order you read
    the hex digits (and bitsandbytes' NF4 order). Why: 4-bit codes in a uint8 each would waste half the memory.
    """
    bits = _check_bits(bits, PACK_BITS, "pack")
    is_int = isinstance(codes, torch.Tensor) and not (codes.is_floating_point() or codes.is_complex())
    if not is_int or codes.dtype == torch.bool:
        got = codes.dtype if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise TypeError(f"codes must be an integer tensor (e.g. uint8); got {got}")
    flat = codes.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        bad = int(((flat < 0) | (flat.long() >= 2**bits)).sum())
        raise ValueError(f"{bad} code(s) are outside [0, {2**bits - 1}], so they do not fit in {bits} bits")
    per_group, group_bytes, word_dtype = _group_layout(bits)
    groups = F.pad(flat.to(word_dtype), (0, -flat.numel() % per_group)).view(-1, per_group)  # (G, per_group)
    words = torch.zeros(groups.shape[0], dtype=word_dtype, device=flat.device)  # (G,) one group's bits each
    for j in range(per_group):  # first code into the highest bits
        words |= groups[:, j] << (bits * (per_group - 1 - j))
    packed = torch.empty(groups.shape[0], group_bytes, dtype=torch.uint8, device=flat.device)
    for k in range(group_bytes):  # then cut each word into bytes, highest first
        packed[:, k] = (words >> (8 * (group_bytes - 1 - k))) & 0xFF
    return packed.reshape(-1)[: _packed_bytes(flat.numel(), bits)]


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of ``pack``: uint8 (ceil(numel * bits / 8),) -> uint8 codes (numel,)."""
    bits = _check_bits(bits, PACK_BITS, "unpack")
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        got = packed.dtype if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise TypeError(f"packed must be a uint8 tensor (from pack); got {got}")
    need = _packed_bytes(numel, bits)
    if packed.numel() != need:
        raise ValueError(
            f"packed has {packed.numel()} bytes, but {numel} codes of {bits} bits take ceil({numel} * {bits} / 8) "
            f"= {need}; pass the numel you packed"
        )
    per_group, group_bytes, word_dtype = _group_layout(bits)
    flat = packed.reshape(-1).to(word_dtype)
    groups = F.pad(flat, (0, -flat.numel() % group_bytes)).view(-1, group_bytes)  # (G, group_bytes)
    words = groups[:, 0]  # (G,)
    for k in range(1, group_bytes):  # glue the bytes back into one word per group, highest first
        words = (words << 8) | groups[:, k]
    codes = torch.empty(groups.shape[0], per_group, dtype=torch.uint8, device=flat.device)
    for j in range(per_group):  # and read the codes out, highest bits first
        codes[:, j] = (words >> (bits * (per_group - 1 - j))) & (2**bits - 1)
    return codes.reshape(-1)[:numel]


# ---------------------------------------------------------------------------------------------------------
# 4. Double quantization and the QuantizedWeight
# ---------------------------------------------------------------------------------------------------------


@dataclass(repr=False)
class DoubleQuantizedScales:
    """Block scales stored in 8 bits (QLoRA's double quantization): ``scale ≈ codebook[codes] * absmax + offset``.

    codes: uint8 (numel,): one byte per first-level scale.
    absmax: fp32 (n_dq_blocks,): the second-level scale of each block of ``block_size`` scales.
    offset: fp32 (): the mean of the scales, subtracted first: scales are all positive, and centring them
        lets the signed code use both halves.
    codebook: fp32 (256,): ``dynamic_codebook()``.
    block_size: scales per second-level block (256). numel: how many first-level scales there are.
    """

    codes: torch.Tensor
    absmax: torch.Tensor
    offset: torch.Tensor
    codebook: torch.Tensor
    block_size: int
    numel: int

    def dequantize(self) -> torch.Tensor:
        """The first-level scales, fp32 (numel,)."""
        codes = _to_blocks(self.codes, self.block_size).long()  # (n_dq_blocks, block_size), padding trimmed below
        centred = self.codebook[codes] * self.absmax[:, None]
        return centred.reshape(-1)[: self.numel] + self.offset

    @property
    def nbytes(self) -> int:
        """Bytes stored: codes + second-level absmax + offset. The codebook is a shared constant, not counted."""
        return _tensor_bytes(self.codes) + _tensor_bytes(self.absmax) + _tensor_bytes(self.offset)

    def to(self, device: torch.device | str) -> DoubleQuantizedScales:
        return replace(
            self,
            codes=self.codes.to(device),
            absmax=self.absmax.to(device),
            offset=self.offset.to(device),
            codebook=self.codebook.to(device),
        )

    def __repr__(self) -> str:
        return f"DoubleQuantizedScales({self.numel} scales, 8-bit, block_size={self.block_size}, {self.nbytes} bytes)"


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def double_quantize(scales: torch.Tensor, block_size: int = DQ_BLOCK_SIZE) -> DoubleQuantizedScales:
    """Quantize fp32 block scales (n,) to 8 bits in blocks of ``block_size`` (QLoRA: 256).

    Subtract the mean, then absmax-quantize each block of 256 onto ``dynamic_codebook()`` (nearest entry).
    Why: at block size 64, fp32 scales cost 32/64 = 0.5 bits/param; 8-bit ones cost 8/64 + 32/(64*256)
    = 0.127, which is the 4.5 -> 4.127 bits/param of NF4 with double quantization.
    """
    scales32 = _as_float32(scales, "scales").reshape(-1)
    block_size = _check_block_size(block_size)
    codebook = dynamic_codebook().to(scales32.device)
    offset = scales32.mean()
    blocks = _to_blocks(scales32 - offset, block_size)  # (n_dq_blocks, block_size)
    absmax = blocks.abs().amax(dim=1)  # (n_dq_blocks,)
    codes = _nearest(blocks * (1 / absmax.clamp(min=_TINY))[:, None], codebook)
    n = scales32.numel()
    return DoubleQuantizedScales(codes.reshape(-1)[:n], absmax, offset, codebook, block_size, n)


@dataclass(repr=False)
class QuantizedWeight:
    """A weight as packed b-bit codes plus one scale per block: ``w ≈ codebook[code] * scale[block]``.

    packed: uint8 (n_blocks * block_size * bits / 8,): the codes of the flattened weight, zero-padded to whole
        blocks, packed with ``pack`` (first code in the highest bits). The pad is at most block_size - 1 codes.
    scales: fp32 (n_blocks,), or ``DoubleQuantizedScales``: the absmax of each block (NF/FP) or absmax / qmax
        (intN).
    shape: the original shape; numel = prod(shape) may be less than n_blocks * block_size.
    block_size: weights per scale (a power of two, 16..4096). format: "nf4", "nf3", "nf2", "fp4", "int2".."int8".
    bits: bits per code. codebook: fp32 (<= 2^bits,): what each code stands for before scaling.

    Why a plain dataclass: a QuantLinear can hold any format, and a learner can print every field.
    """

    packed: torch.Tensor
    scales: torch.Tensor | DoubleQuantizedScales
    shape: tuple[int, ...]
    block_size: int
    format: str
    bits: int
    codebook: torch.Tensor

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.block_size)

    @property
    def double_quant(self) -> bool:
        return isinstance(self.scales, DoubleQuantizedScales)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        """Bytes stored: packed codes + scales (+ double-quantization state). Codebooks are shared constants."""
        scales = self.scales.nbytes if isinstance(self.scales, DoubleQuantizedScales) else _tensor_bytes(self.scales)
        return _tensor_bytes(self.packed) + scales

    @property
    def bits_per_param(self) -> float:
        """8 * nbytes / numel. NF4, block 64: 4.5; with double quantization 4 + 8/64 + 32/(64*256) = 4.127."""
        return 8 * self.nbytes / self.numel

    def codes(self) -> torch.Tensor:
        """The unpacked codes, uint8 (n_blocks, block_size): row i is block i, padding codes included."""
        return unpack(self.packed, self.bits, self.n_blocks * self.block_size).view(self.n_blocks, self.block_size)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Back to a dense tensor of shape ``self.shape`` (see ``dequantize``)."""
        return dequantize(self, dtype)

    def to(self, device: torch.device | str) -> QuantizedWeight:
        scales = self.scales.to(device)
        return replace(self, packed=self.packed.to(device), scales=scales, codebook=self.codebook.to(device))

    def __repr__(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return (
            f"QuantizedWeight({self.format}, shape={self.shape}, block_size={self.block_size}{dq}: "
            f"{self.bits_per_param:.3f} bits/param, {self.nbytes:,} bytes)"
        )


def _codebook_quantize(
    w: torch.Tensor, codebook: torch.Tensor, bits: int, block_size: int, double_quant: bool, format: str
) -> QuantizedWeight:
    """Blockwise absmax onto a codebook in [-1, 1]: scale = absmax of the block, code = nearest entry."""
    w32 = _as_float32(w, "w")
    block_size = _check_block_size(block_size)
    codebook = codebook.to(w32.device)
    blocks = _to_blocks(w32, block_size)  # (n_blocks, block_size), zero-padded
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    scaled = blocks * (1 / absmax.clamp(min=_TINY))[:, None]  # in [-1, 1]; times the reciprocal, as bitsandbytes
    codes = _nearest(scaled, codebook)  # (n_blocks, block_size) uint8
    scales = double_quantize(absmax) if double_quant else absmax
    return QuantizedWeight(pack(codes, bits), scales, tuple(w.shape), block_size, format, bits, codebook)


def nf_quantize(w: torch.Tensor, bits: int = 4, block_size: int = 64, double_quant: bool = False) -> QuantizedWeight:
    """NF-k blockwise quantization (QLoRA): w (any shape, float) -> QuantizedWeight of format f"nf{bits}".

    Each block of ``block_size`` consecutive weights (flattened) is divided by its absmax, and each value
    becomes the index of the nearest ``nf_codebook(bits)`` entry. ``double_quant`` stores the block scales
    in 8 bits (``double_quantize``). NF4 block 64: 4.5 bits/param, 4.127 with double quantization.
    """
    return _codebook_quantize(w, nf_codebook(bits), bits, block_size, double_quant, f"nf{bits}")


def fp4_quantize(w: torch.Tensor, block_size: int = 64, double_quant: bool = False) -> QuantizedWeight:
    """Like ``nf_quantize``, on the FP4 (E2M1) grid of ``fp4_codebook()``: format "fp4"."""
    return _codebook_quantize(w, fp4_codebook(), 4, block_size, double_quant, "fp4")


def int_quantize(w: torch.Tensor, bits: int = 4, block_size: int = 64, double_quant: bool = False) -> QuantizedWeight:
    """Blockwise symmetric intN (``absmax_quantize`` per block), packed: format f"int{bits}".

    Stores code + qmax (so codes are unsigned) and ``int_codebook(bits)``; the scale is absmax / qmax.
    Dequantizes to exactly what ``absmax_quantize(w, bits, block_size).dequantize()`` gives.
    """
    bits = _check_bits(bits, INT_BITS, "int_quantize")
    block_size = _check_block_size(block_size)
    q = absmax_quantize(w, bits, granularity=block_size)
    qmax = 2 ** (bits - 1) - 1
    codes = _to_blocks(q.codes, block_size).to(torch.int16) + qmax  # (n_blocks, block_size), padding -> 0.0
    scales = double_quantize(q.scale) if double_quant else q.scale
    codebook = int_codebook(bits).to(q.scale.device)
    return QuantizedWeight(pack(codes, bits), scales, tuple(w.shape), block_size, f"int{bits}", bits, codebook)


FORMATS = ("nf2", "nf3", "nf4", "fp4", *(f"int{b}" for b in INT_BITS))


def quantize(w: torch.Tensor, fmt: str = "nf4", block_size: int = 64, double_quant: bool = False) -> QuantizedWeight:
    """Any blockwise format by name: "nf4" -> ``nf_quantize(w, 4, ...)``, "int8" -> ``int_quantize(w, 8, ...)``, ...

    Why: a QuantLinear or a sweep over formats picks the format with a string.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt={fmt!r} is not a known format; use one of {', '.join(FORMATS)}")
    if fmt == "fp4":
        return fp4_quantize(w, block_size, double_quant)
    bits = int(fmt[-1])
    if fmt.startswith("nf"):
        return nf_quantize(w, bits, block_size, double_quant)
    return int_quantize(w, bits, block_size, double_quant)


# ---------------------------------------------------------------------------------------------------------
# 5. Dequantization: one gather per byte
# ---------------------------------------------------------------------------------------------------------


def byte_table(codebook: torch.Tensor, bits: int) -> torch.Tensor:
    """What each of the 256 possible bytes decodes to: fp32 (256, 8 // bits), for bits 1, 2, 4 or 8.

    Row b holds the codebook values of the codes packed in byte b (for NF4, row 0x4A is
    [codebook[4], codebook[10]]). It is ``unpack`` applied once to every byte, so decoding a whole weight
    is one gather, ``table[packed]``, instead of shifting and masking each nibble.
    """
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"bits={bits!r}: a byte table needs codes that tile a byte; use 1, 2, 4 or 8")
    per_byte = 8 // bits
    every_byte = torch.arange(256, dtype=torch.uint8, device=codebook.device)
    codes = unpack(every_byte, bits, 256 * per_byte).long()  # (256 * per_byte,)
    full = F.pad(codebook.float(), (0, 2**bits - codebook.numel()))  # codes past the codebook never occur
    return full[codes].view(256, per_byte)


def _decode_bytes(table: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """``table[packed]`` flattened: (n_bytes * per_byte,) fp32.

    Speed: a gather from a 1-D table is about twice as fast on CPU as a gather of table rows, so at 4 bits each
    row (two fp32, 8 bytes) is viewed as one int64 and gathered whole; same bytes, same result.
    """
    index = packed.int()  # index_select takes int32 indices: half the memory traffic of int64
    rows = table.contiguous()  # (256, per_byte)
    if rows.shape[1] == 1:  # 8 bits: one value per byte
        rows = rows.view(256)
    elif rows.shape[1] == 2:  # 4 bits: a pair of fp32 per byte, as one int64
        rows = rows.view(torch.int64).view(256)
    return rows.index_select(0, index).view(torch.float32).reshape(-1)


@functools.lru_cache(maxsize=32)
def _word_table(values: tuple[float, ...], bits: int, device: str) -> torch.Tensor:
    """What each of the 65,536 possible 16-bit words decodes to, with rows viewed as int64 for a fast gather.

    A word is two packed bytes read as one little- or big-endian uint16 (whatever this machine uses), so the
    row for a word is the byte table's rows of its two bytes, in memory order. Shape (65536, 16 // bits) fp32,
    returned as int64 (65536, 16 // bits // 2): 1 MiB at 4 bits. Cached per codebook.
    """
    bt = byte_table(torch.tensor(values, dtype=torch.float32, device=device), bits)  # (256, 8 // bits)
    word = torch.arange(65536, device=device)
    first, second = (word & 0xFF, word >> 8) if sys.byteorder == "little" else (word >> 8, word & 0xFF)
    table = torch.cat([bt[first], bt[second]], dim=1).contiguous()  # (65536, 16 // bits)
    return table.view(torch.int64)


def _words(packed: torch.Tensor) -> torch.Tensor:
    """Packed bytes read two at a time as unsigned 16-bit words: int32 (n_bytes // 2,), for ``index_select``."""
    if hasattr(torch, "uint16"):  # torch >= 2.3: one conversion
        return packed.view(torch.uint16).int()
    return packed.view(torch.int16).int() & 0xFFFF  # older torch: reinterpret as signed, then mask


def _decode_words(
    codebook: torch.Tensor, bits: int, packed: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``_decode_bytes`` two bytes at a time: one gather per 16-bit word instead of per byte. (n_bytes * 8 // bits,)

    Speed: halving the number of gathers cuts dequantization time by about a quarter on CPU (see
    benchmarks/bench_nf4_dequant.py). Needs an even number of packed bytes, which every block size gives.
    """
    table = _word_table(tuple(codebook.float().tolist()), bits, str(packed.device))  # (65536, k) int64
    words = _words(packed)  # (n_bytes // 2,) in 0..65535
    rows = table.view(-1) if table.shape[1] == 1 else table
    if out is not None:  # write into a caller's buffer: no fresh allocation, so no page faults
        torch.index_select(rows, 0, words, out=out.view(torch.int64).view(len(words), *rows.shape[1:]))
        return out.view(-1)
    return rows.index_select(0, words).view(torch.float32).reshape(-1)


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """QuantizedWeight -> dense tensor of shape ``qw.shape`` and ``dtype`` (math in fp32): codebook[code] * scale.

    For 2, 4 and 8 bits: one gather from a 65,536-row word table (``byte_table`` for two bytes at once) gives
    every value in each pair of bytes, then one broadcast multiply by the scales viewed as (n_blocks, 1).
    For 1 bit: the same with ``byte_table`` directly. For 3, 5, 6 and 7 bits (codes straddle bytes): unpack,
    then look up.
    """
    scales = qw.scales.dequantize() if isinstance(qw.scales, DoubleQuantizedScales) else qw.scales  # (n_blocks,)
    padded = qw.n_blocks * qw.block_size
    if qw.bits in (2, 4, 8) and qw.packed.numel() % 2 == 0:
        values = _decode_words(qw.codebook, qw.bits, qw.packed)  # (padded,)
    elif 8 % qw.bits == 0:
        values = _decode_bytes(byte_table(qw.codebook, qw.bits), qw.packed)  # (padded,)
    else:
        values = qw.codebook[unpack(qw.packed, qw.bits, padded).long()]  # (padded,)
    values = values.view(qw.n_blocks, qw.block_size).mul_(scales[:, None])  # (n_blocks, block_size)
    return values.reshape(-1)[: qw.numel].view(qw.shape).to(dtype)


def dequantize_rows(
    qw: QuantizedWeight,
    start: int,
    end: int,
    scales: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows ``start:end`` of a 2-D quantized weight, fp32 (end - start, in_features), without the other rows.

    Why: a layer can then be applied a slice at a time, so the whole float weight never exists at once (and a
    reused ``out`` buffer avoids allocating fresh memory for every slice). Needs ``in_features`` to be a
    multiple of ``block_size`` so that rows are whole blocks. ``scales``: the (n_blocks,) fp32 block scales,
    if the caller has already dequantized them (double quantization); ``out``: an fp32 buffer with at least
    ``(end - start) * in_features`` elements.
    """
    if len(qw.shape) != 2:
        raise ValueError(f"dequantize_rows needs a 2-D weight, got shape {qw.shape}")
    n_rows, n_cols = qw.shape
    if n_cols % qw.block_size:
        raise ValueError(f"in_features={n_cols} is not a multiple of block_size={qw.block_size}; use dequantize()")
    if not 0 <= start < end <= n_rows:
        raise ValueError(f"rows {start}:{end} are out of range for a weight with {n_rows} rows")
    if scales is None:
        scales = qw.scales.dequantize() if isinstance(qw.scales, DoubleQuantizedScales) else qw.scales
    per_row = n_cols // qw.block_size  # blocks per row
    b0, b1 = start * per_row, end * per_row  # block range
    bytes_per_block = qw.block_size * qw.bits // 8 if (qw.block_size * qw.bits) % 8 == 0 else None
    numel = (end - start) * n_cols
    if qw.bits in (2, 4, 8) and bytes_per_block and bytes_per_block % 2 == 0:
        packed = qw.packed[b0 * bytes_per_block : b1 * bytes_per_block]
        values = _decode_words(qw.codebook, qw.bits, packed, None if out is None else out.view(-1)[:numel])
    else:  # codes straddle bytes: decode the covering bytes, then slice
        codes = unpack(qw.packed, qw.bits, b1 * qw.block_size)[b0 * qw.block_size :]
        values = qw.codebook[codes.long()]
    values = values.view(b1 - b0, qw.block_size).mul_(scales[b0:b1, None])  # (blocks, block_size)
    return values.view(end - start, n_cols)


def iter_row_slices(qw: QuantizedWeight, rows_per_slice: int, dtype: torch.dtype = torch.float32):
    """Yield ``(start, end, W[start:end])`` for a 2-D weight, slice by slice, reusing one fp32 buffer.

    Why: a layer applied slice by slice never holds its whole float weight, and writing every slice into the
    same buffer avoids fresh memory (whose page faults cost more than the decoding). Each yielded slice is
    only valid until the next one is produced. Needs ``in_features % block_size == 0``.
    """
    n_rows, n_cols = qw.shape
    scales = qw.scales.dequantize() if isinstance(qw.scales, DoubleQuantizedScales) else qw.scales  # (n_blocks,)
    rows_per_slice = max(1, min(rows_per_slice, n_rows))
    buffer = torch.empty(rows_per_slice * n_cols, dtype=torch.float32, device=qw.packed.device)
    fast = qw.bits in (2, 4, 8) and (qw.block_size * qw.bits // 8) % 2 == 0 and n_cols % qw.block_size == 0
    if fast:  # decode words once for all slices: table (65536, k) int64, words (n_bytes // 2,)
        table = _word_table(tuple(qw.codebook.float().tolist()), qw.bits, str(qw.packed.device))
        table = table.view(-1) if table.shape[1] == 1 else table
        words = _words(qw.packed)
        words_per_row = n_cols * qw.bits // 16
    per_row = n_cols // qw.block_size  # blocks per row
    for start in range(0, n_rows, rows_per_slice):
        end = min(start + rows_per_slice, n_rows)
        if fast:
            numel = (end - start) * n_cols
            out = buffer[:numel].view(torch.int64).view(-1, *table.shape[1:])
            torch.index_select(table, 0, words[start * words_per_row : end * words_per_row], out=out)
            values = buffer[:numel].view(-1, qw.block_size).mul_(scales[start * per_row : end * per_row, None])
            weight = values.view(end - start, n_cols)
        else:
            weight = dequantize_rows(qw, start, end, scales=scales, out=buffer)
        yield start, end, weight if dtype == torch.float32 else weight.to(dtype)
