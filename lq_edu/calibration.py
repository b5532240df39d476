"""Calibration: quantize a model using what its layers actually see, one decoder block at a time.

Lesson 05's engine. Three pieces, in the order the lesson builds them:

1. ``calibration_data``: N random windows of T tokens from the course corpus's *train* split (seeded). The
   validation split is never read, so held-out perplexity after calibration stays held out.
2. ``ActivationStats`` / ``collect_stats``: forward pre-hooks that keep running sums per linear layer: the input
   Gram matrix XᵀX (GPTQ's Hessian, up to a factor), the per-channel mean |x| and max |x| (what activation-aware
   methods such as AWQ look at). Activations are folded into the sums batch by batch and never stored.
3. ``calibrate_model``: GPTQ's sequential recipe for a whole model. Capture the inputs of decoder block 0; then for
   each block: collect its linears' statistics on the current inputs, quantize each linear (``lq_edu.gptq``) and
   swap in a ``QuantLinear``, then run the *quantized* block to make the next block's inputs. Each block thus
   learns to live with the errors of the blocks before it, and memory holds one set of block inputs
   (N x T x hidden floats), not every layer's activations. Inside a block the same holds by default ("true
   sequential"): [q, k, v] first, then o_proj on inputs through the quantized attention, then [gate, up], then down.

Works for Llama-style models, whose decoder blocks are ``model.model.layers`` (Llama, Mistral, Qwen2, the course
model); the blocks' extra inputs (attention mask, rotary position embeddings, position ids) are captured from the
first block's call and replayed. Other layouts (GPT-2's ``transformer.h``) get a clear error. Leaves out:
lm_head and embeddings (quantize those with ``quantize_model`` if at all), and offloading the block inputs to CPU.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from lq_edu.corpus import load_corpus
from lq_edu.evaluate import token_stream
from lq_edu.gptq import MAX_DAMP, gptq
from lq_edu.quant import QuantizedWeight, quantize
from lq_edu.quant_linear import QuantLinear, linear_weight
from lq_edu.surgery import DEFAULT_EXCLUDE, linear_names, select_linears, set_module

METHODS = ("gptq", "rtn")

# ---------------------------------------------------------------------------------------------------------
# 1. Calibration data
# ---------------------------------------------------------------------------------------------------------

_STREAMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> its train token stream


def train_token_stream(tokenizer) -> torch.Tensor:
    """The train split as one token stream: long (n_tokens,), each page followed by EOS (as in pretraining).

    Tokenizing the split takes a few seconds on CPU, so the stream is cached per tokenizer object; a copy is
    returned, so changing it changes nothing here. Only the train split is read.
    """
    try:
        stream = _STREAMS.get(tokenizer)
    except TypeError:  # a tokenizer that can't be weakly referenced: no cache
        stream = None
    if stream is None:
        stream = token_stream(tokenizer, list(load_corpus("train")["text"]))
        try:
            _STREAMS[tokenizer] = stream
        except TypeError:
            pass
    return stream.clone()


def _max_positions(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def _vocab_rows(model: nn.Module) -> int:
    """Rows of the model's input embedding: token ids must be below this."""
    return int(model.get_input_embeddings().num_embeddings)


def _check_tokenizer_matches(tokenizer, model: nn.Module) -> None:
    n_tokens, rows = len(tokenizer), _vocab_rows(model)
    if n_tokens > rows:
        raise ValueError(
            f"the tokenizer has {n_tokens} tokens but the model's embedding has only {rows} rows: they don't belong "
            "together. Load the pair from one folder, e.g. `model, tokenizer = load_course_model()`"
        )


def _check_positive_int(value: object, name: str, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}; {hint}")
    return value


