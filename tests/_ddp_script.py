"""Run by tests/test_trainer.py under ``accelerate launch --num_processes 2 --cpu`` (or torchrun).

    accelerate launch --num_processes 2 --cpu tests/_ddp_script.py OUT_DIR

Every rank trains the same tiny LoRA Llama on its shard of the data, then writes its adapter to
``OUT_DIR/rank{r}`` and its loss curve to ``OUT_DIR/losses_rank{r}.json``. The test compares them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, whatever the launcher's cwd

from lq_edu.adapters import inject_lora, save_adapter  # noqa: E402
from lq_edu.trainer import TrainConfig, train  # noqa: E402


def main(out: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # the same base weights on every rank
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(cfg)
    inject_lora(model, r=8, alpha=16, verbose=False)
    data = []
    for i in range(32):  # counting sequences mod 64: learnable from the previous token
        ids = (torch.arange(16) + i) % 64
        data.append({"input_ids": ids, "attention_mask": torch.ones(16, dtype=torch.long), "labels": ids.clone()})
    config = TrainConfig(steps=20, lr=1e-2, warmup=2, batch_size=2, grad_accum=2, seed=3, progress=False,
                         output_dir=str(out / "run"), checkpoint_every=10)
    result = train(model, data, config=config)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    save_adapter(model, out / f"rank{rank}")
    (out / f"losses_rank{rank}.json").write_text(json.dumps({"losses": result.losses, "world": world}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
