"""How many tokens a training epoch computes on, by batching: the cause of the length lever.

For each task, the tokens of the examples themselves against the tokens of the padded batches
(batch 32) with random batches and dynamic padding (selftune --no-packing), with length-grouped
batches (--group-by-length), with every batch padded to 128 (run_glue.py's default), and with the
same random batches packed into rows of up to 128 tokens (selftune's default, --packing: the
rows times their length). Exact counts from the default model's tokenizer; no training.

    python benchmarks/padding_tokens.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from selftune.data.features import tokenize_records
from selftune.data.length_grouping import EpochSeededLengthGroupedSampler
from selftune.data.loading import DataOptions, load_task_data
from selftune.data.packing import token_counts
from selftune.models.loading import load_tokenizer, resolve_model_path


def padded(order: np.ndarray, lengths: np.ndarray, batch: int, pad_to: int | None = None) -> int:
    total = 0
    for start in range(0, len(order), batch):
        rows = lengths[order[start:start + batch]]
        total += len(rows) * (pad_to or int(rows.max()))
    return total


def packed(order: np.ndarray, lengths: np.ndarray, batch: int, capacity: int) -> int:
    return sum(token_counts(lengths[order[start:start + batch]].tolist(), capacity)[2]
               for start in range(0, len(order), batch))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--tasks", default="rte,mrpc,stsb,cola,sst2")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-seq-length", type=int, default=128)
    args = parser.parse_args()
    tokenizer = load_tokenizer(resolve_model_path("default"), False)
    print("| task | examples | mean length | tokens | random batches | length-grouped | "
          "padded to 128 | packed random batches |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for task in args.tasks.split(","):
        subset = 10_000 if task == "sst2" else None  # as the grids
        data = load_task_data(DataOptions(task=task, data_dir=args.data_dir,
                                          max_train_samples=subset))
        encoded = tokenize_records(data.train, tokenizer, args.max_seq_length)
        lengths = np.array([len(ids) for ids in encoded["input_ids"]])
        real = int(lengths.sum())
        shuffled = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0))
        grouped = np.array(list(EpochSeededLengthGroupedSampler(lengths.tolist(),
                                                                args.batch_size, seed=0)))
        counts = [padded(shuffled.numpy(), lengths, args.batch_size),
                  padded(grouped, lengths, args.batch_size),
                  padded(shuffled.numpy(), lengths, args.batch_size, args.max_seq_length),
                  packed(shuffled.numpy(), lengths, args.batch_size, args.max_seq_length)]
        print(f"| {task} | {len(lengths)} | {lengths.mean():.1f} | {real} | "
              + " | ".join(f"{c} ({c / real:.2f}×)" for c in counts) + " |", flush=True)


if __name__ == "__main__":
    main()
