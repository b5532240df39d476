"""Activation-aware scaling (AWQ): protect the input channels that carry large activations.

A linear layer computes y = x·Wᵀ. For any positive per-input-channel scale s (in,),

    y = (x / s) · (W·diag(s))ᵀ

exactly. Quantizing W·diag(s) instead of W multiplies the weights of channel j by s_j before rounding, so
channels with s_j > 1 get relatively finer steps (their block's absmax grows less than they do). AWQ (Lin et
al., 2023) picks s = mean|x|^α: channels whose inputs are large, where a weight error costs most, are
protected. α is found by a grid search over [0, 1] that minimises the layer's *output* error on a small
sample of real inputs; α = 0 gives s = 1, plain round-to-nearest.

The 1/s on the input must go somewhere. Where the op before the layer is linear in each channel, fold it in
and the model's shape does not change (``fold_scales``):

- Llama ``input_layernorm`` (RMSNorm weight) feeds q/k/v_proj: norm.weight /= s, one s shared by all three;
- ``post_attention_layernorm`` feeds gate/up_proj: the same;
- ``up_proj``'s output rows feed ``down_proj`` (through silu(gate)·up, linear in up): up rows /= s;
- ``v_proj``'s output rows feed ``o_proj`` only when they line up one to one (no grouped-query attention).

Otherwise (o_proj under grouped-query attention, as in the course model, or any layer whose input comes from
a non-linear op) the scale stays in the layer: ``ScaledQuantLinear`` divides x by s, then calls a
``QuantLinear`` holding quantize(W·diag(s)). Cost: in_features fp32 numbers and one multiply per input.

Leaves out: AWQ's weight clipping search, tied scales across grouped-query heads, and fused kernels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lq_edu.quant import quantize
from lq_edu.quant_linear import QuantLinear, linear_weight

DEFAULT_GRID = 20  # AWQ's grid: α = 0, 1/20, ..., 1


@dataclass(repr=False)
class AWQResult:
    """The outcome of ``awq_search`` for a group of linears that read the same input.

    alpha: the best exponent in [0, 1]. scales: fp32 (in,), s = mean|x|^α normalised to geometric-mean-ish 1
    (s / √(max·min)); divide the input by it and multiply W's columns by it. alphas: the grid (G,).
    errors: relative output error ‖x(W − Ŵ)ᵀ‖² / ‖xWᵀ‖² summed over the group, per α (G,).
    """

    alpha: float
    scales: torch.Tensor
    alphas: list[float]
    errors: list[float]

    @property
    def error(self) -> float:
        """Output error at the chosen α."""
        return self.errors[self.alphas.index(self.alpha)]

    @property
    def rtn_error(self) -> float:
        """Output error at α = 0: plain round-to-nearest."""
        return self.errors[0]

    @property
    def gain(self) -> float:
        """rtn_error / error: how many times smaller AWQ makes the output error (>= 1)."""
        return self.rtn_error / self.error if self.error > 0 else float("inf")

    def __repr__(self) -> str:
        return (
            f"AWQResult(alpha={self.alpha:.2f}, error {self.error:.5f} vs RTN {self.rtn_error:.5f}, {self.gain:.2f}x)"
        )


def awq_scales(x_abs_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = mean|x|^α (in,), normalised by √(max·min) so that the scales straddle 1.

    The normalisation changes no result (a blockwise absmax quantizer is scale-free); it keeps W·diag(s)
    in the range W had, so fp16/bf16 copies neither overflow nor underflow.
    """
    s = x_abs_mean.detach().float().clamp(min=1e-8).pow(alpha)  # (in,)
    return s / (s.max() * s.min()).sqrt()


def _check_stats(weights: Sequence[torch.Tensor], x_abs_mean: torch.Tensor, x_sample: torch.Tensor) -> None:
    in_features = weights[0].shape[1]
    for W in weights:
        if W.dim() != 2 or W.shape[1] != in_features:
            raise ValueError(
                f"weights must be 2-D (out, in) with the same in_features; got {[tuple(w.shape) for w in weights]}"
            )
    if x_abs_mean.shape != (in_features,):
        raise ValueError(
            f"x_abs_mean has shape {tuple(x_abs_mean.shape)}; it must be ({in_features},), the mean |x| of each "
            "input channel (e.g. x.abs().mean(0) over captured inputs)"
        )
    if x_sample.dim() != 2 or x_sample.shape[1] != in_features:
        raise ValueError(
            f"x_sample has shape {tuple(x_sample.shape)}; it must be (n, {in_features}): a few hundred captured "
            "input rows (flatten batch and sequence)"
        )
    if not (torch.isfinite(x_abs_mean).all() and torch.isfinite(x_sample).all()):
        raise ValueError("x_abs_mean or x_sample has NaN/inf values; recapture the activations")


