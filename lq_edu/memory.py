"""Bits and bytes: how much memory a model takes in a given number format.

The whole course rests on one multiplication::

    bytes = parameters * bits_per_param / 8

A 70B-parameter model is 280 GB in fp32, 140 GB in bf16 and about 36 GB in
NF4 with double quantization: the difference between a rack of GPUs and one.

``bits_per_param`` is more than the width of a code. Blockwise formats (intN,
NFn) store one absmax scale per block of ``block_size`` weights, so NF4 with
64-weight blocks and fp32 scales costs 4 + 32/64 = 4.5 bits per parameter.
QLoRA's *double quantization* (DQ) quantizes those scales in turn: each scale
becomes an 8-bit code, and every 256 scales share one fp32 scale, giving
4 + 8/64 + 32/(64*256) = 4.127 bits per parameter.

Units: 1 GB = 1e9 bytes (what disk and GPU spec sheets quote); 1 GiB = 2^30
bytes (what ``nvidia-smi`` and ``torch.cuda.memory_allocated`` effectively
count). Every function here says which it uses.

Only the weights are counted: not activations, the KV cache, gradients or
optimizer state. Parameter counts from a config follow Llama-style models
(Llama, Mistral, Qwen2) and GPT-2; other architectures (mixture-of-experts,
Gemma's extra norms, Phi) are not modelled.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lq_edu.formats import BF16, FP8_E4M3, FP8_E5M2, FP16, FP32
from lq_edu.quant import DQ_BLOCK_SIZE  # 256 block scales share one fp32 scale (QLoRA)

GB = 10**9  # bytes in a gigabyte, as spec sheets count
GiB = 2**30  # bytes in a gibibyte, as memory allocators count


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _check_count(n: Any, what: str = "n_params") -> int:
    """A parameter count must be a positive int: 70e9 is a float, so say how to write it."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"{what}={n!r} is a {type(n).__name__}; pass an int, e.g. 70_000_000_000 or int(70e9)")
    if n <= 0:
        raise ValueError(f"{what}={n} is not a parameter count; use a positive int")
    return int(n)


@dataclass(frozen=True)
class NumberFormat:
    """How one stored parameter is laid out in memory: its code, plus any scales it shares.

    ``bits`` is the width of one element's code. Block formats add one scale of
    ``scale_bits`` per ``block_size`` elements. Under double quantization those
    scales are 8-bit codes, grouped ``dq_block_size`` (256) at a time under one
    fp32 scale (``dq_scale_bits``), after subtracting one fp32 offset (the mean
    of the scales, ``dq_offset_bits``) per tensor.

    Build these with ``get_format``; the fields are what the arithmetic reads.
    """

    name: str
    bits: int
    block_size: int | None = None
    scale_bits: int = 0
    dq_block_size: int | None = None
    dq_scale_bits: int = 0
    dq_offset_bits: int = 0

    @property
    def double_quant(self) -> bool:
        """True when the block scales are themselves quantized (QLoRA's double quantization)."""
        return self.dq_block_size is not None

    @property
    def bits_per_param(self) -> float:
        """Average bits per parameter, scales included, for a large tensor. NF4 block 64: 4.5; with DQ: 4.127.

        The once-per-tensor DQ offset is left out here (it is 32 bits for the
        whole tensor); ``bytes_for`` counts it.
        """
        total = float(self.bits)
        if self.block_size is not None:
            total += self.scale_bits / self.block_size  # one scale per block
            if self.dq_block_size is not None:
                total += self.dq_scale_bits / (self.block_size * self.dq_block_size)  # one fp32 per 256 scales
        return total

    def bytes_for(self, n_params: int) -> int:
        """Bytes to store one tensor of ``n_params`` elements, rounded up to whole bytes.

        Counts whole blocks: a partial last block still pays for its scale.
        """
        n = _check_count(n_params)
        bits = n * self.bits
        if self.block_size is not None:
            n_blocks = _ceil_div(n, self.block_size)
            bits += n_blocks * self.scale_bits
            if self.dq_block_size is not None:
                bits += _ceil_div(n_blocks, self.dq_block_size) * self.dq_scale_bits + self.dq_offset_bits
        return _ceil_div(bits, 8)

    @property
    def label(self) -> str:
        """A short human name, e.g. ``nf4 (block 64, DQ)``."""
        if self.block_size is None:
            return self.name
        return f"{self.name} (block {self.block_size}{', DQ' if self.double_quant else ''})"

    def __str__(self) -> str:
        return f"{self.label}: {self.bits_per_param:.3f} bits/param"


