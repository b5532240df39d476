"""QuantLinear forward+backward against nn.Linear: time and memory held between the passes.

    python benchmarks/bench_quant_linear.py [--tokens 512] [--dim 4096]

Setting: 512 tokens through a 4096 x 4096 layer, fp32 on CPU, the weight
frozen and the input requiring grad (exactly what a frozen base under LoRA
does). Figures are ratios against nn.Linear measured in the same run.

Memory "held between forward and backward" is the bytes autograd saves for
the backward pass, counted exactly with ``saved_tensors_hooks``. A naive
quantized layer (dequantize, then ``F.linear`` under autograd) saves the
dequantized weight; QuantLinear must not. On a CUDA machine the script also
reports ``torch.cuda.max_memory_allocated`` peaks.
"""

from __future__ import annotations

import argparse

import torch
from timing import interleaved_medians
from torch import nn

from lq_edu.quant_linear import QuantLinear


class NaiveQuantLinear(nn.Module):
    """Dequantize, then an ordinary autograd F.linear: keeps the float weight for backward."""

    def __init__(self, q: QuantLinear):
        super().__init__()
        self.q = q

    def forward(self, x):
        return nn.functional.linear(x, self.q.qweight.dequantize(x.dtype), self.q.bias)


def fwd_bwd(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    x.grad = None
    layer(x).backward(grad)


def saved_bytes(layer: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd holds for backward after one forward pass (exact, device-independent)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    del y
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    linear = nn.Linear(args.dim, args.dim, bias=False).to(device)
    nn.init.normal_(linear.weight, std=0.02)
    linear.weight.requires_grad_(False)
    layers = {
        "nn.Linear (frozen)": linear,
        "QuantLinear nf4": QuantLinear.from_linear(linear, fmt="nf4").to(device),
        "QuantLinear nf4+DQ": QuantLinear.from_linear(linear, fmt="nf4", double_quant=True).to(device),
    }
    layers["naive dequant+linear"] = NaiveQuantLinear(layers["QuantLinear nf4"])
    x = torch.randn(args.tokens, args.dim, device=device, requires_grad=True)
    grad = torch.randn(args.tokens, args.dim, device=device)

    print(f"device={device} threads={torch.get_num_threads()} tokens={args.tokens} layer={args.dim}x{args.dim} fp32")
    weight_bytes = args.dim * args.dim * 4
    seconds = interleaved_medians(
        {name: (lambda layer=layer: fwd_bwd(layer, x, grad)) for name, layer in layers.items()}, repeats=args.repeats
    )
    base_time = seconds["nn.Linear (frozen)"]
    rows = []
    for name, layer in layers.items():
        held = saved_bytes(layer, x)
        stored = layer.nbytes if isinstance(layer, QuantLinear) else weight_bytes
        rows.append((name, seconds[name], seconds[name] / base_time, stored, held))
    print(f"{'layer':<22} {'fwd+bwd s':>9} {'vs Linear':>9} {'weight MiB':>10} {'held for bwd MiB':>16}")
    for name, seconds, ratio, stored, held in rows:
        print(f"{name:<22} {seconds:>9.3f} {ratio:>8.2f}x {stored / 2**20:>10.1f} {held / 2**20:>16.1f}")
    q_held = rows[1][4]
    print("(nn.Linear's saved tensor is its own parameter, not a copy; the naive layer's is a new float weight)")
    print(f"QuantLinear holds {q_held / 2**20:.1f} MiB for backward; the dequantized weight is "
          f"{weight_bytes / 2**20:.0f} MiB, so it is {'NOT ' if q_held < weight_bytes else ''}held across the passes")
    if device.type == "cuda":
        for name, layer in layers.items():
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fwd_bwd(layer, x, grad)
            print(f"cuda peak above baseline, {name}: {(torch.cuda.max_memory_allocated() - base) / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