@torch.no_grad()
def awq_search(
    W: torch.Tensor | Sequence[torch.Tensor],
    x_abs_mean: torch.Tensor,
    x_sample: torch.Tensor,
    fmt: str = "nf4",
    block_size: int = 64,
    double_quant: bool = False,
    grid: int = DEFAULT_GRID,
) -> AWQResult:
    """Grid search for α in {0, 1/grid, ..., 1} minimising the output error of quantize(W·diag(s)) / s.

    W: one weight (out, in), or several that read the same input (q, k, v) and so must share one s; each is
    quantized on its own and their relative output errors are summed. x_abs_mean (in,): mean |x| per input
    channel. x_sample (n, in): inputs the error is measured on. grid: number of steps (grid + 1 points).
    """
    weights = [W] if isinstance(W, torch.Tensor) else list(W)
    if not weights:
        raise ValueError("W is an empty list; pass one weight (out, in) or the weights that share an input")
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
        raise ValueError(f"grid={grid!r}; use an int >= 1 (AWQ uses {DEFAULT_GRID})")
    _check_stats(weights, x_abs_mean, x_sample)
    x = x_sample.detach().float()  # (n, in)
    targets = [(w.detach().float(), x @ w.detach().float().T) for w in weights]  # (out, in), (n, out)
    alphas = [i / grid for i in range(grid + 1)]
    errors = []
    for alpha in alphas:
        s = awq_scales(x_abs_mean, alpha).to(x.device)  # (in,)
        err = 0.0
        for w, y in targets:
            w_hat = quantize(w * s, fmt, block_size, double_quant).dequantize() / s  # (out, in)
            err += float(((x @ w_hat.T - y) ** 2).sum() / (y**2).sum())
        errors.append(err)
    best = min(range(len(alphas)), key=errors.__getitem__)  # ties go to the smaller α (RTN first)
    return AWQResult(alphas[best], awq_scales(x_abs_mean, alphas[best]), alphas, errors)


# ---------------------------------------------------------------------------------------------------------
# Where the 1/s goes
# ---------------------------------------------------------------------------------------------------------


class ScaledQuantLinear(nn.Module):
    """y = base_layer(x / s): a QuantLinear of W·diag(s) behind a per-input-channel scale.

    input_scale: fp32 buffer (in,). base_layer: the ``QuantLinear`` (wrapped, not subclassed).
    Why: used where 1/s cannot be folded into the op before the layer.
    """

    def __init__(self, base_layer: QuantLinear, input_scale: torch.Tensor):
        super().__init__()
        if input_scale.shape != (base_layer.in_features,):
            raise ValueError(
                f"input_scale has shape {tuple(input_scale.shape)}; the layer has {base_layer.in_features} inputs"
            )
        self.base_layer = base_layer
        self.register_buffer("input_scale", input_scale.detach().float().clone())
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features

    @classmethod
    def from_linear(
        cls, linear: nn.Module, scales: torch.Tensor, fmt: str = "nf4", block_size: int = 64, double_quant: bool = False
    ) -> ScaledQuantLinear:
        weight, bias = linear_weight(linear)  # (out, in), (out,) | None
        qweight = quantize(weight.detach().float() * scales, fmt, block_size, double_quant)
        return cls(QuantLinear(qweight, bias), scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x / self.input_scale.to(x.dtype))

    @property
    def nbytes(self) -> int:
        """Bytes of the QuantLinear plus the fp32 scale."""
        return self.base_layer.nbytes + self.input_scale.numel() * 4


