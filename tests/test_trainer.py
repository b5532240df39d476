"""The accelerate training loop: loss falls, only adapters move, resume is exact, stops are safe, DDP agrees."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lq_edu.adapters import inject_lora
from lq_edu.trainer import NonFiniteLossError, TrainConfig, latest_checkpoint, plot_losses, train

ROOT = Path(__file__).resolve().parents[1]


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg)


def tiny_lora_llama(seed=0, r=8):
    model = tiny_llama(seed)
    inject_lora(model, r=r, alpha=2 * r, verbose=False)
    return model


def sequences(n=32, length=16):
    """Counting sequences mod 64: each token is the previous one plus 1, so a tiny model can learn them."""
    out = []
    for i in range(n):
        ids = (torch.arange(length) + i) % 64
        labels = ids.clone()
        labels[: 2] = -100  # a scored/unscored mix, as SFT data has
        out.append({"input_ids": ids, "attention_mask": torch.ones(length, dtype=torch.long), "labels": labels})
    return out


def cfg(**kw):
    base = dict(steps=8, lr=1e-2, warmup=2, batch_size=4, grad_accum=1, seed=1, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def test_loss_falls_and_only_lora_params_change():
    model = tiny_lora_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train(model, sequences(), sequences(8), cfg(steps=30, eval_every=10))
    assert result.stopped_reason == "completed" and len(result.losses) == 30
    assert sum(result.losses[-5:]) / 5 < sum(result.losses[:5]) / 5 - 0.2, result.losses  # noise is ~0.05
    assert [s for s, _ in result.eval_losses] == [10, 20, 30]
    assert result.eval_losses[-1][1] < result.eval_losses[0][1]
    assert result.tokens_per_second > 0
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".lora_" in n for n in changed)  # lora_B moves at least
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if ".lora_" not in n)  # bit-identical
    fig = plot_losses(result)
    assert len(fig.axes[0].lines) == 2


def test_lr_schedule_is_warmup_then_cosine():
    result = train(tiny_lora_llama(), sequences(), config=cfg(steps=6, lr=1e-3, warmup=2, min_lr_ratio=0.1))
    lr, floor = 1e-3, 0.1
    cosine = [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]  # steps 3..6: progress 0, 1/4, 2/4, 3/4
    expected = [lr * 1 / 2, lr * 2 / 2] + [lr * (floor + (1 - floor) * c) for c in cosine]
    assert result.lrs == pytest.approx(expected, rel=1e-12)
    assert expected[2] == pytest.approx(lr) and expected[-1] < expected[3]  # peak right after warmup, then decays


def test_grad_accumulation_matches_a_bigger_batch():
    data = [dict(ex, labels=ex["input_ids"].clone()) for ex in sequences()]  # equal scored tokens per sequence
    a, b = tiny_lora_llama(), tiny_lora_llama()
    ra = train(a, data, config=cfg(steps=1, warmup=1, batch_size=2, grad_accum=2))
    rb = train(b, data, config=cfg(steps=1, warmup=1, batch_size=4, grad_accum=1))
    assert ra.losses[0] == pytest.approx(rb.losses[0], abs=1e-6)
    assert ra.grad_norms[0] == pytest.approx(rb.grad_norms[0], rel=1e-5)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.allclose(pa, pb, atol=1e-6), n


def test_resume_reproduces_the_uninterrupted_loss_curve(tmp_path):
    full = train(tiny_lora_llama(), sequences(), config=cfg(steps=8, output_dir=str(tmp_path / "full"),
                                                             checkpoint_every=4))

    def stop_at_6(step, loss):
        if step == 6:
            raise KeyboardInterrupt

    part_dir = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        train(tiny_lora_llama(), sequences(), config=cfg(steps=8, output_dir=str(part_dir), checkpoint_every=4),
              on_step=stop_at_6)
    assert latest_checkpoint(part_dir).name == "checkpoint-000004"
    assert (part_dir / "interrupted" / "adapter_model.safetensors").is_file()  # Ctrl-C saved the adapter
    resumed = train(tiny_lora_llama(), sequences(), config=cfg(steps=8, output_dir=str(part_dir),
                                                                checkpoint_every=4), resume_from=True)
    assert len(resumed.losses) == 8
    diff = max(abs(x - y) for x, y in zip(full.losses, resumed.losses, strict=True))
    print(f"resume max |loss diff| = {diff:.3g}")
    assert diff <= 1e-5, (full.losses, resumed.losses)
    assert resumed.lrs == full.lrs


def test_resume_refuses_other_adapters(tmp_path):
    train(tiny_lora_llama(), sequences(), config=cfg(steps=2, output_dir=str(tmp_path), checkpoint_every=2))
    with pytest.raises(ValueError, match="inject the same adapters"):
        train(tiny_lora_llama(r=2), sequences(), config=cfg(steps=4, output_dir=str(tmp_path)), resume_from=True)


def test_keyboard_interrupt_saves_adapter_and_reraises(tmp_path):
    from lq_edu.adapters import load_adapter

    model = tiny_lora_llama()

    def ctrl_c(step, loss):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(model, sequences(), config=cfg(output_dir=str(tmp_path)), on_step=ctrl_c)
    fresh = tiny_llama()
    load_adapter(fresh, tmp_path / "interrupted")
    for (n, p), q in zip(model.named_parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q), n  # the saved adapter is the state after step 3


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
    model = tiny_lora_llama()
    calls = {"n": 0}

    def poison(module, args, output):  # forward 5 (step 5 with grad_accum=1) returns a NaN loss
        calls["n"] += 1
        if calls["n"] == 5:
            output["loss"] = output["loss"] * float("nan")  # still attached to the graph, as a real blow-up is
        return output

    model.register_forward_hook(poison)
    snapshot = {}
    with pytest.raises(NonFiniteLossError, match="at step 5") as err:
        train(model, sequences(), config=cfg(output_dir=str(tmp_path), checkpoint_every=2),
              on_step=lambda s, _: snapshot.update({n: p.detach().clone() for n, p in model.named_parameters()}))
    assert isinstance(err.value, RuntimeError) and "checkpoint-000004" in str(err.value)
    assert latest_checkpoint(tmp_path).name == "checkpoint-000004"
    assert not list(tmp_path.glob("*.tmp"))
    assert all(torch.equal(p, snapshot[n]) for n, p in model.named_parameters())  # the bad update was not applied
    state = json.loads((tmp_path / "checkpoint-000004" / "trainer_state.json").read_text())
    assert state["step"] == 4 and all(math.isfinite(x) for x in state["losses"])


def test_gradient_checkpointing_gives_the_same_step():
    plain, ckpt = tiny_lora_llama(), tiny_lora_llama()
    ra = train(plain, sequences(), config=cfg(steps=2))
    seen = []
    rb = train(ckpt, sequences(), config=cfg(steps=2, gradient_checkpointing=True),
               on_step=lambda s, _: seen.append(ckpt.is_activation_checkpointing))
    assert seen == [True, True]  # on while training ...
    assert not ckpt.is_activation_checkpointing  # ... and switched back off afterwards
    assert ra.losses == pytest.approx(rb.losses, abs=1e-6)
    for (n, pa), pb in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        assert torch.allclose(pa, pb, atol=1e-6), n


def test_bad_settings_say_what_to_do():
    with pytest.raises(ValueError, match="use one of auto, no, bf16"):
        train(tiny_lora_llama(), sequences(), config=cfg(mixed_precision="fp8"))
    with pytest.raises(ValueError, match="needs output_dir"):
        train(tiny_lora_llama(), sequences(), config=cfg(checkpoint_every=2))
    with pytest.raises(ValueError, match="lower batch_size"):
        train(tiny_lora_llama(), sequences(3), config=cfg(batch_size=4))


def _launcher() -> list[str] | None:
    bin_dir = Path(sys.executable).parent
    if (bin_dir / "torchrun").exists():  # accelerate 1.16's `launch --cpu --num_processes 2` starts one process
        return [str(bin_dir / "torchrun"), "--nproc_per_node", "2", "--master_port", str(29500 + os.getpid() % 1000)]
    return None


@pytest.mark.skipif(_launcher() is None, reason="`torchrun` is not installed next to python (comes with torch)")
def test_two_process_ddp_ranks_agree(tmp_path):
    from safetensors.torch import load_file

    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    proc = subprocess.run([*_launcher(), str(ROOT / "tests" / "_ddp_script.py"), str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    logs = [json.loads((tmp_path / f"losses_rank{r}.json").read_text()) for r in (0, 1)]
    assert logs[0]["world"] == logs[1]["world"] == 2
    assert logs[0]["losses"] == logs[1]["losses"]  # the reduced loss is the same number on both ranks
    losses = logs[0]["losses"]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses
    a, b = (load_file(str(tmp_path / f"rank{r}" / "adapter_model.safetensors")) for r in (0, 1))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(b[k].abs().max() > 0 for k in b if "lora_B" in k)  # training happened
    assert latest_checkpoint(tmp_path / "run").name == "checkpoint-000020"
    shutil.rmtree(tmp_path / "run")
