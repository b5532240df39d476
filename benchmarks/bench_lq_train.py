"""One LoRA training step of the course model on its SFT task: LQ-LoRA against 16-bit LoRA and PEFT + bitsandbytes.

    python benchmarks/bench_lq_train.py [--steps 9] [--warmup 2] [--batch-size 16] [--batches 2] [--rank 16]
                                        [--formats nf4,nf3,nf2] [--threads N] [--seed 0]

A step is what ``lq_edu.trainer`` does per optimizer step with one micro-batch: forward, backward, AdamW step,
``zero_grad``. Every contender gets a fresh course model (6 Llama blocks, hidden 256), LoRA r=16, alpha=32 on
all 42 linear layers of the blocks (not lm_head or the embeddings), and the same fixed batches: 16 chats of the
task's train split, picked with ``--seed``, right-padded by ``lq_edu.sft.collate``. The contenders:

- 16-bit LoRA: ``inject_lora(quantize=None)``, the course's float-base LoRA. Its base is held in the dtype the
  model loads in, fp32 (CPU has no fast 16-bit matmul), so its weights take twice the bytes of a real 16-bit base;
- LQ nf4 / nf3 / nf2: ``inject_lora(quantize=fmt, init="lq")``, a QuantLinear base (block 64, no double
  quantization) that is dequantized in forward and again in backward;
- PEFT + bitsandbytes (when both are installed): the same layers as ``bnb.nn.Linear4bit`` NF4 (block 64, no
  double quantization, fp32 compute) holding the same float weights, then ``peft.get_peft_model`` with
  ``LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")``: QLoRA as the peers build it. No
  ``prepare_model_for_kbit_training``: it would switch on gradient checkpointing, which no other contender uses.

Time: the median step over ``--steps`` interleaved rounds (``timing.interleaved_medians``), as a ratio to 16-bit
LoRA. Target: an LQ step at most 1.5x a 16-bit LoRA step on CPU. On a machine that other work shares, pass
``--threads 1``: with more threads than idle cores, every matmul waits for a descheduled thread and the ratios
are noise (the header prints the load average so that a reader can tell).

Memory, counted exactly (so deterministic for a given torch build and device) in one more step on the first batch:

- base: the frozen weights (parameters, buffers, and the packed codes and block scales of quantized layers;
  codebooks are shared constants and left out, as ``QuantizedWeight.nbytes`` does);
- adapters and their gradients; AdamW: its two moments (and step counters) after a step;
- saved: new storage autograd keeps from forward to backward, seen by ``saved_tensors_hooks`` and counted once
  per storage; a tensor that is a model parameter (``F.linear`` saving a frozen weight) adds nothing. Both
  quantized bases keep only a reference to their packed weight, already counted in base.

The sum of the five is a model of a step's peak, not a reading of it: it leaves out short-lived temporaries (a
dequantized weight slice, the logits' gradient) and counts saved tensors that backward frees before the last
gradients exist. On CUDA the script also prints ``torch.cuda.max_memory_allocated`` per step.
"""

from __future__ import annotations

import argparse
import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from timing import interleaved_medians
from torch import nn

from lq_edu.adapters import inject_lora, select_targets
from lq_edu.models import load_course_model
from lq_edu.quant import FORMATS
from lq_edu.quant_linear import QuantLinear
from lq_edu.sft import collate, load_sft
from lq_edu.surgery import set_module

BASELINE = "16-bit LoRA"
PEER = "PEFT+bnb nf4"
TARGET = 1.5  # LQ step / 16-bit LoRA step on CPU
MIB = 2**20
LR = 2e-4  # the trainer's default peak learning rate; the step's cost does not depend on it


