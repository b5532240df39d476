"""GPTQ calibration of the course model: seconds, against a forward pass and RTN surgery in the same run.

    python benchmarks/bench_calibration.py [--samples 128] [--seq-len 256] [--fmt nf4] [--threads 2] [--ppl]

Setting: the course model (6 Llama blocks, hidden 256) in fp32 on CPU, 128 calibration sequences of 256 tokens
from the train split, GPTQ with the library defaults (block 64, true-sequential, no act-order). Target: under
120 s on 2 CPU cores. The baselines are measured in the same run, because this machine is shared and noisy:

- one forward pass of the float model over the calibration data (batch 8): what reading the data costs;
- RTN surgery (``quantize_model``): what quantizing the weights without any data costs.

``--ppl`` also prints held-out perplexity (full validation split) of fp32, RTN and GPTQ, and the share of RTN's gap
to fp32 that GPTQ closes.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from lq_edu.calibration import calibrate_model, calibration_data
from lq_edu.corpus import load_corpus
from lq_edu.evaluate import perplexity
from lq_edu.models import load_course_model
from lq_edu.surgery import quantize_model

TARGET_S = 120.0


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--fmt", default="nf4")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--act-order", action="store_true")
    parser.add_argument("--ppl", action="store_true", help="also measure held-out perplexity (slower)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    base, tokenizer = load_course_model()
    data_s = seconds(lambda: calibration_data(tokenizer, 2, 16, seed=0))  # tokenizes the train split once (cached)
    data = calibration_data(tokenizer, args.samples, args.seq_len, seed=0, model=base)

    def forward_pass() -> None:
        with torch.no_grad():
            for batch in data.split(8):
                base(input_ids=batch, use_cache=False)

    forward_s = seconds(forward_pass)
    rtn = copy.deepcopy(base)
    rtn_s = seconds(lambda: quantize_model(rtn, fmt=args.fmt))
    calibrated = copy.deepcopy(base)
    report = calibrate_model(calibrated, data, fmt=args.fmt, act_order=args.act_order, progress=False)
    gptq_s = report.seconds

    print(f"course model, {args.samples} x {args.seq_len} calibration tokens, {args.fmt}, {args.threads} thread(s)")
    print(f"  tokenize the train split (once):    {data_s:7.2f} s")
    print(f"  forward pass over the data:         {forward_s:7.2f} s")
    print(f"  RTN surgery (quantize_model):       {rtn_s:7.2f} s")
    print(f"  GPTQ calibrate_model:               {gptq_s:7.2f} s")
    print(f"  GPTQ / forward pass:                {gptq_s / forward_s:7.2f}x")
    print(f"  GPTQ / RTN surgery:                 {gptq_s / rtn_s:7.2f}x")
    verdict = "OK" if gptq_s < TARGET_S else "OVER"
    print(f"  target: under {TARGET_S:.0f} s on 2 cores:      {verdict} ({gptq_s / TARGET_S:.0%} of it)")
    print(f"  {report}")

    if args.ppl:
        validation = list(load_corpus("validation")["text"])
        fp32, r, g = (perplexity(m, tokenizer, validation, progress=False) for m in (base, rtn, calibrated))
        print(f"  held-out perplexity: fp32 {fp32:.3f}, RTN {r:.3f}, GPTQ {g:.3f}; GPTQ closes {(r - g) / (r - fp32):.0%}")


if __name__ == "__main__":
    main()