# Formats with no scales: every element stands alone. fp8 training usually adds
# one scale per tensor; 32 bits per tensor is negligible and left out.
ELEMENT_FORMATS: dict[str, int] = {
    "fp32": FP32.bits,
    "bf16": BF16.bits,
    "fp16": FP16.bits,
    "fp8_e4m3": FP8_E4M3.bits,
    "fp8_e5m2": FP8_E5M2.bits,
}
# Blockwise formats: N-bit codes plus one absmax scale per block. The scale is
# fp32 by default, as bitsandbytes stores it for NF4 in QLoRA; we use the same
# layout for the integer formats so that the two families compare fairly.
BLOCK_FORMATS: dict[str, int] = {"int8": 8, "int4": 4, "int3": 3, "int2": 2, "nf4": 4, "nf3": 3, "nf2": 2, "fp4": 4}
FORMAT_NAMES: tuple[str, ...] = (*ELEMENT_FORMATS, *BLOCK_FORMATS)


def get_format(name: str, block_size: int = 64, double_quant: bool = False) -> NumberFormat:
    """The memory layout of a named format.

    ``block_size`` (weights per scale) and ``double_quant`` (8-bit scales in
    blocks of 256 with one fp32 scale each) apply to the blockwise formats
    (int2-int8, nf2-nf4); ``block_size`` is ignored for fp32 ... fp8.

    >>> get_format("nf4").bits_per_param
    4.5
    >>> round(get_format("nf4", double_quant=True).bits_per_param, 3)
    4.127
    """
    if not isinstance(name, str) or name.lower() not in FORMAT_NAMES:
        raise ValueError(f"unknown number format {name!r}; use one of {', '.join(FORMAT_NAMES)}")
    if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral) or block_size <= 0:
        raise ValueError(
            f"block_size={block_size!r} is not a block size; use a positive int such as 64 (QLoRA's choice)"
        )
    name = name.lower()
    if name in ELEMENT_FORMATS:
        if double_quant:
            raise ValueError(
                f"double_quant=True needs block scales, and {name} has none; "
                f"use it with a blockwise format ({', '.join(BLOCK_FORMATS)})"
            )
        return NumberFormat(name, ELEMENT_FORMATS[name])
    if double_quant:
        return NumberFormat(
            name,
            BLOCK_FORMATS[name],
            block_size=int(block_size),
            scale_bits=8,  # each block scale is stored as an 8-bit code ...
            dq_block_size=DQ_BLOCK_SIZE,  # ... 256 of them share one fp32 scale ...
            dq_scale_bits=32,
            dq_offset_bits=32,  # ... after subtracting their mean, one fp32 per tensor
        )
    return NumberFormat(name, BLOCK_FORMATS[name], block_size=int(block_size), scale_bits=32)


def _as_format(fmt: str | NumberFormat, what: str) -> NumberFormat:
    if isinstance(fmt, NumberFormat):
        return fmt
    if isinstance(fmt, str):
        return get_format(fmt)
    raise TypeError(f"{what}={fmt!r} is a {type(fmt).__name__}; pass a format name such as 'nf4' or get_format(...)")


@dataclass(frozen=True)
class ParamCount:
    """Parameters of a decoder-only transformer, by kind.

    ``linear`` is the weights of the linear layers inside the transformer
    blocks (attention and MLP projections, biases excluded): the part that
    weight quantization shrinks. Everything else (embeddings, norms, biases,
    an untied lm_head) usually stays in bf16.
    """

    embeddings: int  # token (and, for GPT-2, position) embeddings
    attention: int  # q, k, v, o projections, with their biases
    mlp: int  # feed-forward projections, with their biases
    norms: int  # every LayerNorm / RMSNorm, final one included
    lm_head: int  # 0 when tied to the token embeddings
    linear: int  # weights of the block linears: the quantizable part

    @property
    def total(self) -> int:
        """All parameters, a tied lm_head counted once (as ``sum(p.numel() for p in model.parameters())``)."""
        return self.embeddings + self.attention + self.mlp + self.norms + self.lm_head


LLAMA_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
GPT2_KEYS = ("vocab_size", "n_embd", "n_layer", "n_positions")
KNOWN_MODEL_TYPES = ("llama", "mistral", "qwen2", "gpt2")


def _config_dict(config: Any) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):  # a transformers PretrainedConfig
        return config.to_dict()
    raise TypeError(
        f"config is a {type(config).__name__}; pass a transformers config (e.g. model.config) or a dict of its fields"
    )


