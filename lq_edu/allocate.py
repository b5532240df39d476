"""Mixed-precision bit allocation: the best format per layer under a memory budget.

Layers are not equally sensitive: some lose little at 2 bits, others need 4. Given, for every layer, a few
candidate configurations (format, block size, double quantization) with their true bytes and a measured
error, pick one per layer to minimise the total error subject to total bytes <= budget:

    minimise   Σ_l Σ_c error[l, c] · x[l, c]
    subject to Σ_c x[l, c] = 1 for every layer l,   Σ_l Σ_c bytes[l, c] · x[l, c] <= budget,   x ∈ {0, 1}

a multiple-choice knapsack (LQ-LoRA's ILP, without its rank dimension). ``scipy.optimize.milp`` solves it
exactly in milliseconds for hundreds of layers. Without scipy (or with ``solver="greedy"``) a greedy pass over
each layer's lower convex hull of (bytes, error) gives a feasible plan, and the same hull walk, allowed to
take a fraction of the last step, gives the LP-relaxation bound: the plan reports both, so the optimality
gap is known.

Errors are additive proxies: the default is each layer's relative squared weight error ‖W − Q‖²/‖W‖²,
optionally weighted per input channel by activation statistics (diag(XᵀX)/n), which makes it the layer's
output error for channel-independent inputs. Leaves out: measured end-to-end sensitivities (Fisher of the
loss), which would weight layers against each other.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import nn

from lq_edu.quant import FORMATS, quantize
from lq_edu.quant_linear import QuantLinear, linear_weight

MiB = 2**20


@dataclass(frozen=True)
class Candidate:
    """One quantization configuration a layer may get: format, block size, double quantization."""

    fmt: str
    block_size: int = 64
    double_quant: bool = False

    def __post_init__(self):
        if self.fmt not in FORMATS:
            raise ValueError(f"fmt={self.fmt!r} is not a known format; use one of {', '.join(FORMATS)}")

    @property
    def label(self) -> str:
        """e.g. ``nf3/b64+dq``."""
        return f"{self.fmt}/b{self.block_size}{'+dq' if self.double_quant else ''}"

    def __str__(self) -> str:
        return self.label


class Measured(NamedTuple):
    """One (layer, candidate) cell: the candidate, its true bytes (QuantizedWeight.nbytes) and its error."""

    candidate: Candidate
    bytes: int
    error: float


ErrorTable = dict[str, list[Measured]]  # layer name -> one Measured per candidate
ErrorFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], float]


def relative_error(W: torch.Tensor, W_hat: torch.Tensor, importance: torch.Tensor | None = None) -> float:
    """‖(W − Ŵ)·diag(√d)‖²_F / ‖W·diag(√d)‖²_F; d = importance (in,) (e.g. diag(XᵀX)/n), or all ones.

    W, W_hat: (out, in). Squared, so that errors of layers add up like output noise does.
    """
    diff2 = (W - W_hat) ** 2  # (out, in)
    ref2 = W**2
    if importance is not None:
        diff2, ref2 = diff2 * importance, ref2 * importance
    return float(diff2.sum() / ref2.sum())


@torch.no_grad()
def measure_errors(
    model: nn.Module,
    candidates: Sequence[Candidate],
    names: Sequence[str] | None = None,
    importance: Mapping[str, torch.Tensor] | None = None,
    error_fn: ErrorFn = relative_error,
) -> ErrorTable:
    """Quantize every chosen layer with every candidate and record true bytes and ``error_fn(W, Ŵ, d)``.

    names: layer names (default: ``select_linears(model)``, every linear but lm_head and embeddings).
    importance: optional layer name -> per-input-channel statistics (in,) handed to ``error_fn``.
    Cost: one quantize + dequantize per (layer, candidate); the model is not changed.
    """
    from lq_edu.surgery import select_linears

    if not candidates:
        raise ValueError("candidates is empty; give at least one Candidate, e.g. Candidate('nf4', 64)")
    names = select_linears(model) if names is None else list(names)
    table: ErrorTable = {}
    for name in names:
        W = linear_weight(model.get_submodule(name))[0].detach().float()  # (out, in)
        d = None if importance is None else importance[name].detach().float().to(W.device)
        row = []
        for c in candidates:
            qw = quantize(W, c.fmt, c.block_size, c.double_quant)
            row.append(Measured(c, qw.nbytes, error_fn(W, qw.dequantize(), d)))
        table[name] = row
    return table


def plan_bytes(errors: ErrorTable, candidate: Candidate) -> int:
    """Total bytes if every layer took ``candidate``: the budget of a uniform plan."""
    total = 0
    for name, row in errors.items():
        match = [m for m in row if m.candidate == candidate]
        if not match:
            raise ValueError(f"layer {name} has no measurement for {candidate}; measure it first")
        total += match[0].bytes
    return total


@dataclass
class AllocationPlan:
    """One candidate per layer, its bytes and error; and how close to optimal the plan is proven to be.

    lower_bound: the LP-relaxation bound on the total error (no plan within the budget does better).
    gap: total_error − lower_bound (0 for a proven optimum; milp's is 0 up to its tolerance).
    """

    choices: dict[str, Measured]
    budget_bytes: int
    solver: Literal["milp", "greedy"]
    lower_bound: float

    @property
    def total_bytes(self) -> int:
        return sum(m.bytes for m in self.choices.values())

    @property
    def total_error(self) -> float:
        return sum(m.error for m in self.choices.values())

    @property
    def gap(self) -> float:
        return max(0.0, self.total_error - self.lower_bound)

    def table(self) -> str:
        """The plan as text: layer, config, bytes, error; then the totals."""
        width = max(len(n) for n in self.choices)
        lines = [f"{'layer':<{width}}  {'config':<12} {'bytes':>10}  {'error':>10}"]
        for name, m in self.choices.items():
            lines.append(f"{name:<{width}}  {m.candidate.label:<12} {m.bytes:>10,}  {m.error:>10.6f}")
        lines.append(
            f"{'total':<{width}}  {self.solver:<12} {self.total_bytes:>10,}  {self.total_error:>10.6f}"
            f"   (budget {self.budget_bytes:,} bytes; gap to LP bound {self.gap:.2e})"
        )
        return "\n".join(lines)

    def counts(self) -> dict[str, int]:
        """How many layers got each config, e.g. {'nf3/b64': 30, 'nf4/b64': 12}."""
        out: dict[str, int] = {}
        for m in self.choices.values():
            out[m.candidate.label] = out.get(m.candidate.label, 0) + 1
        return out

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        """Quantize each planned layer with its config, in place; all are built before any is swapped in."""
        from lq_edu.surgery import set_module

        new = {}
        for name, m in self.choices.items():
            c = m.candidate
            new[name] = QuantLinear.from_linear(model.get_submodule(name), c.fmt, c.block_size, c.double_quant, name)
        for name, module in new.items():
            set_module(model, name, module)


def _check_table(errors: ErrorTable, budget_bytes: object) -> int:
    if not errors or any(not row for row in errors.values()):
        raise ValueError("errors must map every layer to a non-empty list of (candidate, bytes, error)")
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, (int, float)) or budget_bytes <= 0:
        raise ValueError(f"budget_bytes={budget_bytes!r}; give a positive number of bytes")
    smallest = sum(min(m.bytes for m in row) for row in errors.values())
    if budget_bytes < smallest:
        raise ValueError(
            f"budget_bytes={int(budget_bytes):,} ({budget_bytes / MiB:.3f} MiB) is below the smallest possible plan, "
            f"{smallest:,} bytes ({smallest / MiB:.3f} MiB), every layer in its smallest candidate; raise the budget "
            "or add smaller candidates (fewer bits, larger blocks, double quantization)"
        )
    return int(budget_bytes)


def _hull(row: Sequence[Measured]) -> list[Measured]:
    """The lower convex hull of (bytes, error), from the smallest to the most accurate: the only useful steps."""
    pts = sorted(row, key=lambda m: (m.bytes, m.error))
    hull: list[Measured] = []
    for m in pts:
        if hull and m.error >= hull[-1].error:  # bigger and no better: never worth it
            continue
        while len(hull) >= 2:  # drop the middle point if it lies above the chord
            a, b = hull[-2], hull[-1]
            if (b.error - a.error) * (m.bytes - a.bytes) >= (m.error - a.error) * (b.bytes - a.bytes):
                hull.pop()
            else:
                break
        hull.append(m)
    return hull


def _greedy(errors: ErrorTable, budget: int) -> tuple[dict[str, Measured], float]:
    """Walk every layer's hull steps in order of error saved per byte; returns (plan, LP-relaxation bound)."""
    hulls = {name: _hull(row) for name, row in errors.items()}
    plan = {name: h[0] for name, h in hulls.items()}  # start from the smallest
    steps = []  # (saving per byte, layer, index of the step's end on the hull)
    for name, h in hulls.items():
        steps += [((h[i - 1].error - h[i].error) / (h[i].bytes - h[i - 1].bytes), name, i) for i in range(1, len(h))]
    steps.sort(key=lambda s: -s[0])  # within a layer, hull slopes fall, so its steps stay in order
    used = sum(m.bytes for m in plan.values())
    bound, room, lp_done = sum(m.error for m in plan.values()), budget - used, False
    blocked: set[str] = set()
    for _rate, name, i in steps:
        prev, nxt = hulls[name][i - 1], hulls[name][i]
        cost = nxt.bytes - prev.bytes
        if not lp_done:  # the LP takes whole steps while they fit, then a fraction of the next, then stops
            take = min(1.0, room / cost)
            bound -= take * (prev.error - nxt.error)
            room -= take * cost
            lp_done = take < 1.0
        if name in blocked:
            continue
        if used + cost <= budget and plan[name] is prev:
            plan[name], used = nxt, used + cost
        else:
            blocked.add(name)  # a later step of this layer needs this one first
    return plan, bound


def allocate_bits(
    errors: ErrorTable, budget_bytes: int, solver: Literal["auto", "milp", "greedy"] = "auto"
) -> AllocationPlan:
    """Choose one candidate per layer minimising the summed error with total bytes <= budget_bytes.

    errors: layer -> [(candidate, bytes, error), ...], e.g. from ``measure_errors``. solver: "milp" (exact,
    scipy.optimize.milp), "greedy" (hull walk, gap reported), "auto" (milp when scipy is installed).
    Raises ValueError, stating the minimum size, when no plan fits the budget.
    """
    budget = _check_table(errors, budget_bytes)
    greedy_plan, bound = _greedy(errors, budget)
    if solver == "auto":
        try:
            import scipy.optimize  # noqa: F401

            solver = "milp"
        except ImportError:
            solver = "greedy"
    if solver == "greedy":
        return AllocationPlan(greedy_plan, budget, "greedy", bound)
    if solver != "milp":
        raise ValueError(f"solver={solver!r}; use 'auto', 'milp' or 'greedy'")
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp

    names = list(errors)
    cells = [(name, m) for name in names for m in errors[name]]  # one binary x per (layer, candidate)
    cost = np.array([m.error for _, m in cells])
    one_each = np.array([[1.0 if n == name else 0.0 for n, _ in cells] for name in names])  # (layers, cells)
    size = np.array([[float(m.bytes) for _, m in cells]])  # (1, cells)
    result = milp(
        cost,
        constraints=[LinearConstraint(one_each, 1, 1), LinearConstraint(size, 0, budget)],
        integrality=np.ones(len(cells)),
        bounds=Bounds(0, 1),
    )
    if not result.success:  # pragma: no cover - the budget check makes the problem feasible
        raise RuntimeError(f"milp found no plan ({result.message}); try solver='greedy'")
    chosen = {name: m for (name, m), x in zip(cells, result.x, strict=True) if x > 0.5}
    return AllocationPlan({n: chosen[n] for n in names}, budget, "milp", bound)