@dataclass
class Contender:
    """A model ready to train, its AdamW and its step on the fixed batches."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: Callable[[], None]
    start_loss: float  # on the first batch, before any step: an LQ start is near the float model, QLoRA further


@dataclass
class Memory:
    """Bytes one training step holds, by kind."""

    base_float: int  # frozen float weights and buffers (embeddings, lm_head, norms; every layer of a float base)
    base_quant: int  # quantized layers: packed codes and block scales
    adapters: int  # trainable LoRA parameters
    grads: int  # their gradients after backward
    adamw: int  # AdamW state after a step
    saved: int  # held by autograd between forward and backward

    @property
    def base(self) -> int:
        return self.base_float + self.base_quant

    @property
    def total(self) -> int:
        return self.base + self.adapters + self.grads + self.adamw + self.saved


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def contender(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> Contender:
    """AdamW on the trainable parameters and a step that cycles through ``batches``, as the trainer steps."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    cursor = itertools.cycle(batches)  # every contender is called equally often, so round k sees the same batch
    sync = torch.cuda.synchronize if batches[0]["input_ids"].is_cuda else (lambda: None)

    def step() -> None:
        model(**next(cursor)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()  # a CUDA step is only over when its kernels are

    with torch.no_grad():
        start_loss = model(**batches[0]).loss.item()
    step()  # one step now, so that a contender that cannot train fails here rather than mid-timing
    return Contender(model, optimizer, step, start_loss)


def peft_bnb_model(device: torch.device, r: int, alpha: float) -> nn.Module:
    """The course model with its block linears as bitsandbytes NF4 Linear4bit, wrapped by PEFT LoRA."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    model, _ = load_course_model()
    for name in select_targets(model, "all-linear"):  # the layers inject_lora adapts
        linear = model.get_submodule(name)
        q = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=torch.float32,
            compress_statistics=False,
            quant_type="nf4",
        )
        q.load_state_dict(linear.state_dict())
        set_module(model, name, q.to(device))  # .to() is where bitsandbytes quantizes
    model.to(device)
    model.is_loaded_in_4bit = True  # what transformers sets for a 4-bit load; PEFT then picks its bnb LoRA layer
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def base_bytes(model: nn.Module) -> tuple[int, int]:
    """Frozen state as (float bytes, quantized bytes); codes and block scales are quantized, codebooks left out."""
    frozen = [p for p in model.parameters() if not p.requires_grad] + list(model.buffers())
    frozen = list({t.data_ptr(): t for t in frozen}.values())  # a shared tensor counts once
    float_bytes = sum(_bytes(t) for t in frozen if t.is_floating_point())
    quant_bytes = sum(_bytes(t) for t in frozen if not t.is_floating_point())  # bitsandbytes' packed uint8 weight
    for m in model.modules():
        if isinstance(m, QuantLinear):
            quant_bytes += m.qweight.nbytes  # packed codes + block scales; not a parameter or buffer
    for p in frozen:
        state = getattr(p, "quant_state", None)  # bitsandbytes Params4bit keeps its block scales here
        if state is not None:
            quant_bytes += _bytes(state.absmax)
    return float_bytes, quant_bytes


def measure_memory(c: Contender, batch: dict[str, torch.Tensor]) -> Memory:
    """One step on ``batch``, counting every kind of bytes it holds (see the module docstring)."""
    model_storages = {t.untyped_storage().data_ptr() for t in itertools.chain(c.model.parameters(), c.model.buffers())}
    saved: dict[int, int] = {}  # storage address -> bytes

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in model_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = c.model(**batch).loss
    loss.backward()
    trainable = [p for p in c.model.parameters() if p.requires_grad]
    grads = sum(_bytes(p.grad) for p in trainable if p.grad is not None)
    c.optimizer.step()
    adamw = sum(_bytes(t) for state in c.optimizer.state.values() for t in state.values() if torch.is_tensor(t))
    c.optimizer.zero_grad(set_to_none=True)
    return Memory(*base_bytes(c.model), sum(_bytes(p) for p in trainable), grads, adamw, sum(saved.values()))


def cuda_step_peak(c: Contender) -> int:
    """Bytes a step allocates above what was resident before it (all contenders' models and AdamW states)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    c.step()
    return torch.cuda.max_memory_allocated() - before


def fixed_batches(tokenizer, size: int, count: int, seed: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """``count`` batches of ``size`` chats from the task's train split, chosen by ``seed``; each tensor (B, T)."""
    train = load_sft("train", tokenizer)
    picked = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[: size * count].tolist()
    chunks = [picked[s : s + size] for s in range(0, len(picked), size)]
    return [
        {k: v.to(device) for k, v in collate([train[i] for i in chunk], tokenizer.pad_token_id).items()}
        for chunk in chunks
    ]


def build_contenders(
    base: nn.Module, batches: list[dict[str, torch.Tensor]], formats: list[str], r: int, alpha: float
) -> tuple[dict[str, Contender], list[str]]:
    """16-bit LoRA on ``base``, LQ on a fresh model per format, then PEFT + bitsandbytes; and why any was skipped."""
    device = next(base.parameters()).device
    inject_lora(base, r=r, alpha=alpha, quantize=None, verbose=False)
    contenders = {BASELINE: contender(base, batches)}
    for fmt in formats:
        model, _ = load_course_model(device=device)
        inject_lora(model, r=r, alpha=alpha, quantize=fmt, init="lq", verbose=False)
        contenders[f"LQ {fmt}"] = contender(model, batches)
    try:
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
    except ImportError as err:
        return contenders, [f"{PEER} skipped: {err.name} is not installed"]
    try:
        contenders[PEER] = contender(peft_bnb_model(device, r, alpha), batches)
    except Exception as err:  # bitsandbytes raises many kinds of error where it has no kernel for a device
        return contenders, [f"{PEER} skipped: Linear4bit could not train on {device} ({type(err).__name__}: {err})"]
    return contenders, []


def print_times(contenders: dict[str, Contender], seconds: dict[str, float], on_cpu: bool) -> None:
    base_s = seconds[BASELINE]
    print(f"\n{'contender':<16} {'step s':>7} {'vs 16-bit':>9}  {'target':<16} {'loss at start':>13}")
    for name, c in contenders.items():
        ratio = seconds[name] / base_s
        if name.startswith("LQ "):
            verdict = f"<= {TARGET}x: {'OK' if ratio <= TARGET else 'OVER'}" if on_cpu else "(target is for CPU)"
        else:
            verdict = "(peer)" if name == PEER else ""
        print(f"{name:<16} {seconds[name]:>7.3f} {ratio:>8.2f}x  {verdict:<16} {c.start_loss:>13.4f}")
    for name in contenders:
        if name.startswith("LQ ") and PEER in seconds:
            print(f"lq_edu {name} / {PEER} step: {seconds[name] / seconds[PEER]:.2f}x")


def print_memory(memory: dict[str, Memory], float_bytes: int) -> None:
    """The table of ``Memory`` rows; ``float_bytes``: bytes per weight of the 16-bit LoRA's base as it runs here."""
    base = memory[BASELINE]
    print(f"\nmemory on the first batch, MiB (exact counts; 'total' vs {BASELINE})")
    print(
        f"{'contender':<16} {'base':>7} {'adapters':>8} {'grads':>7} {'AdamW':>7} {'saved':>7} {'total':>7} "
        f"{'vs 16-bit':>9} {'base vs 16-bit':>14}"
    )
    for name, m in memory.items():
        print(
            f"{name:<16} {m.base / MIB:>7.2f} {m.adapters / MIB:>8.2f} {m.grads / MIB:>7.2f} {m.adamw / MIB:>7.2f} "
            f"{m.saved / MIB:>7.2f} {m.total / MIB:>7.2f} {m.total / base.total:>8.2f}x "
            f"{m.base / base.base:>13.2f}x"
        )
    if len({m.saved for m in memory.values()}) == 1:
        print("('saved' is the same for every contender: activations depend on data and adapters, not on the base)")
    if float_bytes != 2:
        print(f"(float weights take {float_bytes} bytes here; with every float weight at 2 bytes, base vs {BASELINE}:")
        sixteen = {name: m.base_float * 2 // float_bytes + m.base_quant for name, m in memory.items()}
        print("  " + ", ".join(f"{name} {b / sixteen[BASELINE]:.2f}x" for name, b in sixteen.items()) + ")")
    for name in memory:
        if name.startswith("LQ ") and PEER in memory:
            print(
                f"lq_edu {name} / {PEER} memory: total {memory[name].total / memory[PEER].total:.2f}x, "
                f"base {memory[name].base / memory[PEER].base:.2f}x, "
                f"saved for backward {memory[name].saved / memory[PEER].saved:.2f}x"
            )


def print_cuda_peaks(contenders: dict[str, Contender], memory: dict[str, Memory]) -> None:
    print("\ncuda, MiB: torch.cuda.max_memory_allocated during one step above what was resident before it,")
    print("and that plus this contender's resident base + adapters + AdamW (counted as above)")
    print(f"{'contender':<16} {'step peak':>9} {'vs 16-bit':>9} {'total':>8} {'vs 16-bit':>9}")
    peaks = {name: cuda_step_peak(c) for name, c in contenders.items()}
    totals = {name: peaks[name] + m.base + m.adapters + m.adamw for name, m in memory.items()}
    for name in contenders:
        print(
            f"{name:<16} {peaks[name] / MIB:>9.2f} {peaks[name] / peaks[BASELINE]:>8.2f}x "
            f"{totals[name] / MIB:>8.2f} {totals[name] / totals[BASELINE]:>8.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=9, help="timed rounds; each round steps every contender once")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per contender first")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=2, help="fixed batches the steps cycle through")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32)
    parser.add_argument("--formats", default="nf4,nf3,nf2", help=f"LQ base formats, from {', '.join(FORMATS)}")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--seed", type=int, default=0, help="which chats make the batches")
    args = parser.parse_args()
    formats = [f for f in args.formats.split(",") if f]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        parser.error(f"--formats {','.join(unknown)} not known; use some of {', '.join(FORMATS)}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")  # other work, before ours starts

    model, tokenizer = load_course_model(device=device)
    weight = model.get_input_embeddings().weight  # the dtype the float model runs in
    batches = fixed_batches(tokenizer, args.batch_size, args.batches, args.seed, device)
    contenders, skipped = build_contenders(model, batches, formats, args.rank, args.alpha)
    seconds = interleaved_medians(
        {name: c.step for name, c in contenders.items()}, repeats=args.steps, warmup=args.warmup
    )
    memory = {name: measure_memory(c, batches[0]) for name, c in contenders.items()}

    widths = [b["input_ids"].shape[1] for b in batches]
    tokens = [int(b["attention_mask"].sum()) for b in batches]
    print(
        f"device={device} threads={torch.get_num_threads()}, load average {load:.1f} on {os.cpu_count()} cores "
        f"at start; rank={args.rank} alpha={args.alpha:g}\n{len(batches)} fixed batches of {args.batch_size} chats "
        f"(padded widths {widths}, {tokens} real tokens)"
    )
    print(
        f"{BASELINE} = the course's float-base LoRA, run in {str(weight.dtype).removeprefix('torch.')} on "
        f"{device.type}; median of {args.steps} interleaved steps after {args.warmup} warm-up"
    )
    for line in skipped:
        print(line)
    print_times(contenders, seconds, on_cpu=device.type == "cpu")
    print_memory(memory, weight.element_size())
    if device.type == "cuda":
        print_cuda_peaks(contenders, memory)


if __name__ == "__main__":
    main()
