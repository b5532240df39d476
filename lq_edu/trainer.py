"""Train LoRA adapters with a compact loop on top of 🤗 accelerate.

    result = train(model, train_data, eval_data, TrainConfig(steps=200, output_dir="runs/demo"))
    plot_losses(result)

The same code runs in a notebook, as ``python script.py`` and under ``accelerate launch --num_processes 2``
(DDP; gloo on CPU, NCCL on GPUs). It follows the usual recipe: AdamW on the trainable parameters only
(after ``inject_lora`` those are the ``lora_A``/``lora_B`` matrices), gradient accumulation, gradient-norm
clipping, linear warmup then cosine decay (``lq_edu.pretrain.lr_at``, the schedule that trained the course
model), bf16 autocast on GPUs that support it and fp32 elsewhere.

Why each piece is written out rather than hidden: a learner should be able to point at the line that makes
a resumed run bit-for-bit the same as an uninterrupted one. Three choices make that true on CPU:

- the data order is a pure function of ``(seed, epoch)`` and the micro-step number, so resuming at step k
  needs no data-loader state;
- the learning rate is a pure function of the step (set by hand before each ``optimizer.step()``);
- a checkpoint holds the trainable weights, the AdamW moments, the step and every rank's torch RNG state.

Checkpoints (``output_dir/checkpoint-000040/``) use safetensors and JSON only, so loading one never runs
pickled code: ``trainable.safetensors`` (trainable parameters by name), ``adapter/`` (PEFT format, via
``lq_edu.adapters.save_adapter``), ``optimizer.safetensors`` + ``optimizer.json`` (AdamW tensors and its
scalar settings), ``rng_rank{r}.safetensors`` and ``trainer_state.json`` (step, losses so far). A checkpoint
is written to a ``.tmp`` folder and renamed, so a crash mid-write never replaces the last good one.

Stops: Ctrl-C (``KeyboardInterrupt``) saves the adapter to ``output_dir/interrupted/`` and re-raises, so a
script still stops; a NaN or inf loss raises ``NonFiniteLossError`` (a ``RuntimeError``) naming the step,
before the bad update is applied, and leaves the last checkpoint untouched.

Limits: one model per ``train`` call, map-style data (an iterable is read into a list once), no
tensor/pipeline parallelism, no fp16 loss scaling (use bf16 or fp32), Python's ``random``/NumPy RNGs are not
checkpointed (the loop does not use them).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from lq_edu.adapters import lora_layers, save_adapter
from lq_edu.pretrain import lr_at

MIXED_PRECISION = ("auto", "no", "bf16")
CHECKPOINT_PREFIX = "checkpoint-"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; training stopped before applying that step's update."""


@dataclass
class TrainConfig:
    """How long and how hard to train. Sizes are per process: the global batch is
    ``batch_size * grad_accum * num_processes`` sequences per optimizer step."""

    steps: int = 100  # optimizer steps
    lr: float = 2e-4  # peak learning rate
    warmup: int = 10  # linear-warmup steps
    min_lr_ratio: float = 0.1  # cosine decays to min_lr_ratio * lr
    weight_decay: float = 0.0
    batch_size: int = 4  # sequences per micro-batch, per process
    grad_accum: int = 1  # micro-batches per optimizer step
    max_grad_norm: float | None = 1.0  # clip the global gradient norm; None = no clipping
    eval_every: int = 0  # steps between evaluations; 0 = only at the end (if eval_data is given)
    checkpoint_every: int = 0  # steps between checkpoints; 0 = none
    output_dir: str | None = None  # needed for checkpoints and the Ctrl-C save
    seed: int = 0  # data order and the torch RNG
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower
    mixed_precision: str = "auto"  # "auto" (bf16 on GPUs that support it, else fp32), "no" or "bf16"
    progress: bool = True  # tqdm bar with loss and tokens/s (main process only)


