"""Model surgery: swap the linear layers of a Hugging Face causal LM for QuantLinear.

``quantize_model(model, fmt="nf4")`` finds every ``nn.Linear`` (and GPT-2's
``Conv1D``) whose name matches ``include`` and not ``exclude``, quantizes all
of them first, and only then swaps them in, so a failure (a NaN in a weight,
a layer that is already quantized, a pattern that matches nothing) leaves the
model exactly as it was. ``lm_head`` and the embeddings are skipped by
default: they are a small share of a large model and quantizing them hurts
quality the most.

Patterns are regular expressions matched with ``re.search`` against module
names such as ``model.layers.0.self_attn.q_proj``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lq_edu.quant_linear import QuantLinear, _is_conv1d, linear_weight

DEFAULT_EXCLUDE: tuple[str, ...] = (r"(^|\.)lm_head$", r"embed", r"(^|\.)wte$", r"(^|\.)wpe$")


@dataclass
class SurgeryReport:
    """What ``quantize_model`` did: which layers, and the bytes before and after."""

    replaced: list[str]
    fmt: str
    block_size: int
    double_quant: bool
    linear_params: int  # parameters in the replaced layers' weights
    bytes_before: int  # whole model, parameters and buffers
    bytes_after: int
    linear_bytes_before: int  # the replaced weights only
    linear_bytes_after: int
    skipped: list[str] = field(default_factory=list)  # linear layers left in float

    @property
    def bits_per_param(self) -> float:
        """Average bits per parameter of the quantized weights, scales included."""
        return 8 * self.linear_bytes_after / self.linear_params

    def __str__(self) -> str:
        dq = ", double quant" if self.double_quant else ""
        return (
            f"replaced {len(self.replaced)} linear layers with {self.fmt} (block {self.block_size}{dq}): "
            f"{self.bits_per_param:.3f} bits/param; "
            f"quantized weights {self.linear_bytes_before / 2**20:.2f} -> {self.linear_bytes_after / 2**20:.2f} MiB, "
            f"whole model {self.bytes_before / 2**20:.2f} -> {self.bytes_after / 2**20:.2f} MiB "
            f"({self.bytes_before / self.bytes_after:.2f}x smaller); "
            f"{len(self.skipped)} linear layer{'' if len(self.skipped) == 1 else 's'} kept in float"
        )


def model_nbytes(model: nn.Module) -> int:
    """Bytes of a model's parameters, buffers and quantized weights (shared tensors once)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    for m in model.modules():
        if isinstance(m, QuantLinear):
            total += m.qweight.nbytes
    return total


def linear_names(model: nn.Module) -> list[str]:
    """Names of every layer model surgery could act on: ``nn.Linear``, ``Conv1D`` and ``QuantLinear``."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear)) or _is_conv1d(m)]


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(re.search(p, name) for p in patterns)


def select_linears(
    model: nn.Module,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = DEFAULT_EXCLUDE,
) -> list[str]:
    """Names of the layers that ``include``/``exclude`` pick; raises if they pick none."""
    include = [include] if isinstance(include, str) else list(include or [])
    exclude = [exclude] if isinstance(exclude, str) else list(exclude or [])
    for p in [*include, *exclude]:
        try:
            re.compile(p)
        except re.error as err:
            raise ValueError(f"pattern {p!r} is not a valid regular expression: {err}") from err
    candidates = linear_names(model)
    chosen = [n for n in candidates if (not include or _matches(n, include)) and not _matches(n, exclude)]
    if not chosen:
        shown = ", ".join(candidates[:12]) + (f", ... ({len(candidates)} in all)" if len(candidates) > 12 else "")
        raise ValueError(
            f"include={include or 'all'} exclude={exclude} matches no linear layer; candidates are: {shown or 'none'}"
        )
    return chosen


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule called ``name`` (e.g. ``model.layers.0.mlp.up_proj``) with ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantize_model(
    model: nn.Module,
    fmt: str = "nf4",
    block_size: int = 64,
    double_quant: bool = False,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = DEFAULT_EXCLUDE,
    progress: bool = False,
) -> SurgeryReport:
    """Replace the chosen linear layers of ``model`` with ``QuantLinear``, in place.

    fmt: a format of ``lq_edu.quant.quantize`` ("nf4", "int8", ...).
    include / exclude: regular expressions on module names (default: all linears but lm_head).
    Returns a ``SurgeryReport``. On any error the model is left unchanged.
    """
    from tqdm.auto import tqdm

    names = select_linears(model, include, exclude)
    modules = {n: model.get_submodule(n) for n in names}
    already = [n for n, m in modules.items() if isinstance(m, QuantLinear)]
    if already:
        raise ValueError(
            f"{len(already)} layer(s) are already quantized ({', '.join(already[:5])}); "
            "load a fresh float model, or exclude them with exclude=..."
        )
    # Check every weight before touching anything.
    for n, m in modules.items():
        weight, _ = linear_weight(m)
        bad = int((~torch.isfinite(weight)).sum())
        if bad:
            raise ValueError(f"layer {n} has {bad} NaN/inf weight(s); nothing was replaced. Fix or reload the model.")

    bytes_before = model_nbytes(model)
    new_modules: dict[str, QuantLinear] = {}
    for n in tqdm(names, desc=f"quantize {fmt}", disable=not progress, leave=False):
        new_modules[n] = QuantLinear.from_linear(modules[n], fmt=fmt, block_size=block_size, double_quant=double_quant, name=n)
    # All quantized: now swap them in. setattr cannot fail halfway for valid names.
    for n, q in new_modules.items():
        set_module(model, n, q)

    linear_params = sum(q.in_features * q.out_features for q in new_modules.values())
    linear_bytes_before = sum(linear_weight(m)[0].numel() * linear_weight(m)[0].element_size() for m in modules.values())
    return SurgeryReport(
        replaced=names,
        fmt=fmt,
        block_size=block_size,
        double_quant=double_quant,
        linear_params=linear_params,
        bytes_before=bytes_before,
        bytes_after=model_nbytes(model),
        linear_bytes_before=linear_bytes_before,
        linear_bytes_after=sum(q.qweight.nbytes for q in new_modules.values()),
        skipped=[n for n in linear_names(model) if n not in new_modules and not isinstance(model.get_submodule(n), QuantLinear)],
    )
