"""Low-rank + quantized decomposition: W ≈ Q + L1·L2 (LQ-LoRA, LoftQ).

A quantized weight Q loses information; a rank-r product L1·L2 can hold back the part that matters most.
Both are fitted together by alternating two steps that each have an exact answer for the other held fixed:

    Q      = quantize(W − L1·L2)          (round to nearest, blockwise: what a QuantLinear stores)
    L1·L2  = SVD_r(W − Q)                 (Eckart–Young: the best rank-r fit of what Q missed)

The result is an LQ adapter's starting point: freeze Q, train L1 (LoRA's B, (out, r)) and L2 (LoRA's A,
(r, in)), and at step 0 the layer already computes ≈ W instead of Q.

Two starting points, as in the papers:

- ``lq_decompose`` (LQ-LoRA, Guo et al. 2023): start on the SVD side, L1·L2 = SVD_r(W), so the largest
  directions of W are taken out *before* quantizing and Q only has to cover a smaller-range residual.
  It keeps the best iterate and stops as soon as the error rises (rounding makes the alternation non-monotone).
- ``loftq_decompose`` (LoftQ, Li et al. 2023): start on the quantized side, Q = quantize(W), and alternate a
  fixed number of times, returning the last iterate.

Data-aware variant (``weight=...``): what matters is the layer's output error ‖X(W − Q − L1L2)ᵀ‖, not the
weight error. With H = XᵀX/n (or only its diagonal, a diagonal-Fisher-like proxy), that error is
‖(W − Q − L1L2)·H^{1/2}‖_F, so the low-rank step becomes a *weighted* SVD: SVD_r((W − Q)·H^{1/2}), then
L2 ← L2·H^{-1/2}. Choice: the quantization step stays plain round-to-nearest, so Q is exactly what
``quantize`` would store for W − L1L2 (no extra per-channel scales to keep; that is ``lq_edu.awq``'s job).

Leaves out: LQ-LoRA's ILP over (bits, rank) per layer (see ``lq_edu.allocate`` for the bit part), randomized
SVD for very large matrices, and GPU-specific tricks. Math runs in fp32 on the input's device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from lq_edu.quant import QuantizedWeight, quantize

Method = Literal["lq", "lq-weighted", "loftq", "loftq-weighted"]

DEFAULT_ITERS = 5  # LoftQ's paper uses 1-5 alternations; the error rarely improves after a handful
DAMP = 0.01  # H + DAMP * mean(diag H) * I: keeps H^{-1/2} finite for channels that never fire


@dataclass(repr=False)
class LQDecomposition:
    """W ≈ Q + L1·L2: a quantized weight plus a rank-r correction (an LQ adapter's initial state).

    qweight: the quantized part Q, shape (out, in). L1: fp32 (out, r), LoRA's B. L2: fp32 (r, in), LoRA's A.
    errors: relative error after each iteration, ‖E‖_F / ‖W‖_F with E = W − Q − L1L2, or, when a ``weight``
        was given, the relative output error ‖E·H^{1/2}‖_F / ‖W·H^{1/2}‖_F (``error_kind`` says which).
    iterations: how many alternations ran. best_iteration: which one is kept (1-based).
    stopped_early: True when the error rose and the loop stopped before ``iters``.
    method: "lq" (SVD first, keep the best), "loftq" (quantize first, fixed count), "-weighted" when data-aware.
    """

    qweight: QuantizedWeight
    L1: torch.Tensor
    L2: torch.Tensor
    errors: list[float]
    iterations: int
    best_iteration: int
    stopped_early: bool
    method: Method
    error_kind: Literal["weight", "output"]

    @property
    def rank(self) -> int:
        return int(self.L1.shape[1])

    @property
    def error(self) -> float:
        """The error of the kept iterate (same kind as ``errors``)."""
        return self.errors[self.best_iteration - 1]

    def reconstruct(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Q + L1·L2 as a dense (out, in) tensor."""
        return (self.qweight.dequantize() + self.L1 @ self.L2).to(dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of Q (packed codes + scales) plus the two fp32 factors. A bf16 adapter would take half of theirs."""
        return self.qweight.nbytes + (self.L1.numel() + self.L2.numel()) * 4

    def __repr__(self) -> str:
        return (
            f"LQDecomposition({self.method}, {self.qweight.format}, shape={self.qweight.shape}, rank={self.rank}, "
            f"{self.error_kind} error {self.error:.4f} at iteration {self.best_iteration}/{self.iterations}"
            f"{', stopped early' if self.stopped_early else ''})"
        )


# ---------------------------------------------------------------------------------------------------------
# Checking inputs
# ---------------------------------------------------------------------------------------------------------


def _check_inputs(W: object, rank: object, iters: object) -> torch.Tensor:
    if not isinstance(W, torch.Tensor) or not W.is_floating_point():
        got = W.dtype if isinstance(W, torch.Tensor) else type(W).__name__
        raise TypeError(f"W must be a float tensor (out_features, in_features); got {got}")
    if W.dim() != 2:
        raise ValueError(f"W must be 2-D (out_features, in_features); got shape {tuple(W.shape)}")
    W32 = W.detach().float()
    if not torch.isfinite(W32).all():
        bad = int((~torch.isfinite(W32)).sum())
        raise ValueError(f"W has {bad} NaN/inf value(s); clean it (torch.nan_to_num) or reload the layer")
    limit = min(W.shape)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 < rank <= limit:
        raise ValueError(
            f"rank={rank!r} is not possible for a {tuple(W.shape)} matrix; use an int from 1 to min(out, in) = {limit} "
            "(16 is a common LoRA rank)"
        )
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters={iters!r}; use an int >= 1 (alternations of quantize and SVD, e.g. {DEFAULT_ITERS})")
    return W32


def _whitener(weight: torch.Tensor | None, in_features: int, device: torch.device):
    """From activation statistics, the factor R with ‖E·R‖_F² = output error: (R, R⁻¹), or (None, None).

    weight (in,): per-channel importance d (e.g. diag(XᵀX)/n): R = diag(√d), kept as a vector (in,).
    weight (in, in): a Gram matrix H = XᵀX/n: R = H^{1/2} (symmetric, by eigendecomposition), a matrix (in, in).
    Both are damped by DAMP * mean(diag) so that R⁻¹ stays finite.
    """
    if weight is None:
        return None, None
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise TypeError(f"weight must be a float tensor of shape ({in_features},) or ({in_features}, {in_features})")
    w = weight.detach().to(device=device, dtype=torch.float32)
    if w.shape not in ((in_features,), (in_features, in_features)):
        raise ValueError(
            f"weight has shape {tuple(w.shape)}; W has {in_features} input channels, so pass per-channel importance "
            f"({in_features},) (e.g. diag(XᵀX)/n or mean|x|) or a Gram matrix ({in_features}, {in_features})"
        )
    if not torch.isfinite(w).all():
        raise ValueError("weight has NaN/inf values; recompute the activation statistics")
    diag = w if w.dim() == 1 else torch.diagonal(w)
    if (diag < 0).any() or diag.sum() <= 0:
        raise ValueError("weight must be non-negative with a positive sum (it is a second moment or a mean |x|)")
    damp = DAMP * diag.mean()
    if w.dim() == 1:
        root = (w + damp).sqrt()  # (in,)
        return root, 1.0 / root
    evals, evecs = torch.linalg.eigh((w + w.T) / 2 + damp * torch.eye(in_features, device=device))
    evals = evals.clamp(min=float(damp))  # numerical noise can push the smallest ones just below 0
    root = (evecs * evals.sqrt()) @ evecs.T  # (in, in) H^{1/2}
    inv_root = (evecs * evals.rsqrt()) @ evecs.T  # (in, in) H^{-1/2}
    return root, inv_root


def _times(E: torch.Tensor, R: torch.Tensor | None) -> torch.Tensor:
    """E·R for R a vector (diagonal) or a matrix; E when R is None."""
    if R is None:
        return E
    return E * R if R.dim() == 1 else E @ R


# ---------------------------------------------------------------------------------------------------------
# The two steps
# ---------------------------------------------------------------------------------------------------------


def svd_lowrank(M: torch.Tensor, rank: int, R: torch.Tensor | None = None, R_inv: torch.Tensor | None = None):
    """Best rank-r approximation L1·L2 of M (out, in): L1 (out, r), L2 (r, in); weighted when R is given.

    Unweighted: M = U S Vᵀ, L1 = U_r √S_r, L2 = √S_r V_rᵀ (the singular values split evenly between the two
    factors, so neither dwarfs the other when both train). Weighted: the same on M·R, then L2 ← L2·R⁻¹, which
    minimises ‖(M − L1L2)·R‖_F.
    """
    U, S, Vh = torch.linalg.svd(_times(M, R), full_matrices=False)  # U (out, k), S (k,), Vh (k, in)
    root = S[:rank].sqrt()  # (r,)
    L1 = U[:, :rank] * root  # (out, r)
    L2 = root[:, None] * Vh[:rank]  # (r, in)
    return L1, _times(L2, R_inv)


def _relative_error(W: torch.Tensor, approx: torch.Tensor, R: torch.Tensor | None) -> float:
    """‖(W − approx)·R‖_F / ‖W·R‖_F (R = None: plain weight error)."""
    return float(torch.linalg.norm(_times(W - approx, R)) / torch.linalg.norm(_times(W, R)))


def _alternate(W, rank, fmt, block_size, double_quant, iters, weight, quantize_first: bool, early_stop: bool):
    R, R_inv = _whitener(weight, W.shape[1], W.device)
    if quantize_first:  # LoftQ: L1·L2 = 0, so the first Q is quantize(W)
        L1 = torch.zeros(W.shape[0], rank, device=W.device)  # (out, r)
        L2 = torch.zeros(rank, W.shape[1], device=W.device)  # (r, in)
    else:  # LQ-LoRA: take the top-r directions out first
        L1, L2 = svd_lowrank(W, rank, R, R_inv)
    errors: list[float] = []
    best = None
    stopped_early = False
    for _ in range(iters):
        qweight = quantize(W - L1 @ L2, fmt=fmt, block_size=block_size, double_quant=double_quant)
        Q = qweight.dequantize()  # (out, in)
        L1, L2 = svd_lowrank(W - Q, rank, R, R_inv)  # (out, r), (r, in)
        errors.append(_relative_error(W, Q + L1 @ L2, R))
        if not early_stop or best is None or errors[-1] < best[0]:
            best = (errors[-1], len(errors), qweight, L1, L2)
        elif early_stop and errors[-1] > errors[-2]:  # rounding made it worse: stop, keep the best
            stopped_early = len(errors) < iters
            break
    _, best_it, qweight, L1, L2 = best
    return qweight, L1.contiguous(), L2.contiguous(), errors, best_it, stopped_early


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------


def lq_decompose(
    W: torch.Tensor,
    rank: int = 16,
    fmt: str = "nf4",
    block_size: int = 64,
    double_quant: bool = False,
    iters: int = DEFAULT_ITERS,
    weight: torch.Tensor | None = None,
) -> LQDecomposition:
    """LQ-LoRA's decomposition W (out, in) ≈ Q + L1 (out, r) · L2 (r, in), starting from the SVD side.

    Alternates Q = quantize(W − L1L2) and L1L2 = SVD_r(W − Q) up to ``iters`` times; stops when the error
    rises and returns the best iterate. fmt / block_size / double_quant: as in ``lq_edu.quant.quantize``.
    weight: None (minimise weight error), per-input-channel importance (in,) such as diag(XᵀX)/n, or a Gram
    matrix (in, in); then the low-rank step is a weighted SVD and ``errors`` are relative output errors.

    Why SVD first: Q then quantizes a residual whose largest directions are gone, so its block scales are
    smaller and its rounding finer than when Q must cover all of W.
    """
    W32 = _check_inputs(W, rank, iters)
    qweight, L1, L2, errors, best_it, stopped = _alternate(
        W32, rank, fmt, block_size, double_quant, iters, weight, quantize_first=False, early_stop=True
    )
    method: Method = "lq" if weight is None else "lq-weighted"
    kind = "weight" if weight is None else "output"
    return LQDecomposition(qweight, L1, L2, errors, len(errors), best_it, stopped, method, kind)


def loftq_decompose(
    W: torch.Tensor,
    rank: int = 16,
    fmt: str = "nf4",
    block_size: int = 64,
    double_quant: bool = False,
    iters: int = DEFAULT_ITERS,
    weight: torch.Tensor | None = None,
) -> LQDecomposition:
    """LoftQ's decomposition: Q = quantize(W) first, then exactly ``iters`` alternations; returns the last one.

    Same arguments and result type as ``lq_decompose``; the baseline it is compared against in lesson 07.
    """
    W32 = _check_inputs(W, rank, iters)
    qweight, L1, L2, errors, best_it, _ = _alternate(
        W32, rank, fmt, block_size, double_quant, iters, weight, quantize_first=True, early_stop=False
    )
    method: Method = "loftq" if weight is None else "loftq-weighted"
    kind = "weight" if weight is None else "output"
    return LQDecomposition(qweight, L1, L2, errors, len(errors), best_it, False, method, kind)


def output_error(W: torch.Tensor, approx: torch.Tensor, x: torch.Tensor) -> float:
    """Relative output error of a layer on inputs x (n, in): ‖x(W − approx)ᵀ‖_F / ‖xWᵀ‖_F."""
    x32, W32 = x.detach().float(), W.detach().float()
    return float(torch.linalg.norm(x32 @ (W32 - approx.float()).T) / torch.linalg.norm(x32 @ W32.T))
