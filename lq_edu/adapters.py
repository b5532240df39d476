"""Put LoRA adapters into a Hugging Face causal LM, and save / load them in PEFT's file format.

``inject_lora(model, r=16, alpha=32, targets="all-linear")`` wraps every chosen linear layer in a
``LoRALinear`` (or, with ``quantize="nf4"``, an ``LQLinear`` with a quantized base), freezes everything
else, and returns a ``LoRAReport`` (trainable count, % of total, bytes) that prints as a table.

Files (the format is an API: PEFT reads ours and we read PEFT's):

    adapter_config.json          PEFT's LoraConfig fields (peft_type "LORA", r, lora_alpha, target_modules, ...)
    adapter_model.safetensors    base_model.model.<module>.lora_A.weight (r, in), ...lora_B.weight (out, r)
    lq_edu_base.json             lq_edu only: per layer the start, the quantized format and the SHA-256
                                 fingerprint of the original float weight (absent when nothing is quantized)
    lq_edu_base.safetensors      lq_edu only: each quantized base (packed codes, scales, codebook)

Why the extra two files: for the "lq" starts the base itself changed (Q is not round-to-nearest of W), so an
adapter is only meaningful next to its own Q, and only on the float model that Q came from.
``load_adapter`` checks shapes, fingerprints and file integrity, builds every new module first and only
then swaps them in, so a refusal leaves the model exactly as it was.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lq_edu.lora import INITS, LoRALinear, LQLinear, weight_fingerprint
from lq_edu.quant import DoubleQuantizedScales, QuantizedWeight
from lq_edu.quant_linear import QuantLinear
from lq_edu.surgery import DEFAULT_EXCLUDE, linear_names, set_module

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
BASE_META_NAME = "lq_edu_base.json"
BASE_WEIGHTS_NAME = "lq_edu_base.safetensors"
PREFIX = "base_model.model."  # PEFT's PeftModel -> LoraModel -> the HF model


@dataclass
class LoRAReport:
    """What ``inject_lora`` / ``load_adapter`` did: adapted layers and the trainable share of the model."""

    targets: list[str]
    r: int
    alpha: float
    init: str
    trainable: int  # parameters with requires_grad (the adapters)
    total: int  # all parameters, frozen ones included (a QuantLinear's packed weight counts its numel)
    trainable_bytes: int
    rows: list[tuple[str, int, int]] = field(default_factory=list)  # (layer, in, out)

    @property
    def percent(self) -> float:
        return 100 * self.trainable / self.total

    def __str__(self) -> str:
        lines = [f"{'layer':<44} {'in':>6} {'out':>6} {'lora params':>12}"]
        for name, i, o in self.rows:
            lines.append(f"{name:<44} {i:>6} {o:>6} {self.r * (i + o):>12,}")
        lines.append(
            f"LoRA r={self.r} alpha={self.alpha} init={self.init} on {len(self.targets)} layers: "
            f"trainable {self.trainable:,} of {self.total:,} params ({self.percent:.3f}%), "
            f"{self.trainable_bytes / 2**20:.3f} MiB"
        )
        return "\n".join(lines)


def _peft_match(name: str, target: str) -> bool:
    """PEFT's rule for a list entry: the full name, or its last dotted part(s); lq_edu adds full regex."""
    return name == target or name.endswith("." + target) or re.fullmatch(target, name) is not None


def select_targets(model: nn.Module, targets: str | Sequence[str] = "all-linear") -> list[str]:
    """Names of the linear layers ``targets`` picks: "all-linear" (all but lm_head/embeddings), names or regexes."""
    candidates = linear_names(model)
    if targets == "all-linear":
        chosen = [n for n in candidates if not any(re.search(p, n) for p in DEFAULT_EXCLUDE)]
    else:
        wanted = [targets] if isinstance(targets, str) else list(targets)
        for t in wanted:
            try:
                re.compile(t)
            except re.error as err:
                raise ValueError(f"target {t!r} is neither a module name nor a valid regular expression: {err}") from err
        chosen = [n for n in candidates if any(_peft_match(n, t) for t in wanted)]
    if not chosen:
        shown = ", ".join(candidates[:16]) + (f", ... ({len(candidates)} in all)" if len(candidates) > 16 else "")
        raise ValueError(
            f"targets={targets!r} matches no linear layer. Available linear modules: {shown or 'none'}. "
            "Use 'all-linear', a short name such as 'q_proj', a full name, or a regex."
        )
    return chosen