def calibration_data(
    tokenizer, n_samples: int = 128, seq_len: int = 256, seed: int = 0, model: nn.Module | None = None
) -> torch.Tensor:
    """``n_samples`` random windows of ``seq_len`` tokens from the train split: long (n_samples, seq_len).

    Window starts are drawn uniformly (with a ``torch.Generator`` seeded by ``seed``) over the train token stream,
    so the same seed gives the same data. Pass ``model`` to check that the windows fit its context and that the
    tokenizer belongs to it. Why random windows of one split: calibration must see text like the model's, but
    never the validation text that perplexity is measured on. GPTQ's paper uses 128 x 2048 tokens.
    """
    n_samples = _check_positive_int(n_samples, "n_samples", "calibration needs at least 1 sequence (GPTQ uses 128)")
    seq_len = _check_positive_int(seq_len, "seq_len", "use a window of at least 1 token (e.g. 256)")
    if model is not None:
        max_pos = _max_positions(model)
        if max_pos is not None and seq_len > max_pos:
            raise ValueError(
                f"seq_len={seq_len} is longer than the model's context of {max_pos} tokens; use seq_len<={max_pos}"
            )
        _check_tokenizer_matches(tokenizer, model)
    stream = train_token_stream(tokenizer)  # (n_tokens,)
    if seq_len > stream.numel():
        raise ValueError(f"seq_len={seq_len} is longer than the whole train split ({stream.numel()} tokens)")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seq_len + 1, (n_samples,), generator=generator)  # (N,)
    return stream[starts[:, None] + torch.arange(seq_len)]  # (N, T)


# ---------------------------------------------------------------------------------------------------------
# 2. Activation statistics, as running sums
# ---------------------------------------------------------------------------------------------------------


@dataclass(repr=False)
class ActivationStats:
    """Running statistics of one linear layer's inputs x (in_features per token), over ``n_tokens`` tokens.

    gram: (in, in) Σ xᵀx over tokens (fp32 unless asked otherwise). ``hessian`` = gram / n_tokens is GPTQ's H (up
        to GPTQ's factor 2, which changes nothing: damping is relative to its diagonal).
    abs_mean: (in,) mean |x| per input channel. abs_max: (in,) max |x| per input channel.
    Why running sums: storing the activations of 128 x 2048 tokens for every layer of an LLM would take more memory
    than the model; the sums take in² + 2·in numbers per layer, whatever the number of tokens.
    """

    gram: torch.Tensor
    abs_mean: torch.Tensor
    abs_max: torch.Tensor
    n_tokens: int = 0

    @classmethod
    def empty(
        cls, in_features: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> ActivationStats:
        """Zero sums for a layer with ``in_features`` inputs."""
        zeros = torch.zeros(in_features, device=device, dtype=dtype)
        return cls(torch.zeros(in_features, in_features, device=device, dtype=dtype), zeros, zeros.clone(), 0)

    @staticmethod
    def moments(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """One batch's contribution: x (..., in) -> (Σ xᵀx (in, in), Σ|x| (in,), max|x| (in,), tokens)."""
        x2 = x.detach().reshape(-1, x.shape[-1]).to(dtype)  # (tokens, in)
        absx = x2.abs()
        return x2.T @ x2, absx.sum(dim=0), absx.amax(dim=0), x2.shape[0]

    def add(self, moments: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]) -> None:
        """Fold one batch's ``moments`` into the running sums."""
        gram, abs_sum, abs_max, n = moments
        if n == 0:
            return
        total = self.n_tokens + n
        self.gram += gram
        self.abs_mean.mul_(self.n_tokens / total).add_(abs_sum / total)  # running mean
        torch.maximum(self.abs_max, abs_max, out=self.abs_max)
        self.n_tokens = total

    def update(self, x: torch.Tensor) -> None:
        """Fold a batch of inputs x (..., in) into the sums."""
        self.add(self.moments(x, self.gram.dtype))

    @property
    def hessian(self) -> torch.Tensor:
        """GPTQ's H = XᵀX / n_tokens: (in, in), the mean of xᵀx over tokens."""
        if self.n_tokens == 0:
            raise ValueError("no tokens were recorded for this layer; run calibration data through the model first")
        return self.gram / self.n_tokens

    def __repr__(self) -> str:
        return f"ActivationStats(in_features={self.gram.shape[0]}, n_tokens={self.n_tokens}, dtype={self.gram.dtype})"


@contextmanager
def record_stats(modules: dict[str, nn.Module], dtype: torch.dtype = torch.float32) -> Iterator[dict[str, ActivationStats]]:
    """Hook ``modules`` (name -> linear layer); inside the ``with``, every forward pass adds to their statistics.

    Yields name -> ``ActivationStats``, filled as forward passes run; the hooks come off on exit. Layers that read
    the very same input tensor (q/k/v projections, gate/up projections) share one batch computation of XᵀX.
    """
    stats: dict[str, ActivationStats] = {}
    last: list = [None, None]  # the last input tensor seen, and its moments

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]  # (..., in)
            if x is not last[0]:
                last[0], last[1] = x, ActivationStats.moments(x, dtype)
            if name not in stats:
                stats[name] = ActivationStats.empty(x.shape[-1], x.device, dtype)
            stats[name].add(last[1])

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in modules.items()]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()
        last[0] = last[1] = None


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _check_data(data: object, model: nn.Module) -> torch.Tensor:
    """Token ids (N, T): N > 0, T within the model's context, ids within its vocabulary."""
    if not isinstance(data, torch.Tensor) or data.dim() != 2 or data.is_floating_point():
        got = f"shape {tuple(data.shape)}, {data.dtype}" if isinstance(data, torch.Tensor) else type(data).__name__
        raise ValueError(f"data must be token ids, a long tensor (n_samples, seq_len); got {got}. Use calibration_data")
    n, t = data.shape
    if n == 0 or t == 0:
        raise ValueError(f"data has shape {tuple(data.shape)}: zero calibration samples; draw some with calibration_data")
    max_pos = _max_positions(model)
    if max_pos is not None and t > max_pos:
        raise ValueError(f"sequences of {t} tokens are longer than the model's context of {max_pos}; use seq_len<={max_pos}")
    rows = _vocab_rows(model)
    lo, hi = int(data.min()), int(data.max())
    if lo < 0 or hi >= rows:
        raise ValueError(
            f"data holds token ids {lo}..{hi} but the model's vocabulary has {rows} entries: the tokenizer doesn't "
            "match the model. Tokenize with the model's own tokenizer (load_course_model returns the pair)"
        )
    return data.long()