def _size(d: Mapping[str, Any], key: str) -> int:
    value = d[key]
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"config {key}={value!r}; it must be a positive int")
    return int(value)


def count_params_from_config(config: Any) -> ParamCount:
    """Count a model's parameters from its config alone, without building it.

    Accepts a transformers ``PretrainedConfig`` or a dict. Llama style (Llama,
    Mistral, Qwen2) reads vocab_size, hidden_size, intermediate_size,
    num_hidden_layers, num_attention_heads and optionally num_key_value_heads,
    head_dim, tie_word_embeddings, attention_bias, mlp_bias. GPT-2 style reads
    vocab_size, n_embd, n_layer, n_positions and optionally n_inner.

    Why from the config: you can size a 70B model before downloading 140 GB.
    """
    d = _config_dict(config)
    model_type = d.get("model_type")
    if any(d.get(k) for k in ("num_local_experts", "num_experts", "n_routed_experts")):
        raise ValueError(
            f"config for model_type={model_type!r} is a mixture-of-experts model, which this count does not model; "
            "build the model on the meta device and sum p.numel() instead"
        )
    if model_type is not None and model_type not in KNOWN_MODEL_TYPES:
        warnings.warn(
            f"model_type={model_type!r} is counted as a Llama-style model; only {', '.join(KNOWN_MODEL_TYPES)} are "
            "checked against transformers, so compare with sum(p.numel()) before trusting the number",
            stacklevel=2,
        )
    if model_type == "gpt2" or "n_embd" in d:
        return _count_gpt2(d)
    missing = [k for k in LLAMA_KEYS if d.get(k) is None]
    if missing:
        raise ValueError(
            f"config lacks {', '.join(missing)}; count_params_from_config needs {', '.join(LLAMA_KEYS)} "
            f"(Llama / Mistral / Qwen2 style) or {', '.join(GPT2_KEYS)} (GPT-2 style)"
        )
    return _count_llama(d)


def _count_llama(d: Mapping[str, Any]) -> ParamCount:
    """Llama / Mistral / Qwen2: RMSNorm (weight only), grouped-query attention, gated MLP."""
    vocab, hidden, inter = _size(d, "vocab_size"), _size(d, "hidden_size"), _size(d, "intermediate_size")
    layers, heads = _size(d, "num_hidden_layers"), _size(d, "num_attention_heads")
    kv_heads = _size(d, "num_key_value_heads") if d.get("num_key_value_heads") is not None else heads
    head_dim = _size(d, "head_dim") if d.get("head_dim") is not None else hidden // heads
    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
    qkv_bias = d.get("model_type") == "qwen2" or bool(d.get("attention_bias", False))  # Qwen2 always has q/k/v bias
    o_bias = bool(d.get("attention_bias", False)) and d.get("model_type") != "qwen2"
    mlp_bias = bool(d.get("mlp_bias", False))

    attn_weights = hidden * q_dim + 2 * hidden * kv_dim + q_dim * hidden  # q, k, v, o
    attn_biases = (q_dim + 2 * kv_dim if qkv_bias else 0) + (hidden if o_bias else 0)
    mlp_weights = 3 * hidden * inter  # gate, up, down
    mlp_biases = 2 * inter + hidden if mlp_bias else 0
    return ParamCount(
        embeddings=vocab * hidden,
        attention=layers * (attn_weights + attn_biases),
        mlp=layers * (mlp_weights + mlp_biases),
        norms=layers * 2 * hidden + hidden,  # two RMSNorms per block, one final
        lm_head=0 if d.get("tie_word_embeddings", False) else vocab * hidden,
        linear=layers * (attn_weights + mlp_weights),
    )


def _count_gpt2(d: Mapping[str, Any]) -> ParamCount:
    """GPT-2: learned positions, LayerNorm (weight and bias), biases everywhere, tied head by default."""
    missing = [k for k in GPT2_KEYS if d.get(k) is None]
    if missing:
        raise ValueError(f"GPT-2 style config lacks {', '.join(missing)}; it needs {', '.join(GPT2_KEYS)}")
    vocab, n, layers, positions = (
        _size(d, "vocab_size"),
        _size(d, "n_embd"),
        _size(d, "n_layer"),
        _size(d, "n_positions"),
    )
    inner = _size(d, "n_inner") if d.get("n_inner") is not None else 4 * n

    attn_weights = n * 3 * n + n * n  # c_attn (q, k, v fused), c_proj
    mlp_weights = 2 * n * inner  # c_fc, c_proj
    return ParamCount(
        embeddings=vocab * n + positions * n,  # wte + wpe
        attention=layers * (attn_weights + 3 * n + n),
        mlp=layers * (mlp_weights + inner + n),
        norms=layers * 2 * (2 * n) + 2 * n,  # ln_1, ln_2 per block and ln_f, each weight + bias
        lm_head=0 if d.get("tie_word_embeddings", True) else vocab * n,
        linear=layers * (attn_weights + mlp_weights),
    )


