"""Self-checks for exercises: does the learner's function agree with the engine's?

``check(my_fn, lq.engine_fn, inputs)`` calls both on every input and prints
one verdict:

- ``passed``: every output matches (tensors with ``allclose``);
- ``wrong``: the first mismatch, with the input, the position and both values;
- ``not solved yet``: the exercise still raises ``NotImplementedError``;
- ``error``: the learner's function raised something else (shown, not raised).

It never raises, so a stuck learner can always run the rest of the lesson,
which carries on with the engine's version.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class CheckResult:
    """What ``check`` found. Truthy when the exercise passed."""

    name: str
    status: str  # "passed" | "wrong" | "not solved yet" | "error"
    message: str = ""
    cases: int = 0
    details: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        head = {"passed": "✅ passed", "wrong": "❌ wrong", "not solved yet": "⏳ not solved yet", "error": "💥 error"}
        text = f"{self.name}: {head.get(self.status, self.status)}"
        return f"{text} — {self.message}" if self.message else text


def _first_mismatch(got: Any, want: Any, rtol: float, atol: float, where: str = "output") -> str | None:
    """Describe the first difference between ``got`` and ``want``, or None if they agree."""
    if isinstance(want, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return f"{where}: expected a tensor, got {type(got).__name__}"
        if tuple(got.shape) != tuple(want.shape):
            return f"{where}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
        if got.dtype.is_floating_point != want.dtype.is_floating_point:
            return f"{where}: dtype {got.dtype}, expected {want.dtype}"
        g = got.detach().to("cpu", torch.float64)
        w = want.detach().to("cpu", torch.float64)
        close = torch.isclose(g, w, rtol=rtol, atol=atol, equal_nan=True)
        if bool(close.all()):
            return None
        bad = (~close).nonzero()[0].tolist()
        idx = tuple(bad)
        n_bad = int((~close).sum())
        return f"{where}[{', '.join(map(str, idx))}] = {g[idx].item():.6g}, expected {w[idx].item():.6g} ({n_bad} of {w.numel()} elements differ)"
    if isinstance(want, bool) or want is None or isinstance(want, str):
        return None if got == want else f"{where}: got {got!r}, expected {want!r}"
    if isinstance(want, (int, float)):
        if not isinstance(got, (int, float)) or isinstance(got, bool):
            return f"{where}: expected a number, got {type(got).__name__} {got!r}"
        if math.isclose(got, want, rel_tol=rtol, abs_tol=atol) or (math.isnan(got) and math.isnan(want)):
            return None
        return f"{where}: got {got!r}, expected {want!r}"
    if isinstance(want, Mapping):
        if not isinstance(got, Mapping):
            return f"{where}: expected a mapping, got {type(got).__name__}"
        if set(got) != set(want):
            return f"{where}: keys {sorted(map(str, got))}, expected {sorted(map(str, want))}"
        for k in want:
            msg = _first_mismatch(got[k], want[k], rtol, atol, f"{where}[{k!r}]")
            if msg:
                return msg
        return None
    if isinstance(want, Sequence):
        if not isinstance(got, Sequence) or isinstance(got, str):
            return f"{where}: expected a sequence, got {type(got).__name__}"
        if len(got) != len(want):
            return f"{where}: length {len(got)}, expected {len(want)}"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            msg = _first_mismatch(g, w, rtol, atol, f"{where}[{i}]")
            if msg:
                return msg
        return None
    return None if got == want else f"{where}: got {got!r}, expected {want!r}"


def _call(fn: Callable, case: Any) -> Any:
    if isinstance(case, Mapping):
        return fn(**case)
    if isinstance(case, tuple):
        return fn(*case)
    return fn(case)


def _clone(case: Any) -> Any:
    """A copy of the inputs, so a function that edits its input in place can't fool the check."""
    if isinstance(case, torch.Tensor):
        return case.clone()
    if isinstance(case, tuple):
        return tuple(_clone(c) for c in case)
    if isinstance(case, list):
        return [_clone(c) for c in case]
    if isinstance(case, Mapping):
        return {k: _clone(v) for k, v in case.items()}
    return case


def _describe(case: Any) -> str:
    def short(x: Any) -> str:
        if isinstance(x, torch.Tensor):
            return f"tensor{tuple(x.shape)}"
        text = repr(x)
        return text if len(text) < 40 else text[:37] + "..."

    if isinstance(case, Mapping):
        return ", ".join(f"{k}={short(v)}" for k, v in case.items())
    if isinstance(case, tuple):
        return ", ".join(short(c) for c in case)
    return short(case)


def check(
    learner_fn: Callable,
    reference_fn: Callable,
    inputs: Iterable[Any],
    name: str | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-6,
    show: bool = True,
) -> CheckResult:
    """Compare ``learner_fn`` with ``reference_fn`` on each case in ``inputs``.

    A case is a tuple of positional arguments, a dict of keyword arguments, or
    a single argument. Prints the verdict (when ``show``) and returns it; never raises.
    """
    name = name or getattr(learner_fn, "__name__", "exercise")
    cases = list(inputs)
    result = CheckResult(name, "passed", f"{len(cases)} case(s) agree with the engine", len(cases))
    if not cases:
        result = CheckResult(name, "error", "no inputs to check with (the check itself is broken)")
    for i, case in enumerate(cases):
        try:
            got = _call(learner_fn, _clone(case))
        except NotImplementedError:
            result = CheckResult(name, "not solved yet", "fill in the cell above, run it, then run this check again", i)
            break
        except Exception as err:  # the learner's bug is reported, never raised
            result = CheckResult(name, "error", f"case {i + 1} ({_describe(case)}) raised {type(err).__name__}: {err}", i)
            break
        try:
            want = _call(reference_fn, _clone(case))
        except Exception as err:
            result = CheckResult(name, "error", f"the engine's reference failed on case {i + 1}: {type(err).__name__}: {err}", i)
            break
        mismatch = _first_mismatch(got, want, rtol, atol)
        if mismatch:
            result = CheckResult(name, "wrong", f"case {i + 1} ({_describe(case)}): {mismatch}", i)
            break
    if show:
        print(result)
    return result