@torch.no_grad()
def collect_stats(
    model: nn.Module, data: torch.Tensor, names: Sequence[str] | None = None, batch_size: int = 8
) -> dict[str, ActivationStats]:
    """Run ``data`` (N, T token ids) through ``model`` and return name -> ``ActivationStats`` for its linear layers.

    names: the layers to watch (default: every ``nn.Linear``/``Conv1D``/``QuantLinear``, lm_head included).
    batch_size: sequences per forward pass. Memory: the sums, plus one batch's activations at a time.
    """
    data = _check_data(data, model)
    batch_size = _check_positive_int(batch_size, "batch_size", "use at least 1 sequence per forward pass")
    names = linear_names(model) if names is None else list(names)
    modules = {n: model.get_submodule(n) for n in names}
    device, was_training = _model_device(model), model.training
    model.eval()
    try:
        with record_stats(modules) as stats:
            for batch in data.split(batch_size):
                model(input_ids=batch.to(device), use_cache=False)
    finally:
        model.train(was_training)
    return dict(stats)


# ---------------------------------------------------------------------------------------------------------
# 3. Sequential calibration, block by block
# ---------------------------------------------------------------------------------------------------------


@dataclass
class LayerReport:
    """One quantized layer: its proxy loss (GPTQ's objective, see ``lq_edu.gptq``) against RTN's, and the cost.

    loss / rtn_loss: tr((W - Q) H (W - Q)ᵀ) with H from this layer's calibration inputs; None for method="rtn".
    damp: damping GPTQ used (more than asked if H was ill-conditioned). dead: dead input channels. seconds: wall time.
    """

    name: str
    shape: tuple[int, int]
    loss: float | None
    rtn_loss: float | None
    damp: float | None
    dead: int
    seconds: float


