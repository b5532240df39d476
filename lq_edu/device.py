"""Which device to run on, how much memory it has, and is this machine ready?

One helper picks the device for every lesson, so no teaching cell ever writes
``.to("cuda")``: CUDA if present, then Apple's MPS if you opt in, else CPU.
MPS is opt-in (``LQ_ALLOW_MPS=1``) because some ops the course uses are still
missing or slow there. ``LQ_DEVICE=cpu`` (or ``cuda:1`` ...) forces a choice.
"""

from __future__ import annotations

import importlib
import os
import platform
import sys
from dataclasses import dataclass

import torch

from lq_edu.paths import CORPUS_DIR, COURSE_MODEL_DIR

_VALID_FORCED = ("cpu", "cuda", "mps")


def pick_device(allow_mps: bool | None = None, verbose: bool = True) -> torch.device:
    """Choose cuda > mps (opt-in) > cpu, print the choice and why, and return it.

    allow_mps: use Apple's MPS when available (default: the ``LQ_ALLOW_MPS`` env var).
    The ``LQ_DEVICE`` environment variable overrides the choice.
    """
    forced = os.environ.get("LQ_DEVICE", "").strip()
    if forced:
        kind = forced.split(":")[0]
        if kind not in _VALID_FORCED:
            raise ValueError(f"LQ_DEVICE={forced!r} is not a device; use one of {_VALID_FORCED} (e.g. 'cuda:0')")
        if kind == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"LQ_DEVICE={forced!r} but this torch sees no CUDA GPU; unset LQ_DEVICE to pick automatically")
        if kind == "mps" and not _mps_available():
            raise ValueError(f"LQ_DEVICE={forced!r} but MPS is not available here; unset LQ_DEVICE")
        device, why = torch.device(forced), "forced by LQ_DEVICE"
    elif torch.cuda.is_available():
        device, why = torch.device("cuda"), f"CUDA GPU: {torch.cuda.get_device_name(0)}"
    else:
        if allow_mps is None:
            allow_mps = os.environ.get("LQ_ALLOW_MPS", "") in ("1", "true", "yes")
        if allow_mps and _mps_available():
            device, why = torch.device("mps"), "Apple GPU (MPS, opted in)"
        elif _mps_available():
            device, why = torch.device("cpu"), "MPS is available but not opted in (set LQ_ALLOW_MPS=1)"
        else:
            device, why = torch.device("cpu"), "no GPU found"
    if verbose:
        print(f"Using device: {device} ({why})")
    return device


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps and mps.is_available())


@dataclass
class MemoryInfo:
    """Free and total memory of a device, in bytes."""

    device: str
    free_bytes: int
    total_bytes: int

    def __str__(self) -> str:
        return f"{self.device}: {self.free_bytes / 2**30:.1f} GiB free of {self.total_bytes / 2**30:.1f} GiB"


def memory_info(device: torch.device | str | None = None) -> MemoryInfo:
    """Free/total memory of ``device`` (host RAM for cpu and mps, which share it)."""
    device = torch.device(device) if device is not None else pick_device(verbose=False)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return MemoryInfo(str(device), int(free), int(total))
    import psutil

    vm = psutil.virtual_memory()
    return MemoryInfo(str(device), int(vm.available), int(vm.total))


@dataclass
class CheckRow:
    """One line of the environment check."""

    item: str
    value: str
    ok: bool
    hint: str = ""


def environment_report(min_free_gib: float = 2.0, show: bool = True) -> list[CheckRow]:
    """Check Python, the libraries, the device, memory and the course files.

    Prints a PASS/FAIL table (when ``show``) and returns the rows.
    """
    rows: list[CheckRow] = []
    py_ok = sys.version_info >= (3, 10)
    rows.append(CheckRow("python", platform.python_version(), py_ok, "the course needs Python 3.10 or newer"))
    for name in ("torch", "transformers", "datasets", "safetensors", "tokenizers", "matplotlib"):
        try:
            version = importlib.import_module(name).__version__
            rows.append(CheckRow(name, version, True))
        except ImportError:
            rows.append(CheckRow(name, "missing", False, "run `make lab` (or pip install -e .) to install it"))
    device = pick_device(verbose=False)
    rows.append(CheckRow("device", str(device), True))
    mem = memory_info(device)
    rows.append(
        CheckRow(
            "free memory",
            f"{mem.free_bytes / 2**30:.1f} GiB of {mem.total_bytes / 2**30:.1f} GiB",
            mem.free_bytes >= min_free_gib * 2**30,
            f"the lessons want about {min_free_gib:g} GiB free; close other programs",
        )
    )
    model_ok = (COURSE_MODEL_DIR / "model.safetensors").is_file() and (COURSE_MODEL_DIR / "config.json").is_file()
    rows.append(CheckRow("course model", str(COURSE_MODEL_DIR.name), model_ok, "rebuild it: python -m lq_edu.pretrain"))
    corpus_ok = all((CORPUS_DIR / f"{s}.jsonl.gz").is_file() for s in ("train", "validation"))
    rows.append(CheckRow("course corpus", "train + validation", corpus_ok, "restore it: git checkout -- data/corpus"))
    if show:
        width = max(len(r.item) for r in rows)
        for r in rows:
            verdict = "PASS" if r.ok else "FAIL"
            line = f"{verdict}  {r.item:<{width}}  {r.value}"
            print(line if r.ok else f"{line}   -> {r.hint}")
    return rows