def _report(model: nn.Module, names: list[str], r: int, alpha: float, init: str) -> LoRAReport:
    seen: set[int] = set()
    trainable = total = trainable_bytes = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
            trainable_bytes += p.numel() * p.element_size()
    layers = [model.get_submodule(n) for n in names]
    total += sum(m.base_layer.qweight.numel for m in layers if isinstance(m.base_layer, QuantLinear))
    rows = [(n, m.in_features, m.out_features) for n, m in zip(names, layers, strict=True)]
    return LoRAReport(names, r, alpha, init, trainable, total, trainable_bytes, rows)


def _freeze_all_but_lora(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_A." in name or ".lora_B." in name)


def inject_lora(
    model: nn.Module,
    r: int = 16,
    alpha: float = 32,
    dropout: float = 0.0,
    targets: str | Sequence[str] = "all-linear",
    use_rslora: bool = False,
    quantize: str | None = None,
    init: str = "zero",
    block_size: int = 64,
    double_quant: bool = False,
    stats: dict[str, torch.Tensor] | None = None,
    seed: int = 0,
    verbose: bool = True,
) -> LoRAReport:
    """Wrap the ``targets`` of ``model`` in LoRA adapters, in place; freeze everything but the adapters.

    quantize: None keeps float bases (plain LoRA; a layer already a QuantLinear stays one), or a format
        ("nf4", ...) that builds ``LQLinear`` bases from the float layers.
    init: "zero" (B = 0), "lq" or "lq-data" (need ``quantize``; "lq-data" needs ``stats``: layer name ->
        Gram (in, in) or importance (in,)). seed: A's init; layer i uses seed + i.
    Returns a ``LoRAReport`` and prints it when ``verbose``. On any error the model is left unchanged.
    """
    if init not in INITS:
        raise ValueError(f"init={init!r} is not known; use one of {', '.join(INITS)}")
    if init != "zero" and quantize is None:
        raise ValueError(f"init={init!r} builds a quantized base Q; pass quantize='nf4' (or another format)")
    names = select_targets(model, targets)
    layers = {n: model.get_submodule(n) for n in names}
    already = [n for n, m in layers.items() if isinstance(m, LoRALinear)]
    if already or any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError(f"the model already has LoRA adapters ({', '.join(already[:3]) or 'elsewhere'}); load a fresh model")
    if init == "lq-data":
        missing = [n for n in names if stats is None or n not in stats]
        if missing:
            raise ValueError(f"init='lq-data' needs stats for every target; missing {len(missing)}: {', '.join(missing[:5])}")
    new: dict[str, LoRALinear] = {}
    for i, (n, m) in enumerate(layers.items()):  # build everything first ...
        if quantize is not None and isinstance(m, QuantLinear):
            raise ValueError(f"layer {n} is already quantized; pass quantize=None to wrap it as it is")
        if quantize is None:
            layer = LoRALinear(m, r, alpha, dropout, use_rslora, seed=seed + i)
            if isinstance(m, nn.Linear):
                layer.fingerprint = weight_fingerprint(m.weight, m.bias)
        else:
            layer = LQLinear(m, r, alpha, dropout, use_rslora, init, quantize, block_size, double_quant,
                             stats=None if stats is None else stats.get(n), seed=seed + i)
        new[n] = layer
    for n, layer in new.items():  # ... then swap
        set_module(model, n, layer)
    _freeze_all_but_lora(model)
    report = _report(model, names, r, alpha, init)
    if verbose:
        print(report)
    return report


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every ``LoRALinear`` in ``model`` by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


# --- quantized base state <-> flat safetensors dict ---------------------------------------------------------


def _qweight_to_flat(name: str, q: QuantizedWeight) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {f"{name}.packed": q.packed, f"{name}.codebook": q.codebook}
    meta = {"format": q.format, "bits": q.bits, "block_size": q.block_size, "shape": list(q.shape), "double_quant": False}
    if isinstance(q.scales, DoubleQuantizedScales):
        s = q.scales
        tensors.update({f"{name}.scales.codes": s.codes, f"{name}.scales.absmax": s.absmax,
                        f"{name}.scales.offset": s.offset, f"{name}.scales.codebook": s.codebook})
        meta.update(double_quant=True, dq_block_size=s.block_size, dq_numel=s.numel)
    else:
        tensors[f"{name}.scales"] = q.scales
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, meta


def _qweight_from_flat(name: str, tensors: dict[str, torch.Tensor], meta: dict) -> QuantizedWeight:
    if meta["double_quant"]:
        scales = DoubleQuantizedScales(tensors[f"{name}.scales.codes"], tensors[f"{name}.scales.absmax"],
                                       tensors[f"{name}.scales.offset"], tensors[f"{name}.scales.codebook"],
                                       int(meta["dq_block_size"]), int(meta["dq_numel"]))
    else:
        scales = tensors[f"{name}.scales"]
    return QuantizedWeight(tensors[f"{name}.packed"], scales, tuple(meta["shape"]), int(meta["block_size"]),
                           meta["format"], int(meta["bits"]), tensors[f"{name}.codebook"])


# --- save -----------------------------------------------------------------------------------------------------


def save_adapter(
    model: nn.Module, folder: str | Path, base_name_or_path: str | None = None, card: str | None = None
) -> Path:
    """Write the model's adapters to ``folder`` in PEFT's format (plus lq_edu's base files when quantized).

    All adapters must share r, alpha, dropout and rsLoRA (one LoraConfig) and must not be merged.
    card: the text of a model card, written to ``README.md`` (as PEFT's ``save_pretrained`` does); an
    existing README.md is left alone when ``card`` is None. Returns the folder.
    """
    from safetensors.torch import save_file

    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters to save; call inject_lora(model, ...) first")
    merged = [n for n, m in layers.items() if m.merged]
    if merged:
        raise ValueError(f"{len(merged)} adapter(s) are merged ({merged[0]}, ...); call unmerge() on them before saving")
    first = next(iter(layers.values()))
    settings = (first.r, first.alpha, first.dropout_p, first.use_rslora)
    odd = [n for n, m in layers.items() if (m.r, m.alpha, m.dropout_p, m.use_rslora) != settings]
    if odd:
        raise ValueError(f"adapters differ in r/alpha/dropout/rslora ({odd[0]}); one adapter file holds one setting")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name_or_path,
        "r": first.r,
        "lora_alpha": first.alpha,
        "lora_dropout": first.dropout_p,
        "use_rslora": first.use_rslora,
        "target_modules": sorted(layers),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
        "revision": None,
    }
    tensors: dict[str, torch.Tensor] = {}
    for n, m in layers.items():
        tensors[f"{PREFIX}{n}.lora_A.weight"] = m.lora_A.weight.detach().cpu().contiguous()  # (r, in)
        tensors[f"{PREFIX}{n}.lora_B.weight"] = m.lora_B.weight.detach().cpu().contiguous()  # (out, r)
    save_file(tensors, str(folder / WEIGHTS_NAME))
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    quantized = {n: m for n, m in layers.items() if isinstance(m.base_layer, QuantLinear)}
    for stale in (BASE_META_NAME, BASE_WEIGHTS_NAME):
        (folder / stale).unlink(missing_ok=True)
    meta = {"layers": {}}
    base_tensors: dict[str, torch.Tensor] = {}
    for n, m in layers.items():
        entry = {"init": m.init, "fingerprint": m.fingerprint, "quant": None}
        if n in quantized:
            flat, entry["quant"] = _qweight_to_flat(n, m.base_layer.qweight)
            base_tensors.update(flat)
        meta["layers"][n] = entry
    if quantized or any(m.fingerprint for m in layers.values()):
        (folder / BASE_META_NAME).write_text(json.dumps(meta, indent=2))
    if base_tensors:
        save_file(base_tensors, str(folder / BASE_WEIGHTS_NAME))
    if card is not None:
        (folder / "README.md").write_text(card if card.endswith("\n") else card + "\n")
    return folder


