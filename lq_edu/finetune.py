"""One fine-tuning run per (method, bits), and the retention table of lesson 07.

A *method* is how the frozen base is stored and how the adapter starts:

| method    | base                              | adapter at step 0                    |
|-----------|-----------------------------------|--------------------------------------|
| "lora"    | float (16-bit LoRA; fp32 on CPU)  | B = 0                                 |
| "zero"    | NF-k round-to-nearest (QLoRA)     | B = 0: the model starts at Q          |
| "lq"      | Q from Q + L1·L2 ≈ W              | s·B·A = L1·L2: starts near W          |
| "lq-data" | the same, weighted by activations | the same, closest on the layer output |

Every run of one comparison uses the same steps, data order, learning rate, rank
and seed, so the only difference is the base. ``bits`` picks the format: 4 ->
nf4, 3 -> nf3, 2 -> nf2 (block 64).

*Retention* is a quantized run's metric relative to 16-bit LoRA's: accuracy /
LoRA accuracy, and LoRA loss / loss (a lower loss is better, so the ratio is
flipped). 100% means quantizing the base cost nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from lq_edu.adapters import inject_lora, lora_layers
from lq_edu.calibration import calibration_data, collect_stats
from lq_edu.lora import initial_error
from lq_edu.models import load_course_model
from lq_edu.quant_linear import QuantLinear
from lq_edu.sft import load_sft, padded
from lq_edu.tasks import evaluate_task, heldout_loss
from lq_edu.trainer import TrainConfig, TrainResult, train

METHODS = ("lora", "zero", "lq", "lq-data")
BIT_FORMATS = {4: "nf4", 3: "nf3", 2: "nf2"}
METHOD_NAMES = {"lora": "16-bit LoRA", "zero": "QLoRA (zero)", "lq": "LQ (lq)", "lq-data": "LQ (lq-data)"}


@dataclass
class FinetuneResult:
    """Metrics and memory of one run. Bytes are as held in memory during the run."""

    method: str
    bits: int | None  # None for the float base
    accuracy: float  # exact match on the evaluation split
    loss: float  # held-out loss (nats per assistant token) on the evaluation split
    initial_error: float  # mean over adapted layers of ‖W − (base + s·B·A)‖ / ‖W‖ at step 0
    base_bytes: int  # frozen weights: float parameters plus packed quantized weights
    adapter_bytes: int  # trainable LoRA parameters
    optimizer_bytes: int  # AdamW state: two moments per trainable parameter, in its dtype
    seconds: float  # wall time of setup + training (evaluation excluded)
    settings: dict = field(default_factory=dict)  # steps, r, alpha, lr, batch_size, seed, eval_split
    train: TrainResult = field(repr=False, default_factory=TrainResult)
    examples: list[dict] = field(repr=False, default_factory=list)  # evaluation predictions

    @property
    def name(self) -> str:
        return METHOD_NAMES[self.method] + ("" if self.bits is None else f" {self.bits}-bit")


def check_run(method: object, bits: object) -> None:
    """Refuse an unknown method or bit width, saying what is allowed."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not known; use one of {', '.join(METHODS)}")
    if method == "lora" and bits is not None:
        raise ValueError(f"method='lora' keeps a float base; pass bits=None (got bits={bits!r})")
    if method != "lora" and bits not in BIT_FORMATS:
        raise ValueError(f"method={method!r} quantizes the base; pass bits as one of {sorted(BIT_FORMATS)}, got {bits!r}")


def data_stats(model: nn.Module, tokenizer, n_samples: int = 16, seq_len: int = 256, seed: int = 0) -> dict:
    """Gram matrices XᵀX/n of every linear layer's inputs on ``n_samples`` windows of training text.

    What ``init="lq-data"`` weighs the decomposition with. Collect them once on the float model and reuse
    them for every bit width.
    """
    data = calibration_data(tokenizer, n_samples=n_samples, seq_len=seq_len, seed=seed, model=model)
    return {name: s.hessian for name, s in collect_stats(model, data).items()}


