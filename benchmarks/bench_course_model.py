"""How fast is one training step of the course model, against this machine's matmul speed?

    python benchmarks/bench_course_model.py

The lessons are sized around "8 sequences of 256 tokens, forward and backward,
in about half a second on 2 cores". Wall time depends on the machine, so the
figure that matters is printed as a ratio against a baseline measured in the
same run: the achieved FLOP/s of the step over the FLOP/s of a plain fp32
matmul of similar size.
"""

from __future__ import annotations

import torch
from timing import interleaved_medians

from lq_edu import load_course_model


def main() -> None:
    torch.manual_seed(0)
    model, _ = load_course_model()
    model.train()
    cfg = model.config
    batch, seq = 8, 256
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)

    a, b = torch.randn(2048, 1024), torch.randn(1024, 1024)
    seconds = interleaved_medians({"matmul": lambda: a @ b, "step": step}, repeats=7)
    matmul_s, step_s = seconds["matmul"], seconds["step"]
    matmul_flops = 2 * 2048 * 1024 * 1024 / matmul_s
    n_matmul_params = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n)
    attn_flops = 2 * 2 * batch * seq * seq * cfg.hidden_size * cfg.num_hidden_layers  # QK^T and AV, forward
    step_flops = 6 * n_matmul_params * batch * seq + 3 * attn_flops  # forward + backward (2x forward)

    print(f"threads: {torch.get_num_threads()}")
    print(f"baseline fp32 matmul 2048x1024x1024: {matmul_flops / 1e9:.1f} GFLOP/s")
    print(f"course model fwd+bwd, {batch}x{seq} tokens: {step_s:.3f} s, {step_flops / 1e9:.1f} GFLOP")
    print(f"step efficiency vs matmul baseline: {step_flops / step_s / matmul_flops:.2f}x")
    print(f"step time / (time the same FLOPs take as one big matmul): {step_s / (step_flops / matmul_flops):.2f}x")


if __name__ == "__main__":
    main()
