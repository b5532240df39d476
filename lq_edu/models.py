"""Loading the course model (or any HF causal LM) and counting what it holds.

The loader is the real Hugging Face path, ``AutoModelForCausalLM.from_pretrained``
on a folder, wrapped so that a missing or damaged folder gives a message that
names the folder and the command that rebuilds it, instead of a hub lookup.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from lq_edu.paths import COURSE_MODEL_DIR

REBUILD_HINT = "rebuild it with `python -m lq_edu.pretrain` (about 40 minutes on 2 CPU cores) or restore it with `git checkout -- data/models`"


def _check_model_dir(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"no model folder at {path}; {REBUILD_HINT}")
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is a file, not a model folder; {REBUILD_HINT}")
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"model folder {path} lacks {', '.join(missing)}; {REBUILD_HINT}")
    try:
        json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path / 'config.json'} is not valid JSON ({err}); {REBUILD_HINT}") from err
    try:
        from safetensors import safe_open

        with safe_open(str(path / "model.safetensors"), framework="pt") as fh:
            keys = list(fh.keys())
            for key in keys:  # touch every tensor, so truncation shows up here
                fh.get_slice(key).get_shape()
            if keys:
                fh.get_tensor(keys[-1])
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"{path / 'model.safetensors'} is damaged ({err}); {REBUILD_HINT}") from err


def load_course_model(
    path: str | Path = COURSE_MODEL_DIR,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
):
    """Load a causal LM and its tokenizer from a local folder.

    Returns ``(model, tokenizer)`` with the model in eval mode on ``device``
    (default: CPU). Works for the course model and for any HF model folder.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    _check_model_dir(path)
    from transformers.utils import logging as hf_logging

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a local load is instant; a bar would only clutter the lesson
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    if device is not None:
        model.to(device)
    model.eval()
    return model, tokenizer


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes the parameters take in memory now: sum of ``numel * element_size``."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


@dataclass
class ParameterGroup:
    """Parameters of one kind of module, e.g. all attention projections."""

    name: str
    parameters: int
    bytes: int


def parameter_report(model: torch.nn.Module) -> list[ParameterGroup]:
    """Parameters and bytes per kind of module: embeddings, attention, MLP, norms, head.

    Bytes are what the tensors take now (``numel * element_size``).
    """
    groups: OrderedDict[str, list[int]] = OrderedDict(
        (k, [0, 0]) for k in ("embeddings", "attention", "mlp", "norms", "lm_head", "other")
    )
    for name, p in model.named_parameters():
        if "embed" in name or ".wte" in name or ".wpe" in name:
            key = "embeddings"
        elif "lm_head" in name:
            key = "lm_head"
        elif "attn" in name or "attention" in name:
            key = "attention"
        elif "mlp" in name:
            key = "mlp"
        elif "norm" in name or ".ln_" in name:
            key = "norms"
        else:
            key = "other"
        groups[key][0] += p.numel()
        groups[key][1] += p.numel() * p.element_size()
    return [ParameterGroup(k, n, b) for k, (n, b) in groups.items() if n]