@dataclass
class TrainResult:
    """What a run produced. ``losses[i]`` and ``lrs[i]`` belong to optimizer step ``i + 1``."""

    losses: list[float] = field(default_factory=list)  # mean training loss per step (over ranks and micro-batches)
    lrs: list[float] = field(default_factory=list)  # learning rate used at each step
    grad_norms: list[float] = field(default_factory=list)  # global gradient norm before clipping
    eval_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, mean eval loss per token)
    tokens_per_second: float = 0.0  # attended tokens / wall second, all ranks together, this session only
    stopped_reason: str = "completed"  # "completed", "interrupted" or "non-finite loss at step k"
    last_checkpoint: str | None = None  # folder of the newest checkpoint on disk


# --- data ------------------------------------------------------------------------------------------------------


def _as_examples(data: Iterable[dict] | Sequence[dict], what: str) -> Sequence[dict]:
    """Map-style access to ``data``; an iterable (generator, IterableDataset) is read into a list once."""
    if hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        examples = data
    else:
        examples = list(data)
    if len(examples) == 0:
        raise ValueError(f"{what} is empty; pass a Dataset or list of dicts with input_ids, attention_mask, labels")
    return examples


def collate(examples: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Stack examples into a batch: input_ids, attention_mask, labels, each ``(B, T)`` int64.

    attention_mask defaults to ones and labels to input_ids (-100 = ignored by the loss). Trailing columns that
    are padding in every row (mask 0, label -100) are cut, so padded SFT data costs only the batch's longest row.
    """
    for i, ex in enumerate(examples):
        if "input_ids" not in ex:
            raise ValueError(f"example {i} has keys {sorted(ex)}; each needs input_ids (and optionally "
                             "attention_mask, labels)")
    ids = [torch.as_tensor(ex["input_ids"], dtype=torch.long) for ex in examples]
    lengths = {len(t) for t in ids}
    if len(lengths) != 1:
        raise ValueError(f"a batch mixes sequence lengths {sorted(lengths)}; give every example one "
                         "length (pad, pack or cut fixed windows) before training")
    batch = {"input_ids": torch.stack(ids)}  # (B, T)
    batch["attention_mask"] = torch.stack([torch.as_tensor(ex.get("attention_mask", torch.ones_like(t)),
                                                           dtype=torch.long) for ex, t in zip(examples, ids, strict=True)])
    batch["labels"] = torch.stack([torch.as_tensor(ex.get("labels", t), dtype=torch.long)
                                   for ex, t in zip(examples, ids, strict=True)])
    # Right padding that every row of this batch shares is dead weight: a causal model's earlier tokens never
    # see it and its labels are -100. Cutting it changes no logit or loss and saves compute on padded SFT data.
    attended = batch["attention_mask"].any(dim=0).nonzero()
    width = int(attended[-1]) + 1 if len(attended) else batch["input_ids"].shape[1]
    if width < batch["input_ids"].shape[1] and bool((batch["labels"][:, width:] == -100).all()):
        batch = {k: v[:, :width] for k, v in batch.items()}
    return batch


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled example indices of one epoch, ``(n,)``: a pure function of (seed, epoch), so any rank and
    any resumed run can recompute it."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def micro_batch_indices(n: int, micro: int, batch_size: int, rank: int, world: int, seed: int) -> list[int]:
    """Indices of global micro-batch number ``micro`` that belong to ``rank``.

    Each global micro-batch takes ``batch_size * world`` consecutive indices of the epoch order; rank r takes
    its ``batch_size`` slice. The epoch's ragged tail is dropped so every rank sees full batches.
    """
    per_epoch = n // (batch_size * world)
    if per_epoch == 0:
        raise ValueError(f"{n} training examples cannot fill one batch of batch_size={batch_size} x "
                         f"{world} process(es); lower batch_size or add data")
    epoch, j = divmod(micro, per_epoch)
    start = j * batch_size * world + rank * batch_size
    return epoch_order(n, seed, epoch)[start:start + batch_size].tolist()


# --- checkpoints -----------------------------------------------------------------------------------------------


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """AdamW's state dict as safetensors-ready tensors plus a JSON-ready remainder (no pickle)."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, t in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = t
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_tensors() -> dict[str, torch.Tensor]:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda.{i}"] = s
    return out


def _save_checkpoint(accelerator, model: nn.Module, opt, step: int, result: TrainResult, config: TrainConfig) -> Path:
    """Write ``output_dir/checkpoint-{step:06d}``; every rank writes its RNG file, the main rank the rest."""
    from safetensors.torch import save_file

    final = Path(config.output_dir) / f"{CHECKPOINT_PREFIX}{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save_file(_rng_tensors(), str(tmp / f"rng_rank{accelerator.process_index}.safetensors"))
    if accelerator.is_main_process:
        save_file({n: p.detach().cpu().contiguous() for n, p in _trainable(model).items()},
                  str(tmp / "trainable.safetensors"))
        if lora_layers(model):
            save_adapter(model, tmp / "adapter")
        tensors, meta = _optimizer_to_flat(opt)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(meta, indent=1))
        state = {"step": step, "world_size": accelerator.num_processes, "config": asdict(config),
                 "losses": result.losses, "lrs": result.lrs, "grad_norms": result.grad_norms,
                 "eval_losses": result.eval_losses}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # atomic on one file system: the old checkpoint stays valid until here
    accelerator.wait_for_everyone()
    return final


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete ``checkpoint-*`` folder under ``output_dir`` (``.tmp`` folders are ignored)."""
    found = sorted(p for p in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and p.suffix != ".tmp")
    return found[-1] if found else None


def _load_checkpoint(folder: Path, model: nn.Module, opt, accelerator, result: TrainResult) -> int:
    """Restore weights, optimizer, RNG and history from ``folder``; return the step it was taken at."""
    from safetensors.torch import load_file

    state_path = folder / "trainer_state.json"
    if not state_path.is_file():
        raise FileNotFoundError(f"{folder} is not a trainer checkpoint (no trainer_state.json); pass a "
                                f"{CHECKPOINT_PREFIX}NNNNNN folder or resume_from=True for the newest one")
    state = json.loads(state_path.read_text())
    if state["world_size"] != accelerator.num_processes:
        raise ValueError(f"{folder} was written by {state['world_size']} process(es) but this run has "
                         f"{accelerator.num_processes}; resume with the same number of processes")
    params = _trainable(model)
    saved = load_file(str(folder / "trainable.safetensors"))
    if set(saved) != set(params):
        missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        raise ValueError(f"{folder} holds other trainable parameters than the model (missing {missing[:3]}, "
                         f"extra {extra[:3]}); inject the same adapters (same r, targets) before resuming")
    odd = [n for n, p in params.items() if saved[n].shape != p.shape]
    if odd:
        raise ValueError(f"{folder} holds {odd[0]} as {tuple(saved[odd[0]].shape)} but the model's is "
                         f"{tuple(params[odd[0]].shape)}; inject the same adapters (same r, targets) before resuming")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n])
    meta = json.loads((folder / "optimizer.json").read_text())
    opt.load_state_dict(_optimizer_from_flat(load_file(str(folder / "optimizer.safetensors")), meta))
    rng = load_file(str(folder / f"rng_rank{accelerator.process_index}.safetensors"))
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available() and "cuda.0" in rng:
        torch.cuda.set_rng_state_all([rng[f"cuda.{i}"] for i in range(torch.cuda.device_count())])
    result.losses, result.lrs = state["losses"], state["lrs"]
    result.grad_norms = state["grad_norms"]
    result.eval_losses = [tuple(x) for x in state["eval_losses"]]
    result.last_checkpoint = str(folder)
    return state["step"]


# --- the loop --------------------------------------------------------------------------------------------------


def _check_config(config: TrainConfig) -> None:
    for name in ("steps", "batch_size", "grad_accum"):
        value = getattr(config, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")
    if config.mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision={config.mixed_precision!r} is not supported; use one of "
                         f"{', '.join(MIXED_PRECISION)} (fp16 would need loss scaling; use bf16)")
    if (config.checkpoint_every or 0) > 0 and not config.output_dir:
        raise ValueError(f"checkpoint_every={config.checkpoint_every} needs output_dir; set "
                         "TrainConfig(output_dir='runs/my-run') or checkpoint_every=0")


def _mixed_precision(choice: str) -> str:
    if choice == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return choice


@torch.no_grad()
def evaluate_loss(model: nn.Module, eval_data: Sequence[dict], batch_size: int, accelerator) -> float:
    """Mean next-token loss per predicted token over ``eval_data``, sharded over ranks and summed back."""
    was_training = model.training
    model.eval()
    rank, world = accelerator.process_index, accelerator.num_processes
    total = torch.zeros(2, device=accelerator.device)  # (sum of token losses, number of tokens)
    mine = list(range(rank, len(eval_data), world))
    for start in range(0, len(mine), batch_size):
        batch = collate([eval_data[i] for i in mine[start:start + batch_size]])
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with accelerator.autocast():
            loss = model(**batch).loss.float()
        n_tokens = (batch["labels"][:, 1:] != -100).sum()  # the model shifts labels by one
        total += torch.stack([loss * n_tokens, n_tokens.float()])
    total = accelerator.reduce(total, "sum")
    model.train(was_training)
    return (total[0] / total[1].clamp(min=1)).item()


def train(
    model: nn.Module,
    train_data: Iterable[dict] | Sequence[dict],
    eval_data: Iterable[dict] | Sequence[dict] | None = None,
    config: TrainConfig | None = None,
    resume_from: str | Path | bool | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train ``model``'s trainable parameters (its LoRA adapters after ``inject_lora``) in place.

    train_data / eval_data: examples, each a dict of equal-length 1-D token tensors ``input_ids``, optional
        ``attention_mask`` and ``labels`` (-100 = not scored). Lengths may differ between datasets.
    resume_from: a checkpoint folder, or True for the newest under ``config.output_dir``. The run continues
        from that step with the same data order, learning rate and RNG, so its losses match an uninterrupted run.
    on_step(step, loss): called after every optimizer step (1-based), on every rank; raise to stop.
    Returns a ``TrainResult``. Raises ``NonFiniteLossError`` (a RuntimeError) on a NaN/inf loss and re-raises
    ``KeyboardInterrupt`` after saving the adapter to ``output_dir/interrupted``.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    config = config or TrainConfig()
    _check_config(config)
    params = list(_trainable(model).values())
    if not params:
        raise ValueError("the model has no trainable parameters; call inject_lora(model, ...) first")
    train_examples = _as_examples(train_data, "train_data")
    eval_examples = None if eval_data is None else _as_examples(eval_data, "eval_data")

    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=_mixed_precision(config.mixed_precision),
                              gradient_accumulation_steps=config.grad_accum)
    torch.manual_seed(config.seed + accelerator.process_index)  # dropout etc.; differs per rank on purpose
    if config.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            raise ValueError(f"gradient_checkpointing=True needs a transformers model; got {type(model).__name__}")
        if hasattr(model, "config"):
            model.config.use_cache = False  # a KV cache is useless in training and clashes with recompute
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    was_training = model.training
    model.train()
    wrapped, optimizer = accelerator.prepare(model, optimizer)

    result = TrainResult()
    start_step = 0
    if resume_from:
        folder = latest_checkpoint(config.output_dir) if resume_from is True else Path(resume_from)
        if folder is None:
            raise FileNotFoundError(f"no {CHECKPOINT_PREFIX}* folder under {config.output_dir}; train without "
                                    "resume_from first")
        start_step = _load_checkpoint(folder, model, optimizer, accelerator, result)

    rank, world = accelerator.process_index, accelerator.num_processes
    bar = tqdm(total=config.steps, initial=start_step, desc="train",
               disable=not (config.progress and accelerator.is_local_main_process))
    tokens, t0 = 0, time.perf_counter()
    step = start_step
    try:
        for step in range(start_step + 1, config.steps + 1):
            step_loss = torch.zeros((), device=accelerator.device)
            step_tokens = torch.zeros((), device=accelerator.device)
            for a in range(config.grad_accum):  # one optimizer step = grad_accum micro-batches
                micro = (step - 1) * config.grad_accum + a
                idx = micro_batch_indices(len(train_examples), micro, config.batch_size, rank, world, config.seed)
                batch = {k: v.to(accelerator.device) for k, v in collate([train_examples[i] for i in idx]).items()}
                with accelerator.accumulate(wrapped):  # skips the DDP all-reduce until the last micro-batch
                    loss = wrapped(**batch).loss  # mean over this micro-batch's scored tokens
                    accelerator.backward(loss)  # divides by grad_accum before backward
                step_loss += loss.detach().float() / config.grad_accum
                step_tokens += batch["attention_mask"].sum()
            step_loss = accelerator.reduce(step_loss, "mean")  # every rank sees the same number
            loss_value = step_loss.item()
            if not math.isfinite(loss_value):
                result.stopped_reason = f"non-finite loss at step {step}"
                kept = result.last_checkpoint or "none (checkpoint_every=0)"
                raise NonFiniteLossError(f"loss is {loss_value} at step {step}; the update was not applied and the "
                                         f"last good checkpoint is {kept}. Lower lr, check the data for empty "
                                         "labels, or use mixed_precision='no'")
            lr = lr_at(step - 1, config)  # the schedule is a pure function of the step
            for group in optimizer.param_groups:
                group["lr"] = lr
            norm = accelerator.clip_grad_norm_(params, config.max_grad_norm or float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            result.losses.append(loss_value)
            result.lrs.append(lr)
            result.grad_norms.append(float(norm))
            tokens += int(accelerator.reduce(step_tokens, "sum").item())
            result.tokens_per_second = tokens / max(time.perf_counter() - t0, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{result.tokens_per_second:,.0f}")
            if eval_examples is not None and config.eval_every and step % config.eval_every == 0:
                result.eval_losses.append((step, evaluate_loss(wrapped, eval_examples, config.batch_size, accelerator)))
            if config.checkpoint_every and step % config.checkpoint_every == 0:
                result.last_checkpoint = str(_save_checkpoint(accelerator, model, optimizer, step, result, config))
            if on_step is not None:
                on_step(step, loss_value)
        if eval_examples is not None and (not result.eval_losses or result.eval_losses[-1][0] != config.steps):
            result.eval_losses.append((config.steps, evaluate_loss(wrapped, eval_examples, config.batch_size,
                                                                    accelerator)))
    except KeyboardInterrupt:
        result.stopped_reason = "interrupted"
        if config.output_dir and accelerator.is_main_process and lora_layers(model):
            where = save_adapter(model, Path(config.output_dir) / "interrupted")
            print(f"interrupted during step {step}: adapter saved to {where}")
        raise
    finally:
        bar.close()
        model.train(was_training)
        if config.gradient_checkpointing:
            off = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
            off()
    return result


def plot_losses(result: TrainResult, title: str = "LoRA training"):
    """A matplotlib ``Figure``: training loss per step (and eval loss, when recorded) against step."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    ax.plot(range(1, len(result.losses) + 1), result.losses, label="train", lw=1)
    if result.eval_losses:
        steps, values = zip(*result.eval_losses, strict=True)
        ax.plot(steps, values, "o-", label="eval")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    return fig
