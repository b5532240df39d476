"""LoRA: a frozen base layer plus a trainable low-rank update, y = base(x) + s · B A x.

``LoRALinear`` *wraps* its base layer (kept as ``base_layer``, as PEFT does) instead of subclassing it, so
the same adapter works on a float ``nn.Linear`` and on a ``QuantLinear``:

    x: (..., in)   A = lora_A.weight: (r, in)   B = lora_B.weight: (out, r)   s = alpha / r  (rsLoRA: alpha / √r)
    y = base_layer(x) + s · dropout(x) Aᵀ Bᵀ                                   y: (..., out)

Why low rank: a full update of an (out, in) weight trains out·in numbers; B A trains r·(out + in), which is
about 3% of a 256×256 layer at r = 4 and far less for large ones.

``LQLinear`` is a QuantLinear base plus LoRA, with three starts:

- ``"zero"`` (QLoRA): Q = round-to-nearest(W), A random, B = 0, so the layer computes Q x at step 0.
- ``"lq"`` (LQ-LoRA): Q, L1, L2 from ``lq_decompose``; s·B·A = L1·L2, so Q + s·B·A ≈ W from step 0.
- ``"lq-data"``: the same with activation statistics (a Gram matrix (in, in) or importance (in,)).

``merge()`` folds s·B·A into the base weight and ``unmerge()`` takes it out again. Merging into a quantized
base builds a float ``nn.Linear`` (it does not silently re-quantize) and keeps the QuantLinear so that
``unmerge()`` restores it exactly. Leaves out: GPT-2's Conv1D bases, DoRA, several adapters per layer.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from typing import Literal

import torch
from torch import nn

from lq_edu.lowrank import DEFAULT_ITERS, lq_decompose
from lq_edu.quant_linear import QuantLinear

Init = Literal["zero", "lq", "lq-data"]
INITS: tuple[str, ...] = ("zero", "lq", "lq-data")


def check_lora_args(r: object, alpha: object, dropout: object, in_features: int, out_features: int) -> None:
    """Raise ValueError if rank, alpha or dropout cannot work for an (out_features, in_features) layer."""
    limit = min(in_features, out_features)
    if isinstance(r, bool) or not isinstance(r, int) or not 0 < r <= limit:
        raise ValueError(
            f"r={r!r} is not a possible rank for a layer with in={in_features}, out={out_features}; "
            f"use an int from 1 to min(in, out) = {limit} (8 or 16 are common)"
        )
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha={alpha!r} must be a finite number >= 0; the usual choice is 2 * r = {2 * r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"dropout={dropout!r} must be in [0, 1); use 0.0 to switch it off, 0.05-0.1 is common")


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """s = alpha / r, or alpha / √r with rsLoRA (Kalajdzievski 2023: keeps the update's size stable as r grows)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def weight_fingerprint(weight: torch.Tensor, bias: torch.Tensor | None = None) -> str:
    """SHA-256 (hex) of a layer's float weight (and bias) as fp32 bytes: how adapters recognise their base."""
    h = hashlib.sha256()
    for t in (weight, bias):
        if t is not None:
            h.update(str(tuple(t.shape)).encode())
            h.update(t.detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _base_shape(base_layer: nn.Module) -> tuple[int, int]:
    if isinstance(base_layer, (nn.Linear, QuantLinear)):
        return base_layer.in_features, base_layer.out_features
    raise TypeError(
        f"LoRALinear wraps an nn.Linear or a QuantLinear; got {type(base_layer).__name__}. "
        "Convert GPT-2's Conv1D to nn.Linear first, or pick other target modules."
    )


class LoRALinear(nn.Module):
    """A frozen ``base_layer`` (nn.Linear or QuantLinear) plus a trainable rank-r update s · B A.

    lora_A: nn.Linear(in, r), weight (r, in), init uniform(±1/√in) like PEFT (kaiming, a=√5).
    lora_B: nn.Linear(r, out), weight (out, r), init 0, so at step 0 the layer equals its base.
    seed: the seed for A's init (explicit, so two runs start from the same adapter).
    The names ``base_layer``, ``lora_A``, ``lora_B`` are the ones PEFT saves, which keeps key mapping simple.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int = 16,
        alpha: float = 32,
        dropout: float = 0.0,
        use_rslora: bool = False,
        seed: int = 0,
    ):
        super().__init__()
        in_features, out_features = _base_shape(base_layer)
        check_lora_args(r, alpha, dropout, in_features, out_features)
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = in_features, out_features
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = lora_scaling(r, alpha, use_rslora)
        self.dropout_p = float(dropout)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = base_layer.qweight.device if isinstance(base_layer, QuantLinear) else base_layer.weight.device
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=device)
        self.init = "zero"
        self.fingerprint: str | None = None  # of the original float base, set by whoever built this layer
        self.merged = False
        self._quant_base: QuantLinear | None = None  # the QuantLinear a merge replaced; unmerge restores it
        self.reset_lora(seed)

    def reset_lora(self, seed: int = 0) -> None:
        """A ~ uniform(±1/√in) from ``seed``, B = 0 (PEFT's default init)."""
        g = torch.Generator().manual_seed(seed)
        bound = 1 / math.sqrt(self.in_features)  # kaiming_uniform_(a=√5) on a (r, in) weight
        with torch.no_grad():
            a = (torch.rand(self.lora_A.weight.shape, generator=g) * 2 - 1) * bound
            self.lora_A.weight.copy_(a)
            self.lora_B.weight.zero_()

    def delta_weight(self) -> torch.Tensor:
        """s · B A, fp32 (out, in): what ``merge`` adds to the base weight."""
        return self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)  # (..., out)
        if self.merged:
            return y
        a = self.lora_A(self.lora_dropout(x).to(self.lora_A.weight.dtype))  # (..., r)
        return y + (self.lora_B(a) * self.scaling).to(y.dtype)  # (..., out)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold s·B·A into the base: W ← W + s·B·A. A QuantLinear base becomes a float nn.Linear (with a warning)."""
        if self.merged:
            raise ValueError("this LoRALinear is already merged; call unmerge() before merging again")
        delta = self.delta_weight()
        if isinstance(self.base_layer, QuantLinear):
            q = self.base_layer
            linear = nn.Linear(self.in_features, self.out_features, bias=q.bias is not None, device=delta.device)
            linear.weight.copy_(q.dequantized_weight(torch.float32) + delta)
            if q.bias is not None:
                linear.bias.copy_(q.bias)
            linear.requires_grad_(False)
            warnings.warn(
                f"merging LoRA into a quantized base ({q.qweight.format}): base_layer is now a float nn.Linear "
                f"({self.out_features}x{self.in_features} fp32, {linear.weight.numel() * 4:,} bytes), not re-quantized; "
                "unmerge() restores the QuantLinear exactly",
                UserWarning,
                stacklevel=2,
            )
            self._quant_base = q
            self.base_layer = linear
        else:
            self.base_layer.weight += delta.to(self.base_layer.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge``: W ← W − s·B·A, or put the original QuantLinear back."""
        if not self.merged:
            raise ValueError("this LoRALinear is not merged; there is nothing to unmerge")
        if self._quant_base is not None:
            self.base_layer, self._quant_base = self._quant_base, None
        else:
            self.base_layer.weight -= self.delta_weight().to(self.base_layer.weight.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        rs = ", rslora" if self.use_rslora else ""
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}{rs}, init={self.init}, merged={self.merged}"


class LQLinear(LoRALinear):
    """A QuantLinear base plus LoRA, built from a float ``nn.Linear`` with one of three starts.

    init="zero": QLoRA. Q = quantize(W), B = 0: step-0 error ‖W − Q‖.
    init="lq": LQ-LoRA. (Q, L1, L2) = lq_decompose(W, r); B = L1/√s, A = L2/√s so s·B·A = L1·L2:
        step-0 error ‖W − Q − L1·L2‖, below QLoRA's because L1·L2 holds the top of what Q loses.
    init="lq-data": as "lq" with ``stats`` (Gram (in, in) or importance (in,)): minimises the output error.
    fmt / block_size / double_quant: as in ``lq_edu.quant.quantize``. iters: alternations of ``lq_decompose``.
    """

    def __init__(
        self,
        linear: nn.Linear,
        r: int = 16,
        alpha: float = 32,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: Init = "zero",
        fmt: str = "nf4",
        block_size: int = 64,
        double_quant: bool = False,
        stats: torch.Tensor | None = None,
        iters: int = DEFAULT_ITERS,
        seed: int = 0,
    ):
        if init not in INITS:
            raise ValueError(f"init={init!r} is not known; use one of {', '.join(INITS)}")
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LQLinear starts from a float nn.Linear; got {type(linear).__name__}")
        check_lora_args(r, alpha, dropout, linear.in_features, linear.out_features)
        if init == "lq-data" and stats is None:
            raise ValueError(
                "init='lq-data' needs stats=: a Gram matrix XᵀX/n (in, in) or per-channel importance (in,) "
                "from lq_edu.calibration.collect_stats; or use init='lq'"
            )
        if init != "zero" and alpha == 0:
            raise ValueError(f"init={init!r} needs alpha > 0 (s·B·A must equal L1·L2); got alpha=0")
        W = linear.weight.detach().float()
        fingerprint = weight_fingerprint(linear.weight, linear.bias)
        decomposition = None
        if init == "zero":
            base = QuantLinear.from_linear(linear, fmt=fmt, block_size=block_size, double_quant=double_quant)
        else:
            weight = stats if init == "lq-data" else None
            decomposition = lq_decompose(W, r, fmt, block_size, double_quant, iters, weight=weight)
            base = QuantLinear(decomposition.qweight, linear.bias)
        super().__init__(base, r, alpha, dropout, use_rslora, seed)
        self.init = init
        self.fingerprint = fingerprint
        self.decomposition = decomposition  # LQDecomposition (errors per iteration), or None for "zero"
        if decomposition is not None:
            root = math.sqrt(self.scaling)
            with torch.no_grad():
                self.lora_B.weight.copy_(decomposition.L1 / root)  # (out, r)
                self.lora_A.weight.copy_(decomposition.L2 / root)  # (r, in)


@torch.no_grad()
def initial_error(layer: LoRALinear, W: torch.Tensor) -> float:
    """‖W − (base + s·B·A)‖_F / ‖W‖_F: how far the adapted layer starts from the float weight W (out, in)."""
    base = layer.base_layer
    Wb = base.dequantized_weight() if isinstance(base, QuantLinear) else base.weight.detach().float()
    approx = Wb + (0 if layer.merged else layer.delta_weight())
    return float(torch.linalg.matrix_norm(W.float() - approx) / torch.linalg.matrix_norm(W.float()))