def memory_bytes(model: nn.Module) -> tuple[int, int]:
    """(frozen base bytes, trainable bytes) of a model with LoRA adapters, shared tensors counted once."""
    seen: set[int] = set()
    frozen = trainable = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p.requires_grad:
            trainable += p.numel() * p.element_size()
        else:
            frozen += p.numel() * p.element_size()
    frozen += sum(m.nbytes for m in model.modules() if isinstance(m, QuantLinear))
    return frozen, trainable


def finetune(
    method: str = "lora",
    bits: int | None = None,
    steps: int = 60,
    r: int = 16,
    alpha: float = 32,
    lr: float = 2e-3,
    batch_size: int = 16,
    seed: int = 0,
    stats: dict | None = None,
    eval_split: str = "test",
    max_eval: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    return_model: bool = False,
):
    """Fine-tune a fresh course model on the task with one method; evaluate on ``eval_split``.

    stats: for ``"lq-data"``, the Gram matrices from :func:`data_stats` (computed here when omitted).
    Returns a :class:`FinetuneResult`, or ``(result, model, tokenizer)`` with ``return_model=True``.
    """
    check_run(method, bits)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r}: train for at least 1 optimizer step")
    start = time.perf_counter()
    model, tok = load_course_model(device=device)
    if method == "lq-data" and stats is None:
        stats = data_stats(model, tok, seed=seed)
    weights = {n: m.weight.detach().float().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    inject_lora(
        model, r=r, alpha=alpha, quantize=None if bits is None else BIT_FORMATS[bits],
        init="zero" if method == "lora" else method, stats=stats, seed=seed, verbose=False,
    )
    layers = lora_layers(model)
    error = sum(initial_error(layer, weights[n]) for n, layer in layers.items()) / len(layers)
    del weights
    base_bytes, adapter_bytes = memory_bytes(model)
    data = padded(load_sft("train", tok), tok.pad_token_id)
    config = TrainConfig(steps=steps, lr=lr, warmup=max(1, steps // 10), batch_size=batch_size, seed=seed,
                         progress=progress)
    result = train(model, data, config=config)
    seconds = time.perf_counter() - start
    evaluation = evaluate_task(model, tok, eval_split, max_examples=max_eval)
    loss = heldout_loss(model, tok, eval_split, max_examples=max_eval)
    out = FinetuneResult(
        method, bits, evaluation["accuracy"], loss, error, base_bytes, adapter_bytes,
        optimizer_bytes=2 * adapter_bytes,  # exp_avg and exp_avg_sq, each shaped and typed like its parameter
        seconds=seconds, train=result, examples=evaluation["examples"],
        settings={"steps": steps, "r": r, "alpha": alpha, "lr": lr, "batch_size": batch_size, "seed": seed,
                  "eval_split": eval_split, "eval_examples": evaluation["n"]},
    )
    return (out, model, tok) if return_model else out


def retention(result: FinetuneResult, reference: FinetuneResult) -> dict[str, float]:
    """``{"accuracy": acc / ref acc, "loss": ref loss / loss}``: 1.0 means nothing was lost to quantization."""
    if reference.accuracy <= 0:
        raise ValueError("the reference run scored 0 accuracy, so a ratio means nothing; train it longer")
    return {"accuracy": result.accuracy / reference.accuracy, "loss": reference.loss / result.loss}


def retention_rows(results: list[FinetuneResult]) -> list[dict]:
    """One row per run (16-bit LoRA first) with its metrics, retention against 16-bit LoRA and memory."""
    refs = [r for r in results if r.method == "lora"]
    if not refs:
        raise ValueError("retention needs the 16-bit LoRA run (method='lora') among the results")
    ref = refs[0]
    rows = []
    for r in sorted(results, key=lambda r: (r.method != "lora", -(r.bits or 16), METHODS.index(r.method))):
        keep = retention(r, ref)
        rows.append({
            "run": r.name, "method": r.method, "bits": r.bits or 16, "accuracy": r.accuracy, "loss": r.loss,
            "accuracy retention": keep["accuracy"], "loss retention": keep["loss"],
            "initial error": r.initial_error, "base MiB": r.base_bytes / 2**20,
            "adapter MiB": r.adapter_bytes / 2**20, "AdamW MiB": r.optimizer_bytes / 2**20,
        })
    return rows


def plot_retention(results: list[FinetuneResult]):
    """A matplotlib ``Figure``: accuracy and loss retention against bits, one line per method."""
    from matplotlib.figure import Figure

    rows = retention_rows(results)
    fig = Figure(figsize=(10, 3.8))
    for ax, key in zip(fig.subplots(1, 2), ("accuracy retention", "loss retention"), strict=True):
        for method in METHODS[1:]:
            pts = sorted((row["bits"], 100 * row[key]) for row in rows if row["method"] == method)
            if pts:
                ax.plot(*zip(*pts, strict=True), "o-", label=METHOD_NAMES[method])
        ax.axhline(100, color="k", lw=1, ls="--", label="16-bit LoRA")
        ax.set_xticks(sorted(BIT_FORMATS))
        ax.set_xlabel("bits per base weight")
        ax.set_ylabel(f"{key} (%)")
        ax.grid(alpha=0.3)
    fig.axes[0].legend()
    fig.suptitle("What survives quantizing the base (same steps, data, seed)")
    fig.tight_layout()
    return fig


def model_card(result: FinetuneResult, reference: FinetuneResult | None = None, base: str = "lq-course-llama") -> str:
    """A model card (README.md) for the adapter of ``result``: how it was trained, what it scored, how to load it."""
    from lq_edu.tasks import TASK_NAME

    cfg = result.settings
    keep = retention(result, reference) if reference is not None else None
    quantized = result.bits is not None
    lines = [
        "---",
        "library_name: peft",
        f"base_model: {base}",
        "tags: [lora, lq-edu" + (f", {result.method}, nf{result.bits}" if quantized else "") + "]",
        "---",
        "",
        f"# {result.name} adapter for {base} on `{TASK_NAME}`",
        "",
        f"LoRA r={cfg.get('r')}, alpha={cfg.get('alpha')} on every linear layer of the decoder"
        + (f", trained on a frozen {result.bits}-bit NF{result.bits} base (start: `{result.method}`)." if quantized
           else ", trained on the frozen float base."),
        f"{cfg.get('steps')} AdamW steps, peak lr {cfg.get('lr')}, batch {cfg.get('batch_size')}, seed {cfg.get('seed')};"
        " made by lesson 07 of lq-edu with `lq_edu.finetune.finetune`.",
        "",
        f"| metric ({cfg.get('eval_split')}, {cfg.get('eval_examples')} examples) | value |"
        + (" retention vs 16-bit LoRA |" if keep else ""),
        "|---|---:|" + ("---:|" if keep else ""),
        f"| exact-match accuracy | {result.accuracy:.3f} |" + (f" {100 * keep['accuracy']:.1f}% |" if keep else ""),
        f"| held-out loss (nats/token) | {result.loss:.4f} |" + (f" {100 * keep['loss']:.1f}% |" if keep else ""),
        "",
        f"Memory while training: base {result.base_bytes / 2**20:.2f} MiB, adapters {result.adapter_bytes / 2**20:.2f} MiB,"
        f" AdamW state {result.optimizer_bytes / 2**20:.2f} MiB.",
        "",
        "## Load it",
        "",
        "```python",
        "import lq_edu as lq",
        "model, tok = lq.load_course_model()",
        "lq.load_adapter(model, 'this/folder')  # checks the base fingerprint, restores the quantized base",
        "```",
    ]
    if quantized:
        lines += [
            "",
            "The adapter was trained against its own quantized base, saved beside it in `lq_edu_base.safetensors`"
            " (with a SHA-256 fingerprint of each original float weight in `lq_edu_base.json`). PEFT can read"
            " `adapter_model.safetensors`, but on the float base it gives a different model: use `lq_edu.load_adapter`.",
        ]
    return "\n".join(lines) + "\n"
