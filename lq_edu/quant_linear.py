"""QuantLinear: a frozen linear layer whose weight is stored quantized.

The weight lives only in its packed form (a ``QuantizedWeight``: codes,
scales, shape, block size, format). Each forward pass dequantizes it to the
compute dtype, multiplies, and lets the dequantized copy go. The backward
pass dequantizes it *again* to send gradients to the input, instead of
keeping the forward's copy alive in between: that trade (a little compute for
a full-size weight's worth of memory per layer) is what lets a frozen 4-bit
base fit where its 16-bit copy would not.

The weight is frozen: no gradient flows to it (adapters, from lesson 06, are
what trains). A bias, if any, stays in float and frozen too.

    y = x @ dequantize(Q)^T + b        x: (..., in_features)  y: (..., out_features)
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from lq_edu.quant import QuantizedWeight, iter_row_slices

CHUNK_ELEMENTS = 2**21  # weight elements dequantized at a time (8 MiB in fp32)


def _row_chunks(qweight: QuantizedWeight) -> list[tuple[int, int]] | None:
    """Row ranges to dequantize one after another, or None if the weight must be done whole."""
    out_features, in_features = qweight.shape
    if in_features % qweight.block_size or out_features * in_features <= CHUNK_ELEMENTS:
        return None
    rows = max(1, CHUNK_ELEMENTS // in_features)
    return [(r, min(r + rows, out_features)) for r in range(0, out_features, rows)]


def _weight_slices(qweight: QuantizedWeight, dtype: torch.dtype):
    """Yield ``(start, end, W[start:end])`` in ``dtype``: the whole weight, or row slices of a big one."""
    chunks = _row_chunks(qweight)
    if chunks is None:
        yield 0, qweight.shape[0], qweight.dequantize(dtype=dtype)
        return
    yield from iter_row_slices(qweight, chunks[0][1] - chunks[0][0], dtype)


class DequantLinearFunction(torch.autograd.Function):
    """``F.linear`` with a quantized weight that is dequantized in forward and again in backward.

    Only the packed weight (already held by the module) is referenced between
    the two passes; no dequantized tensor is saved for backward. Large weights
    are dequantized a slice of rows at a time (``CHUNK_ELEMENTS``), so even the
    transient float copy is a slice, not the whole matrix.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, qweight: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.qweight = qweight  # the packed state only
        x2d = x.reshape(-1, x.shape[-1])  # (N, in)
        y = torch.empty(x2d.shape[0], qweight.shape[0], dtype=x.dtype, device=x.device)  # (N, out)
        for start, end, w in _weight_slices(qweight, x.dtype):
            torch.mm(x2d, w.t(), out=y[:, start:end])  # (N, in) @ (in, rows) -> (N, rows)
        if bias is not None:
            y += bias
        return y.view(*x.shape[:-1], qweight.shape[0])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        # dL/dx = dL/dy @ W, summed over row slices of W: (N, rows) @ (rows, in) -> (N, in)
        g2d = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
        grad_x = torch.empty(g2d.shape[0], ctx.qweight.shape[1], dtype=grad_out.dtype, device=grad_out.device)
        for start, end, w in _weight_slices(ctx.qweight, grad_out.dtype):
            if start == 0:
                torch.mm(g2d[:, start:end], w, out=grad_x)  # the first slice writes, the rest add
            else:
                grad_x.addmm_(g2d[:, start:end], w)
        return grad_x.view(*grad_out.shape[:-1], ctx.qweight.shape[1]), None, None


def _map_tensors(obj, fn):
    """Apply ``fn`` to every tensor inside a (possibly nested) dataclass, keeping dtypes."""
    if isinstance(obj, torch.Tensor):
        moved = fn(obj)
        return moved if moved.dtype == obj.dtype else moved.to(obj.dtype)  # a format's dtypes are fixed
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: _map_tensors(getattr(obj, f.name), fn) for f in dataclasses.fields(obj)}
        return dataclasses.replace(obj, **changes)
    return obj


class QuantLinear(nn.Module):
    """A frozen linear layer holding a ``QuantizedWeight``; computes in the input's dtype.

    Build one from a float layer with ``QuantLinear.from_linear(linear, fmt=...)``.
    ``.to(device)`` moves the packed state; dtype casts (``.half()``) leave it alone,
    since its dtypes are part of its format. Only the bias is a parameter.
    """

    def __init__(self, qweight: QuantizedWeight, bias: torch.Tensor | None = None, name: str = ""):
        super().__init__()
        if len(qweight.shape) != 2:
            raise ValueError(f"QuantLinear needs a 2-D weight (out_features, in_features), got shape {tuple(qweight.shape)}")
        self.qweight = qweight
        self.out_features, self.in_features = (int(s) for s in qweight.shape)
        self.name = name
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        fmt: str = "nf4",
        block_size: int = 64,
        double_quant: bool = False,
        name: str = "",
    ) -> QuantLinear:
        """Quantize an ``nn.Linear`` (or GPT-2's ``Conv1D``, whose weight is stored transposed)."""
        from lq_edu.quant import quantize

        weight, bias = linear_weight(linear)
        qweight = quantize(weight.detach(), fmt=fmt, block_size=block_size, double_quant=double_quant)
        return cls(qweight, bias, name=name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return DequantLinearFunction.apply(x, self.qweight, bias)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as a float tensor (out_features, in_features): for inspection and merging."""
        return self.qweight.dequantize(dtype=dtype)

    @property
    def weight(self) -> torch.Tensor:
        """A dequantized fp32 copy, so code that reads ``layer.weight.shape`` or ``.device`` still works.

        It is rebuilt on every access and is not a parameter: assigning to it does nothing useful.
        """
        return self.dequantized_weight(torch.float32)

    @property
    def nbytes(self) -> int:
        """True bytes of the packed weight (codes + scales) plus the bias."""
        bias_bytes = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return self.qweight.nbytes + bias_bytes

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self.qweight = _map_tensors(self.qweight, fn)
        return self

    def extra_repr(self) -> str:
        q = self.qweight
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"format={q.format}, block_size={q.block_size}, bits/param={q.bits_per_param:.3f}"
        )


def linear_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight as (out_features, in_features) and the bias of an ``nn.Linear`` or GPT-2 ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    if _is_conv1d(module):
        return module.weight.t(), module.bias  # Conv1D stores (in, out): y = x @ W + b
    raise TypeError(f"expected nn.Linear or transformers' Conv1D, got {type(module).__name__}")


def _is_conv1d(module: nn.Module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(module, Conv1D)
