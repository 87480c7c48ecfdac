"""How close a training step of the default model comes to this CPU's matmul peak.

1. Peak: the best of several timed `torch.matmul` calls on square matrices (fp32 and bf16).
2. Work: the FLOPs of one training step (forward + backward ≈ 3 × forward), counted from the
   model's shapes: per token and layer 2·(4·h² + 2·h·f) for the dense layers (h hidden, f the
   feed-forward width) plus 2·2·s·h for the attention scores and their weighted sum (s the
   sequence length); the classifier and embeddings are negligible.
3. Achieved: the median wall time of training steps at a fixed length (every input padded to
   --seq-len, so the count is exact), fp32 and bf16 autocast.

    python benchmarks/perf_peak.py --seq-len 128 --batch-size 32 --steps 10
    python benchmarks/perf_peak.py --seq-len 32,64,128,256,512   # scaling with length

With several lengths it also prints a Markdown table: time per step and per example, the
attention share of the FLOPs (the term quadratic in the length) and the fraction of peak.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import AutoModelForSequenceClassification

from selftune.models.loading import resolve_model_path


def matmul_peak(size: int, dtype: torch.dtype, repeats: int) -> float:
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    torch.matmul(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def step_flops(config, batch: int, seq: int) -> float:
    h, f, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    per_token_layer = 2 * (4 * h * h + 2 * h * f) + 2 * 2 * seq * h
    forward = batch * seq * layers * per_token_layer
    return 3 * forward


def step_times(model, batch: int, seq: int, steps: int, bf16: bool) -> list[float]:
    vocab = model.config.vocab_size
    inputs = {"input_ids": torch.randint(min(1000, vocab // 2), vocab, (batch, seq)),
              "attention_mask": torch.ones(batch, seq, dtype=torch.long),
              "labels": torch.randint(0, 2, (batch,))}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model.train()
    times = []
    for step in range(steps + 2):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step >= 2:  # the first steps allocate and tune kernels
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--seq-len", default="128",
                        help="One length or a comma-separated list, e.g. 32,64,128,256,512.")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    lengths = [int(v) for v in args.seq_len.split(",")]

    model = AutoModelForSequenceClassification.from_pretrained(
        resolve_model_path(args.model), num_labels=2)
    peaks = {"fp32": matmul_peak(args.matmul_size, torch.float32, args.repeats),
             "bf16": matmul_peak(args.matmul_size, torch.bfloat16, args.repeats)}
    results = []
    for seq in lengths:
        flops = step_flops(model.config, args.batch_size, seq)
        result = {"threads": torch.get_num_threads(), "seq_len": seq,
                  "batch_size": args.batch_size, "step_gflop": flops / 1e9,
                  "attention_flop_share": attention_share(model.config, seq)}
        for name, peak in peaks.items():
            median = statistics.median(step_times(model, args.batch_size, seq, args.steps,
                                                  bf16=name == "bf16"))
            result[name] = {"peak_gflops": peak / 1e9, "step_s": median,
                            "achieved_gflops": flops / median / 1e9,
                            "fraction_of_peak": flops / median / peak}
        results.append(result)
        print(json.dumps(result, indent=2), flush=True)
    if len(results) > 1:
        print("\n| length | attention share of FLOPs | fp32 step (s) | fp32 ms/example | "
              "fp32 % of peak | bf16 step (s) | bf16 % of peak |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for r in results:
            print(f"| {r['seq_len']} | {100 * r['attention_flop_share']:.1f}% | "
                  f"{r['fp32']['step_s']:.3f} | {1000 * r['fp32']['step_s'] / r['batch_size']:.1f} "
                  f"| {100 * r['fp32']['fraction_of_peak']:.0f}% | {r['bf16']['step_s']:.3f} | "
                  f"{100 * r['bf16']['fraction_of_peak']:.0f}% |")


def attention_share(config, seq: int) -> float:
    """Share of a layer's FLOPs in the two products whose cost grows with the length squared."""
    h, f = config.hidden_size, config.intermediate_size
    attention = 2 * 2 * seq * h
    return attention / (2 * (4 * h * h + 2 * h * f) + attention)


if __name__ == "__main__":
    main()