@torch.no_grad()
def fold_scales(prev: nn.Module, linears: Sequence[nn.Module], scales: torch.Tensor) -> None:
    """Move 1/s into ``prev`` and s into the columns of ``linears``, in place; the float model's output is unchanged.

    prev: a norm with a per-channel ``weight`` (RMSNorm, LayerNorm: weight and bias are divided by s), or an
    ``nn.Linear`` whose output rows feed the linears (its rows and bias are divided by s).
    linears: the ``nn.Linear`` layers that read prev's output: weight (out, in) -> weight·diag(s).
    """
    s = scales.detach().float()  # (in,)
    if isinstance(prev, nn.Linear):
        if prev.out_features != s.numel():
            raise ValueError(
                f"{type(prev).__name__} has {prev.out_features} outputs but the scale has {s.numel()}; they must "
                "line up one to one (grouped-query v_proj -> o_proj does not): use ScaledQuantLinear instead"
            )
        prev.weight.div_(s[:, None].to(prev.weight))
        if prev.bias is not None:
            prev.bias.div_(s.to(prev.bias))
    else:
        weight = getattr(prev, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.shape != s.shape:
            raise ValueError(
                f"cannot fold into {type(prev).__name__}: it needs a per-channel weight of shape {tuple(s.shape)} "
                "(an RMSNorm / LayerNorm) or to be an nn.Linear; use ScaledQuantLinear instead"
            )
        weight.div_(s.to(weight))
        if getattr(prev, "bias", None) is not None:
            prev.bias.div_(s.to(prev.bias))
    for lin in linears:
        if not isinstance(lin, nn.Linear) or lin.in_features != s.numel():
            raise ValueError(f"every linear must be an nn.Linear with {s.numel()} inputs; got {lin}")
        lin.weight.mul_(s[None, :].to(lin.weight))


# ---------------------------------------------------------------------------------------------------------
# A whole Llama model
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def capture_inputs(model: nn.Module, names: Sequence[str], input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run ``input_ids`` (B, T) through ``model`` and return each named layer's input as fp32 (B*T, in).

    Uses forward pre-hooks, removed afterwards even on error.
    """
    captured: dict[str, torch.Tensor] = {}

    def hook(name):
        return lambda module, args: captured.__setitem__(name, args[0].detach().reshape(-1, args[0].shape[-1]).float())

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        model(input_ids=input_ids.to(next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    return captured


@dataclass
class AWQReport:
    """What ``awq_quantize_model`` did: one AWQResult per group, which groups were folded and which kept."""

    results: dict[str, AWQResult]  # group name (e.g. "model.layers.0.qkv") -> search result
    folded: list[str]  # groups whose 1/s went into the previous op
    kept: list[str]  # linears that got a ScaledQuantLinear

    def __str__(self) -> str:
        gains = [r.gain for r in self.results.values()]
        return (
            f"AWQ on {len(self.results)} groups ({len(self.folded)} folded, {len(self.kept)} kept in the layer); "
            f"output error vs RTN: {min(gains):.2f}x to {max(gains):.2f}x smaller"
        )


def _llama_groups(model: nn.Module) -> list[tuple[str, str, list[str]]]:
    """(group name, previous op, linears) for each Llama decoder layer, in the order AWQ treats them."""
    groups = []
    for name, module in model.named_modules():
        if not (hasattr(module, "self_attn") and hasattr(module, "mlp") and hasattr(module, "input_layernorm")):
            continue
        a, m = f"{name}.self_attn", f"{name}.mlp"
        groups += [
            (f"{name}.qkv", f"{name}.input_layernorm", [f"{a}.q_proj", f"{a}.k_proj", f"{a}.v_proj"]),
            (f"{name}.o", f"{a}.v_proj", [f"{a}.o_proj"]),
            (f"{name}.gate_up", f"{name}.post_attention_layernorm", [f"{m}.gate_proj", f"{m}.up_proj"]),
            (f"{name}.down", f"{m}.up_proj", [f"{m}.down_proj"]),
        ]
    if not groups:
        raise ValueError(
            f"{type(model).__name__} has no Llama-style decoder layers (self_attn, mlp, input_layernorm); "
            "use awq_search and ScaledQuantLinear layer by layer"
        )
    return groups


@torch.no_grad()
def awq_quantize_model(
    model: nn.Module,
    input_ids: torch.Tensor,
    fmt: str = "nf4",
    block_size: int = 64,
    double_quant: bool = False,
    grid: int = DEFAULT_GRID,
    fold: bool = True,
    max_rows: int = 2048,
    progress: bool = True,
) -> AWQReport:
    """AWQ for a Llama-style model, in place: search a scale per group, fold it (or keep it), then quantize.

    input_ids (B, T): calibration tokens; every linear's input is captured once from the float model.
    max_rows: input rows per layer the error is measured on (the first ones). fold=False keeps every scale
    inside its layer (``ScaledQuantLinear``), which is how a non-Llama model would be treated.
    All searches run before any weight changes; the linears are swapped in only once all are quantized.
    progress: a progress bar over the groups searched.
    """
    from tqdm.auto import tqdm

    from lq_edu.surgery import set_module

    groups = _llama_groups(model)
    names = [n for _, _, linears in groups for n in linears]
    inputs = capture_inputs(model, names, input_ids)  # name -> (B*T, in)
    results, plans = {}, []
    for group, prev_name, linears in tqdm(groups, desc=f"AWQ {fmt}", disable=not progress, leave=False):
        x = inputs[linears[0]]  # the linears of a group share their input
        weights = [linear_weight(model.get_submodule(n))[0] for n in linears]
        results[group] = awq_search(weights, x.abs().mean(0), x[:max_rows], fmt, block_size, double_quant, grid)
        prev = model.get_submodule(prev_name)
        foldable = fold and (not isinstance(prev, nn.Linear) or prev.out_features == x.shape[1])
        plans.append((group, prev, linears, foldable))

    folded, kept = [], []
    for group, prev, linears, foldable in plans:  # scaling rows of prev never changes prev's own scale search:
        s = results[group].scales  # blockwise absmax quantization is invariant to scaling a whole row
        if foldable:
            fold_scales(prev, [model.get_submodule(n) for n in linears], s)
            folded.append(group)
    new_modules: dict[str, nn.Module] = {}
    for group, _, linears, foldable in plans:
        for n in linears:
            if foldable:  # W·diag(s) is already in the layer
                new_modules[n] = QuantLinear.from_linear(model.get_submodule(n), fmt, block_size, double_quant, name=n)
            else:
                s = results[group].scales
                new_modules[n] = ScaledQuantLinear.from_linear(model.get_submodule(n), s, fmt, block_size, double_quant)
                kept.append(n)
    for n, module in new_modules.items():
        set_module(model, n, module)
    return AWQReport(results, folded, kept)