@dataclass
class CalibrationReport:
    """What ``calibrate_model`` did: the settings, one ``LayerReport`` per replaced layer, and the wall time."""

    method: str
    fmt: str
    block_size: int
    double_quant: bool
    act_order: bool
    damp: float
    n_samples: int
    seq_len: int
    n_blocks: int
    seconds: float = 0.0
    layers: list[LayerReport] = field(default_factory=list)

    @property
    def replaced(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def loss_ratio(self) -> float | None:
        """Σ GPTQ proxy loss / Σ RTN proxy loss over the layers (below 1: GPTQ kept outputs closer)."""
        if self.method != "gptq" or not self.layers:
            return None
        rtn = sum(layer.rtn_loss or 0.0 for layer in self.layers)
        return sum(layer.loss or 0.0 for layer in self.layers) / rtn if rtn > 0 else None

    def __str__(self) -> str:
        dq = ", double quant" if self.double_quant else ""
        ao = ", act-order" if self.act_order else ""
        ratio = self.loss_ratio
        loss = f"; proxy loss {ratio:.3f}x RTN's" if ratio is not None else ""
        return (
            f"{self.method} {self.fmt} (block {self.block_size}{dq}{ao}): {len(self.layers)} layers in {self.n_blocks} "
            f"blocks, calibrated on {self.n_samples} x {self.seq_len} tokens in {self.seconds:.1f} s{loss}"
        )


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks of a Llama-style model: ("model.layers", model.model.layers)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(
            f"calibrate_model works on Llama-style models whose decoder blocks are model.model.layers (Llama, Mistral, "
            f"Qwen2, the course model); {type(model).__name__} has none. Quantize it with round-to-nearest instead: "
            "lq_edu.quantize_model(model, fmt=...)"
        )
    return "model.layers", layers


class _StopForward(Exception):
    """Raised by the capture hook: once block 0's inputs are caught, the rest of the forward pass is not needed."""


def _capture_block_inputs(model: nn.Module, block: nn.Module, data: torch.Tensor, batch_size: int):
    """Inputs of ``block`` for every batch: hidden states [(B, T, hidden)], and the other args/kwargs to replay."""
    hidden, extra_args, kwargs = [], [], []

    def hook(module: nn.Module, args: tuple, kw: dict):
        if args:
            hidden.append(args[0])
            extra_args.append(args[1:])
        else:
            hidden.append(kw["hidden_states"])
            extra_args.append(())
        kwargs.append({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _StopForward

    device = _model_device(model)
    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in data.split(batch_size):
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    if len(hidden) != len(data.split(batch_size)):
        raise ValueError(f"{type(model).__name__}'s forward pass did not call its first decoder block; is it Llama-style?")
    return hidden, extra_args, kwargs


def _hidden(out) -> torch.Tensor:
    """A decoder block's output: a tensor (transformers 5) or a tuple whose first entry is one (older versions)."""
    return out[0] if isinstance(out, tuple) else out


def _check_model_for_calibration(model: nn.Module, names: list[str], prefix: str, method: str, block_size: int) -> None:
    already = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    if already:
        raise ValueError(
            f"the model is already quantized ({len(already)} QuantLinear layers, e.g. {already[0]}); calibration needs "
            "the float weights and the float activations. Load a fresh model (load_course_model()) and calibrate that"
        )
    outside = [n for n in names if not n.startswith(prefix + ".")]
    if outside:
        raise ValueError(
            f"calibrate_model quantizes linears inside the decoder blocks ({prefix}.*), but the patterns also pick "
            f"{', '.join(outside[:3])}; exclude them (the default exclude skips lm_head and embeddings)"
        )
    for n in names:
        weight, _ = linear_weight(model.get_submodule(n))
        if not bool(torch.isfinite(weight).all()):
            raise ValueError(f"layer {n} has NaN/inf weights; nothing was replaced. Fix or reload the model")
        if method == "gptq" and weight.shape[1] % block_size:
            raise ValueError(
                f"layer {n} has in_features={weight.shape[1]}, not a multiple of block_size={block_size}; GPTQ's "
                "groups are whole blocks of input columns. Pick a block_size that divides every layer's in_features"
            )


def calibrate_model(
    model: nn.Module,
    data: torch.Tensor,
    method: str = "gptq",
    fmt: str = "nf4",
    block_size: int = 64,
    double_quant: bool = False,
    act_order: bool = False,
    damp: float = 0.01,
    true_sequential: bool = True,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = DEFAULT_EXCLUDE,
    batch_size: int = 8,
    progress: bool = True,
) -> CalibrationReport:
    """Quantize the linears of a Llama-style ``model`` in place, block by block, calibrated on ``data`` (N, T ids).

    method: "gptq" (each layer by ``lq_edu.gptq.gptq`` with its Hessian from the quantized model so far) or "rtn"
    (round-to-nearest, no data needed beyond the checks; the baseline). fmt, block_size, double_quant: as in
    ``lq_edu.quant.quantize``. act_order, damp: GPTQ's options. true_sequential: inside a block, quantize the layers
    in the order the block calls them ([q, k, v], [o], [gate, up], [down]), each group calibrated on inputs through
    the groups already quantized (GPTQ's "true sequential"; False: every layer sees the float block's inputs).
    include / exclude: regular expressions on layer names, as in ``quantize_model``. batch_size: sequences per
    forward pass. Progress: a bar over the decoder blocks.
    Memory: the inputs of one block for all N sequences (N x T x hidden floats), one batch's activations, and one
    block's statistics (in² floats per distinct layer input).
    Atomic: if anything fails (or is interrupted) the layers already replaced are put back, and the model is as it
    was. It refuses up front a model that already holds any QuantLinear.
    """
    from tqdm.auto import tqdm

    prefix, layers = decoder_layers(model)
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not supported; use one of {', '.join(METHODS)}")
    batch_size = _check_positive_int(batch_size, "batch_size", "use at least 1 sequence per forward pass")
    quantize(torch.zeros(64), fmt, block_size)  # checks fmt and block_size before any work
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0 <= damp <= MAX_DAMP:
        raise ValueError(f"damp={damp!r} must be a number from 0 to {MAX_DAMP:g} (a fraction of mean diag H; try 0.01)")
    names = select_linears(model, include, exclude)
    _check_model_for_calibration(model, names, prefix, method, block_size)
    data = _check_data(data, model)
    report = CalibrationReport(method, fmt, block_size, double_quant, act_order, damp, *data.shape, len(layers))

    start = time.perf_counter()
    originals: dict[str, nn.Module] = {}  # replaced so far, to put back on failure
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if method == "gptq":
                hidden, extra_args, kwargs = _capture_block_inputs(model, layers[0], data, batch_size)
            for i, block in enumerate(tqdm(layers, desc=f"{method} {fmt}", unit="block", disable=not progress)):
                block_names = [n for n in names if n.startswith(f"{prefix}.{i}.")]
                modules = {n: model.get_submodule(n) for n in block_names}
                if method == "rtn" or not modules:
                    groups = [block_names] if modules else []
                elif true_sequential:  # [q, k, v], [o], [gate, up], [down] for Llama
                    groups = _input_groups(block, modules, hidden[0], extra_args[0], kwargs[0])
                else:
                    groups = [list(modules)]
                for group in groups:
                    stats: dict[str, ActivationStats] = {}
                    if method == "gptq":  # this group's inputs, through the block as quantized so far
                        group_modules = {n: modules[n] for n in group}
                        stats = _block_stats(block, group_modules, hidden, extra_args, kwargs, true_sequential)
                    for n in group:
                        qweight, layer_report = _quantize_layer(n, modules[n], stats.get(n), report)
                        originals[n] = modules[n]
                        set_module(model, n, QuantLinear(qweight, linear_weight(modules[n])[1], name=n))
                        report.layers.append(layer_report)
                if method == "gptq" and i + 1 < len(layers):  # the quantized block makes the next block's inputs
                    for k in range(len(hidden)):
                        hidden[k] = _hidden(block(hidden[k], *extra_args[k], **kwargs[k]))
    except BaseException:
        for n, module in originals.items():
            set_module(model, n, module)
        raise
    finally:
        model.train(was_training)
    report.seconds = time.perf_counter() - start
    return report


def _input_groups(block: nn.Module, modules: dict[str, nn.Module], x: torch.Tensor, args: tuple, kw: dict):
    """The block's linears grouped by shared input, in the order the block calls them (one probe batch).

    For a Llama block: [[q, k, v], [o], [gate, up], [down]]. Layers of a group read the same tensor, so they are
    quantized together; a later group is calibrated on inputs that come through the earlier, quantized, groups.
    """
    calls: list[tuple[str, torch.Tensor]] = []  # (layer, its input) in call order, first call of each layer

    def make_hook(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            if all(name != n for n, _ in calls):
                calls.append((name, args[0]))

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in modules.items()]
    try:
        block(x, *args, **kw)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    for k, (name, inp) in enumerate(calls):
        if k > 0 and inp is calls[k - 1][1]:
            groups[-1].append(name)
        else:
            groups.append([name])
    called = {n for n, _ in calls}
    missing = [n for n in modules if n not in called]
    return groups + ([missing] if missing else [])  # never-called layers last: _quantize_layer reports them


def _block_stats(
    block: nn.Module, group: dict[str, nn.Module], hidden: list, extra_args: list, kwargs: list, stop_early: bool
) -> dict[str, ActivationStats]:
    """``ActivationStats`` of the ``group``'s layers over all batches (the block's outputs are thrown away).

    stop_early: ``group`` is in call order, so each pass can stop once its last layer has its input.
    """

    def stop(_module: nn.Module, _args: tuple) -> None:
        raise _StopForward

    with record_stats(group) as stats:
        # registered after the stats hooks, so it runs after them: the rest of the block is not needed
        handle = list(group.values())[-1].register_forward_pre_hook(stop) if stop_early else None
        try:
            for x, args, kw in zip(hidden, extra_args, kwargs, strict=True):
                try:
                    block(x, *args, **kw)
                except _StopForward:
                    pass
        finally:
            if handle is not None:
                handle.remove()
    return stats


def _quantize_layer(
    name: str, module: nn.Module, stats: ActivationStats | None, report: CalibrationReport
) -> tuple[QuantizedWeight, LayerReport]:
    """Quantize one layer with the report's settings: its QuantizedWeight and its LayerReport."""
    start = time.perf_counter()
    weight, _ = linear_weight(module)
    if report.method == "gptq":
        if stats is None:
            raise RuntimeError(f"layer {name} saw no input while its block ran; is it used in the forward pass?")
        result = gptq(
            weight, stats.hessian, report.fmt, report.block_size, report.double_quant, report.damp, report.act_order
        )
        qweight, loss, rtn_loss, damp, dead = result.qweight, result.loss, result.rtn_loss, result.damp, result.dead
    else:
        qweight = quantize(weight.detach(), report.fmt, report.block_size, report.double_quant)
        loss = rtn_loss = damp = None
        dead = 0
    return qweight, LayerReport(name, tuple(weight.shape), loss, rtn_loss, damp, dead, time.perf_counter() - start)


__all__ = [
    "ActivationStats",
    "CalibrationReport",
    "LayerReport",
    "METHODS",
    "calibrate_model",
    "calibration_data",
    "collect_stats",
    "decoder_layers",
    "record_stats",
    "train_token_stream",
]
