"""GPTQ: quantize a layer one input column at a time, and push each column's rounding error onto the columns not done yet.

Lesson 05 rebuilds this on one layer. The problem (Frantar et al., 2022, "GPTQ"): a linear layer ``y = W x`` sees
inputs ``X`` (n tokens, in). Find a quantized ``Q`` on the format's grid that keeps the outputs close::

    proxy loss = mean over tokens of ||(W - Q) x||²  =  tr((W - Q) H (W - Q)ᵀ),    H = XᵀX / n   (in, in)

Round-to-nearest (RTN) ignores H. GPTQ uses it. Each output row is a separate problem with the same H, so all
rows are solved at once, column by column (the optimal brain surgeon, OBS, step):

1. quantize column j to the nearest grid point: ``q_j``;
2. its error ``w_j - q_j`` is compensated by moving the columns not yet quantized (k > j)::

       W[:, k] -= (w_j - q_j) / [H⁻¹]_jj · [H⁻¹]_jk        (H⁻¹ of the columns j, j+1, ... only)

3. the inverse of "H without the columns already done" is needed at every step. GPTQ's trick: row j of the upper
   Cholesky factor U of H⁻¹ (``H⁻¹ = UᵀU``) holds exactly ``[H⁻¹]_jk / sqrt([H⁻¹]_jj)`` for that shrinking
   problem, so one factorisation serves every step: ``err = (w_j - q_j) / U_jj``, ``W[:, j:] -= err ⊗ U[j, j:]``.
4. lazy block updates: inside a block of ``lazy_block`` columns the updates go only to the block; the rest of W
   gets them all at once as one matrix product (``W[:, i2:] -= Err @ U[i1:i2, i2:]``). Same result, less memory
   traffic.

Details that make it work on real layers:

- damping: ``H + damp · mean(diag H) · I`` (1% by default), so H⁻¹ exists even when few tokens make XᵀX singular.
  If the Cholesky factorisation still fails, the damping grows x10 (with a warning) up to ``MAX_DAMP``; past that
  the layer falls back to RTN (identity H), with a warning. Never a crash, never NaNs.
- dead input channels (``H[i, i] == 0``: the input is always 0): ``H[i, i] = 1`` and ``W[:, i] = 0``; the weight
  never mattered, and a zero keeps it out of its group's scale.
- groups: a group is a ``QuantizedWeight`` block, ``block_size`` consecutive input columns of one row, with its
  own absmax scale. Without act-order a group's scale is taken when GPTQ reaches the group's first column, from the
  weights as they are *then* (already moved by the errors of earlier columns).
- act-order (``act_order=True``): quantize the columns in order of decreasing ``H[i, i]`` (the most active inputs
  first, while many columns remain to absorb their error). Columns of one group are then visited out of order, so
  the scales are *static*: computed up front from the original weights.

The result is an ordinary ``QuantizedWeight`` in any NF-k, FP4 or intN format: ``lq_edu.quant.dequantize`` reads it
and a ``QuantLinear`` holds it unchanged. Leaves out: GPU kernels, zero-point (asymmetric) grids, and GPTQ's
scale search. With ``double_quant`` the scales are double-quantized after GPTQ (as QLoRA does after RTN); GPTQ does
not see that small 8-bit error of the scales.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from lq_edu.quant import (
    _TINY,
    FORMATS,
    QuantizedWeight,
    _check_block_size,
    _divisor,
    _nearest,
    double_quantize,
    fp4_codebook,
    int_codebook,
    nf_codebook,
    pack,
    quantize,
)

MAX_DAMP = 100.0  # damping tries go damp, 10·damp, ... up to this (x mean diag H); past it GPTQ falls back to RTN
_STACKLEVEL = 4  # warnings point at gptq's caller: inverse_hessian_cholesky <- gptq <- torch.no_grad wrapper <- caller


@dataclass(repr=False)
class GPTQResult:
    """What ``gptq`` did to one layer.

    qweight: the quantized weight, a ``QuantizedWeight`` of shape (out, in).
    loss: proxy loss of GPTQ, ``tr((W - Q) H (W - Q)ᵀ)`` with the H that was given (undamped). With H = XᵀX / n it is
        the mean squared output error per token, summed over the out features (units of y², per token).
    rtn_loss: the same for round-to-nearest (``lq_edu.quant.quantize``), for comparison.
    damp: the damping finally used (fraction of mean diag H); larger than asked if H needed more.
    dead: number of dead input channels (``H[i, i] == 0``), whose weights were set to 0.
    perm: act-order's column order, long (in,), or None.
    """

    qweight: QuantizedWeight
    loss: float
    rtn_loss: float
    damp: float
    dead: int
    perm: torch.Tensor | None = None

    def __repr__(self) -> str:
        return (
            f"GPTQResult({self.qweight.format}, shape={self.qweight.shape}, loss={self.loss:.4g} "
            f"(RTN {self.rtn_loss:.4g}), damp={self.damp:g}, dead={self.dead})"
        )


# ---------------------------------------------------------------------------------------------------------
# The grid: which values a column may take, given its group's scale
# ---------------------------------------------------------------------------------------------------------


@dataclass
class _Grid:
    """A format's grid. NF/FP: codebook in [-1, 1], scale = absmax. intN: integers -qmax..qmax, scale = absmax / qmax."""

    format: str
    bits: int
    codebook: torch.Tensor  # fp32 (<= 2^bits,)
    qmax: int | None  # None for codebook formats (NF, FP4)

    def scale(self, absmax: torch.Tensor) -> torch.Tensor:
        """Group scales from group absmax, as ``lq_edu.quant`` computes them: (out,) -> (out,)."""
        return absmax if self.qmax is None else absmax / self.qmax

    def round(self, w: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest grid point of each weight: w (out,), scale (out,) -> codes uint8 (out,), values fp32 (out,).

        The same arithmetic as ``lq_edu.quant`` (multiply by 1/absmax and pick the nearest codebook entry, or divide
        by the step and round), so with H = I GPTQ gives RTN's codes bit for bit.
        """
        if self.qmax is None:
            codes = _nearest(w * (1 / scale.clamp(min=_TINY)), self.codebook)
        else:
            codes = (torch.round(w / _divisor(scale)).clamp(-self.qmax, self.qmax) + self.qmax).to(torch.uint8)
        return codes, self.codebook[codes.long()] * scale


def _grid(fmt: str, device: torch.device) -> _Grid:
    if fmt not in FORMATS:
        raise ValueError(f"fmt={fmt!r} is not a known format; use one of {', '.join(FORMATS)}")
    if fmt == "fp4":
        return _Grid(fmt, 4, fp4_codebook().to(device), None)
    bits = int(fmt[-1])
    if fmt.startswith("nf"):
        return _Grid(fmt, bits, nf_codebook(bits).to(device), None)
    return _Grid(fmt, bits, int_codebook(bits).to(device), 2 ** (bits - 1) - 1)


# ---------------------------------------------------------------------------------------------------------
# The inverse Hessian's Cholesky factor, with damping that grows until it exists
# ---------------------------------------------------------------------------------------------------------


def inverse_hessian_cholesky(hessian: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of ``(H + damp · mean(diag H) · I)⁻¹``: (in, in) -> ((in, in) fp32, damp used).

    Why damping: with fewer tokens than inputs, or inputs that move together, XᵀX is singular and has no inverse; a
    little extra diagonal makes it positive definite and also keeps GPTQ's updates from overshooting.
    If a factorisation fails (H not positive definite enough), the damping is multiplied by 10 with a warning, up to
    ``MAX_DAMP``; if even that fails, U = I is returned with a warning, which makes GPTQ round-to-nearest.
    """
    n = hessian.shape[0]
    eye = torch.eye(n, dtype=hessian.dtype, device=hessian.device)
    mean_diag = hessian.diagonal().mean().clamp(min=_TINY)
    while damp <= MAX_DAMP:
        L, info = torch.linalg.cholesky_ex(hessian + damp * mean_diag * eye)  # lower: H_damped = L Lᵀ
        if int(info) == 0:
            h_inv = torch.cholesky_inverse(L)  # (in, in) H_damped⁻¹
            U, info = torch.linalg.cholesky_ex(h_inv, upper=True)  # H_damped⁻¹ = Uᵀ U
            if int(info) == 0 and bool(torch.isfinite(U).all()):
                return U, damp
        more = damp * 10 if damp > 0 else 0.01
        if more > MAX_DAMP:
            break
        warnings.warn(
            f"the Hessian ({n} x {n}) is singular or ill-conditioned with damp={damp:g}; retrying with damp={more:g}. "
            "Usually this means too few calibration tokens for this layer; more samples give a better-conditioned H.",
            RuntimeWarning,
            stacklevel=_STACKLEVEL,
        )
        damp = more
    warnings.warn(
        f"the Hessian ({n} x {n}) stays singular even with damp={damp:g}; this layer falls back to round-to-nearest "
        "(identity Hessian). Check the calibration data: is H finite and built from real activations?",
        RuntimeWarning,
        stacklevel=_STACKLEVEL,
    )
    return eye.clone(), damp


# ---------------------------------------------------------------------------------------------------------
# GPTQ
# ---------------------------------------------------------------------------------------------------------


def proxy_loss(weight: torch.Tensor, dequantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr((W - Q) H (W - Q)ᵀ)``: W, Q (out, in), H (in, in). The output error GPTQ minimises (see module doc)."""
    err = weight.float() - dequantized.float().to(weight.device)  # (out, in)
    return float(((err @ hessian.float().to(weight.device)) * err).sum())


def _check_inputs(weight: object, hessian: object, block_size: object, damp: object, lazy_block: object) -> int:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        got = f"shape {tuple(weight.shape)}, {weight.dtype}" if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must be a 2-D float tensor (out_features, in_features); got {got}")
    out_features, in_features = weight.shape
    if not isinstance(hessian, torch.Tensor) or tuple(hessian.shape) != (in_features, in_features):
        got = tuple(hessian.shape) if isinstance(hessian, torch.Tensor) else type(hessian).__name__
        raise ValueError(
            f"hessian must be ({in_features}, {in_features}) for a weight of shape {tuple(weight.shape)}; got {got}. "
            "Build it from the layer's inputs, e.g. collect_stats(...)[name].hessian"
        )
    block_size = _check_block_size(block_size)
    if in_features % block_size:
        raise ValueError(
            f"in_features={in_features} is not a multiple of block_size={block_size}; GPTQ's groups are whole blocks "
            f"of one row's input columns. Use a block_size that divides {in_features}, or quantize this layer with "
            "lq_edu.quant.quantize (round-to-nearest)"
        )
    if not isinstance(damp, (int, float)) or isinstance(damp, bool) or not (0 <= damp <= MAX_DAMP):
        raise ValueError(f"damp={damp!r} must be a number from 0 to {MAX_DAMP:g} (a fraction of mean diag H; try 0.01)")
    if not isinstance(lazy_block, int) or isinstance(lazy_block, bool) or lazy_block < 1:
        raise ValueError(f"lazy_block={lazy_block!r} must be a positive int (columns per lazy update; 128 is usual)")
    for name, t in (("weight", weight), ("hessian", hessian)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} has NaN/inf values; GPTQ needs finite inputs. Find where they come from first")
    return block_size


@torch.no_grad()
def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    fmt: str = "nf4",
    block_size: int = 64,
    double_quant: bool = False,
    damp: float = 0.01,
    act_order: bool = False,
    lazy_block: int = 128,
) -> GPTQResult:
    """Quantize ``weight`` (out, in) with GPTQ against ``hessian`` (in, in); returns a ``GPTQResult``.

    fmt: any ``lq_edu.quant`` format ("nf4", "nf3", "int4", "fp4", ...). block_size: input columns per scale
    (must divide in_features). damp: damping, a fraction of mean diag H. act_order: visit columns by decreasing
    H[i, i], with static group scales. lazy_block: columns per lazy update (rounded to whole groups).
    Math in fp32 on ``weight``'s device. ``gptq_quantize`` is the same, returning only the ``QuantizedWeight``.
    """
    block_size = _check_inputs(weight, hessian, block_size, damp, lazy_block)
    grid = _grid(fmt, weight.device)
    out_features, in_features = weight.shape
    W = weight.detach().to(torch.float32).clone()  # (out, in), updated in place as columns are quantized
    H = hessian.detach().to(device=W.device, dtype=torch.float32).clone()  # (in, in)

    # Dead inputs: always zero, so their weights never mattered. Zero them (so they don't inflate a group's scale).
    dead = H.diagonal() == 0  # (in,) bool
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    # Static scales for act-order, from the original weights: (out, n_groups)
    n_groups = in_features // block_size
    scales = torch.zeros(out_features, n_groups, device=W.device)  # (out, n_groups), filled as groups are reached
    if act_order:
        scales = grid.scale(W.view(out_features, n_groups, block_size).abs().amax(dim=2))
        perm = torch.argsort(H.diagonal(), descending=True)  # (in,) most active inputs first
        W, H = W[:, perm], H[perm][:, perm]
    else:
        perm = None
    group_of = (perm if perm is not None else torch.arange(in_features, device=W.device)) // block_size  # (in,)

    U, damp_used = inverse_hessian_cholesky(H, damp)  # (in, in) upper factor of H_damped⁻¹

    codes = torch.zeros(out_features, in_features, dtype=torch.uint8, device=W.device)  # (out, in), visiting order
    Q = torch.zeros_like(W)  # (out, in) dequantized values, visiting order
    lazy = max(block_size, lazy_block // block_size * block_size)  # whole groups per lazy block
    for i1 in range(0, in_features, lazy):
        i2 = min(i1 + lazy, in_features)
        W1 = W[:, i1:i2].clone()  # (out, B) this block's columns, kept up to date inside the block
        Err1 = torch.zeros_like(W1)  # (out, B) scaled errors, for the one lazy update of the rest of W
        U1 = U[i1:i2, i1:i2]  # (B, B)
        for i in range(i2 - i1):
            j = i1 + i  # column being quantized (visiting order)
            if not act_order and j % block_size == 0:  # first column of a group: its scale, from current weights
                scales[:, j // block_size] = grid.scale(W1[:, i : i + block_size].abs().amax(dim=1))
            w = W1[:, i]  # (out,)
            c, q = grid.round(w, scales[:, group_of[j]])  # (out,) codes and values
            codes[:, j], Q[:, j] = c, q
            err = (w - q) / U1[i, i]  # (out,)
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]  # OBS update of this block's remaining columns
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]  # lazy update: (out, B) @ (B, in - i2)

    if perm is not None:  # back to the original column order
        inverse = torch.argsort(perm)
        codes, Q = codes[:, inverse], Q[:, inverse]
    flat_scales = scales.reshape(-1)  # (out * n_groups,) = (n_blocks,): block r * n_groups + g is row r, group g
    qweight = QuantizedWeight(
        packed=pack(codes.reshape(-1, block_size), grid.bits),
        scales=double_quantize(flat_scales) if double_quant else flat_scales,
        shape=(out_features, in_features),
        block_size=block_size,
        format=fmt,
        bits=grid.bits,
        codebook=grid.codebook,
    )
    w32 = weight.detach().float()
    rtn = quantize(w32, fmt, block_size, double_quant).dequantize()
    return GPTQResult(
        qweight=qweight,
        loss=proxy_loss(w32, qweight.dequantize(), hessian),
        rtn_loss=proxy_loss(w32, rtn, hessian),
        damp=damp_used,
        dead=int(dead.sum()),
        perm=perm,
    )


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    fmt: str = "nf4",
    block_size: int = 64,
    double_quant: bool = False,
    damp: float = 0.01,
    act_order: bool = False,
    lazy_block: int = 128,
) -> QuantizedWeight:
    """GPTQ for one weight (out, in) given its Hessian (in, in): a ``QuantizedWeight`` that ``QuantLinear`` can hold.

    See ``gptq`` for the arguments and for a report with the proxy loss.
    """
    return gptq(weight, hessian, fmt, block_size, double_quant, damp, act_order, lazy_block).qweight


__all__ = ["GPTQResult", "MAX_DAMP", "gptq", "gptq_quantize", "inverse_hessian_cholesky", "proxy_loss"]
