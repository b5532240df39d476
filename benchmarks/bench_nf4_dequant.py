"""How fast is lq_edu's NF4 dequantization, against bitsandbytes' CPU kernel and a naive gather?

    python benchmarks/bench_nf4_dequant.py

A 4096 x 4096 fp32 weight, NF4, block 64, no double quantization. Three ways to get the dense weight back,
all timed in the same run, interleaved (one call of each per round), on 2 threads:

- bitsandbytes ``dequantize_4bit`` (a C++ kernel on CPU): the peer;
- ``lq_edu.quant.dequantize``: one gather per 16-bit word from a 65,536-row table, then one broadcast multiply;
- naive: split each byte into its two nibbles, look each code up in the codebook, multiply by the scale.

The figures that matter are the ratios to bitsandbytes (target for lq_edu: at most 2x).
"""

from __future__ import annotations

import torch
from timing import interleaved_medians

from lq_edu.quant import QuantizedWeight, dequantize, nf_quantize


def naive_dequantize(qw: QuantizedWeight) -> torch.Tensor:
    """The textbook version: unpack codes, gather, multiply. (numel,) codes -> qw.shape."""
    high, low = qw.packed >> 4, qw.packed & 0xF  # first code in the high nibble
    codes = torch.stack([high, low], dim=1).reshape(-1)  # (n_blocks * block_size,)
    values = qw.codebook[codes.long()].view(qw.n_blocks, qw.block_size) * qw.scales[:, None]
    return values.reshape(-1)[: qw.numel].view(qw.shape)


def main() -> None:
    torch.set_num_threads(2)
    import bitsandbytes.functional as bnbf

    w = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0))
    qw = nf_quantize(w, bits=4, block_size=64)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")

    ours, theirs, naive = dequantize(qw), bnbf.dequantize_4bit(packed, state), naive_dequantize(qw)
    assert torch.equal(ours, theirs) and torch.equal(ours, naive), "the three must agree before timing them"

    t = interleaved_medians(
        {
            "bitsandbytes": lambda: bnbf.dequantize_4bit(packed, state),
            "lq_edu": lambda: dequantize(qw),
            "naive": lambda: naive_dequantize(qw),
        }
    )
    print(f"threads: {torch.get_num_threads()}; NF4 4096x4096 fp32, block 64 ({qw.bits_per_param:.3f} bits/param)")
    for name, seconds in t.items():
        print(f"  {name:<13} {seconds * 1e3:7.1f} ms")
    print(f"lq_edu / bitsandbytes: {t['lq_edu'] / t['bitsandbytes']:.2f}x  (target <= 2x)")
    print(f"naive  / bitsandbytes: {t['naive'] / t['bitsandbytes']:.2f}x")
    print(f"naive  / lq_edu:       {t['naive'] / t['lq_edu']:.2f}x")


if __name__ == "__main__":
    main()