# --- load -----------------------------------------------------------------------------------------------------


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; an adapter folder needs {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for bad headers and short files
        raise ValueError(
            f"{path} is corrupt or truncated ({type(err).__name__}: {err}); nothing was loaded. Save the adapter again."
        ) from err


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{path} is missing; an adapter folder needs {CONFIG_NAME} and {WEIGHTS_NAME}") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); nothing was loaded") from err


def _check_config(config: dict, path: Path) -> None:
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type={config.get('peft_type')!r}; lq_edu loads only 'LORA' adapters")
    unsupported = {
        "bias": (config.get("bias", "none"), "none"),
        "use_dora": (config.get("use_dora", False), False),
        "fan_in_fan_out": (config.get("fan_in_fan_out", False), False),
        "rank_pattern": (config.get("rank_pattern") or {}, {}),
        "alpha_pattern": (config.get("alpha_pattern") or {}, {}),
        "modules_to_save": (config.get("modules_to_save") or None, None),
    }
    for key, (given, allowed) in unsupported.items():
        if given != allowed:
            raise ValueError(f"{path}: {key}={given!r} is not supported by lq_edu (needs {allowed!r}); nothing was loaded")


def load_adapter(model: nn.Module, folder: str | Path, verbose: bool = False) -> LoRAReport:
    """Load a PEFT-format LoRA adapter (ours or PEFT's) into the float ``model``, in place.

    Checks, before anything changes: the config is a plain LoRA, both files parse, every adapted module
    exists and is a float nn.Linear, A is (r, in) and B is (out, r), and, when lq_edu's base files are
    there, each layer's float weight has the saved SHA-256 fingerprint. Then quantized bases are rebuilt
    from the saved state, all LoRALinear modules are built, and only then swapped in.
    """
    folder = Path(folder)
    if lora_layers(model):
        raise ValueError("the model already has LoRA adapters; load the adapter into a fresh float model")
    config = _read_json(folder / CONFIG_NAME)
    _check_config(config, folder / CONFIG_NAME)
    tensors = _read_safetensors(folder / WEIGHTS_NAME)
    meta = _read_json(folder / BASE_META_NAME)["layers"] if (folder / BASE_META_NAME).exists() else {}
    base_tensors = _read_safetensors(folder / BASE_WEIGHTS_NAME) if (folder / BASE_WEIGHTS_NAME).exists() else {}
    r, alpha = int(config["r"]), config["lora_alpha"]
    dropout, rslora = float(config.get("lora_dropout", 0.0)), bool(config.get("use_rslora", False))

    pattern = re.compile(rf"^{re.escape(PREFIX)}(.+)\.lora_([AB])(?:\.default)?\.weight$")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        match = pattern.match(key)
        if not match:
            raise ValueError(f"{folder / WEIGHTS_NAME}: key {key!r} is not a LoRA weight in PEFT's layout; nothing was loaded")
        pairs.setdefault(match.group(1), {})[match.group(2)] = t
    available = set(linear_names(model))
    new: dict[str, LoRALinear] = {}
    for i, (name, ab) in enumerate(sorted(pairs.items())):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"adapter for {name} has only lora_{''.join(ab)}; the file is incomplete, nothing was loaded")
        if name not in available:
            shown = ", ".join(sorted(available)[:10])
            raise ValueError(f"adapter targets {name!r}, which this model does not have (linear modules: {shown}, ...)")
        base = model.get_submodule(name)
        if not isinstance(base, nn.Linear):
            raise ValueError(f"{name} is a {type(base).__name__}; load_adapter needs the original float model (nn.Linear)")
        A, B = ab["A"], ab["B"]
        if tuple(A.shape) != (r, base.in_features) or tuple(B.shape) != (base.out_features, r):
            raise ValueError(
                f"shape mismatch at {name}: adapter has lora_A {tuple(A.shape)}, lora_B {tuple(B.shape)}; this model's "
                f"layer needs ({r}, {base.in_features}) and ({base.out_features}, {r}). Is this the right base model?"
            )
        entry = meta.get(name, {})
        fingerprint = weight_fingerprint(base.weight, base.bias)
        if entry.get("fingerprint") and entry["fingerprint"] != fingerprint:
            raise ValueError(
                f"fingerprint mismatch at {name}: the adapter was made for a base whose weight hashes to "
                f"{entry['fingerprint'][:12]}..., this model's hashes to {fingerprint[:12]}.... "
                f"Load the base named in adapter_config.json ({config.get('base_model_name_or_path')}); nothing was loaded"
            )
        layer_base: nn.Module = base
        if entry.get("quant"):
            try:
                qweight = _qweight_from_flat(name, base_tensors, entry["quant"])
            except KeyError as err:
                raise ValueError(f"{folder / BASE_WEIGHTS_NAME} lacks {err} for {name}; nothing was loaded") from err
            if tuple(qweight.shape) != (base.out_features, base.in_features):
                raise ValueError(f"quantized base for {name} has shape {qweight.shape}, the model's layer "
                                 f"({base.out_features}, {base.in_features}); nothing was loaded")
            layer_base = QuantLinear(qweight, base.bias, name=name)
        layer = LoRALinear(layer_base, r, alpha, dropout, rslora, seed=i)
        with torch.no_grad():
            layer.lora_A.weight.copy_(A)
            layer.lora_B.weight.copy_(B)
        layer.init, layer.fingerprint = entry.get("init", "zero"), fingerprint
        new[name] = layer
    if not new:
        raise ValueError(f"{folder / WEIGHTS_NAME} holds no LoRA weights; nothing was loaded")
    for name, layer in new.items():
        set_module(model, name, layer)
    _freeze_all_but_lora(model)
    report = _report(model, list(new), r, alpha, next(iter(new.values())).init)
    if verbose:
        print(report)
    return report