def _params_or_count(params_or_config: Any) -> int | ParamCount:
    """A plain parameter count (checked) or a ParamCount (given, or counted from a config)."""
    if isinstance(params_or_config, numbers.Number):  # ints, but also 70e9 and True, which get a clear error
        return _check_count(params_or_config, "params_or_config")
    if isinstance(params_or_config, ParamCount):
        return params_or_config
    return count_params_from_config(params_or_config)


def model_bytes(
    params_or_config: int | ParamCount | Any,
    fmt: str | NumberFormat,
    keep: str | NumberFormat = "bf16",
) -> int:
    """Bytes of a model's weights when the block linears are stored in ``fmt``.

    ``params_or_config``: a plain int (then every parameter is in ``fmt``), a
    ``ParamCount``, or a config accepted by ``count_params_from_config``. For the
    last two, ``count.linear`` weights use ``fmt`` and the rest (embeddings,
    norms, biases, lm_head) use ``keep``, as QLoRA does.

    Each group is costed as one flat tensor, so the few bytes of partial blocks
    at the end of each real matrix are not counted.
    """
    fmt = _as_format(fmt, "fmt")
    count = _params_or_count(params_or_config)
    if isinstance(count, int):
        return fmt.bytes_for(count)
    keep = _as_format(keep, "keep")
    rest = count.total - count.linear
    return (fmt.bytes_for(count.linear) if count.linear else 0) + (keep.bytes_for(rest) if rest else 0)


@dataclass(frozen=True)
class MemoryRow:
    """One line of a memory table: a format and what the model costs in it."""

    format: str  # e.g. "nf4 (block 64, DQ)"
    bits_per_param: float  # average over all parameters, scales included
    bytes: int
    size: float  # bytes / unit
    unit: str  # "GB" (1e9 bytes) or "GiB" (2^30 bytes)

    def __str__(self) -> str:
        return f"{self.format:<22} {self.bits_per_param:7.3f} bits/param {self.size:10.1f} {self.unit}"


DEFAULT_TABLE_FORMATS: tuple[NumberFormat, ...] = (
    get_format("fp32"),
    get_format("bf16"),
    get_format("fp8_e4m3"),
    get_format("int8"),
    get_format("int4"),
    get_format("nf4"),
    get_format("nf4", double_quant=True),
)


def memory_table(
    params_or_config: int | ParamCount | Any,
    formats: Sequence[str | NumberFormat] | None = None,
    unit: str = "GB",
    keep: str | NumberFormat = "bf16",
) -> list[MemoryRow]:
    """What a model's weights cost in each format: one ``MemoryRow`` per format.

    ``unit="GB"`` divides by 1e9 (spec-sheet gigabytes); ``unit="GiB"`` by 2^30.
    For 70_000_000_000 parameters: fp32 280.0 GB, bf16 140.0 GB, NF4 + DQ 36.1 GB.
    ``params_or_config`` and ``keep`` mean what they mean in ``model_bytes``: for a
    config, a block-format row (intN, NFn) stores the block linears in that format
    and the rest in ``keep``; an element-format row (fp32, bf16, fp16, fp8) stores
    the whole model in that format, which is what "the model in fp32" means.
    """
    units = {"GB": GB, "GiB": GiB}
    if unit not in units:
        raise ValueError(f"unit={unit!r} is not supported; use 'GB' (1e9 bytes) or 'GiB' (2^30 bytes)")
    count = _params_or_count(params_or_config)
    total = count if isinstance(count, int) else count.total
    rows = []
    for f in DEFAULT_TABLE_FORMATS if formats is None else formats:
        f = _as_format(f, "format")
        # "the model in fp32/bf16/fp8" means all of it; a block format covers the linears only
        n_bytes = model_bytes(count, f, keep=f if f.block_size is None else keep)
        rows.append(MemoryRow(f.label, 8 * n_bytes / total, n_bytes, n_bytes / units[unit], unit))
    return rows
