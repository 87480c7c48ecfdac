"""What padding costs the multi-task student, and what cutting it per task saves.

A mixed batch is padded to its longest example, usually an RTE pair, while the encoder runs
once per task on that task's rows (``MultiTaskModel.forward``); ``trim_padding`` cuts each
task's rows to their own longest example. This script takes the first --batches batches the
student would train on (the real sampler, shares ∝ |D|^0.75, MRPC and STS-B in both orders)
and times one forward and backward pass of each, with and without the cut, alternating which
goes first; it prints the padded share of the token positions and the median step times.

    python benchmarks/multitask_padding.py --data-dir ../shared/data --batches 30 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DataCollatorWithPadding

import selftune.multitask.model as mt_model
from selftune.data.loading import DataOptions, load_task_data
from selftune.data.tasks import get_task
from selftune.models.loading import load_tokenizer, resolve_model_path
from selftune.multitask.data import UNORDERED_TASKS, build_train_set, with_swapped_pairs
from selftune.multitask.model import build_multitask_model
from selftune.multitask.sampling import MultiTaskBatchSampler, task_shares

TRIM_PADDING = mt_model.trim_padding  # patched out for the "padded" measurements


def no_trim(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="rte,mrpc,stsb,cola")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tasks = [get_task(name) for name in args.tasks.split(",")]
    model_path = resolve_model_path(None)
    tokenizer = load_tokenizer(model_path)
    records = {}
    for task in tasks:
        rows = load_task_data(DataOptions(task=task.name, data_dir=args.data_dir)).train
        records[task.name] = with_swapped_pairs(rows) if task.name in UNORDERED_TASKS else rows
    model = build_multitask_model(model_path, tasks)
    data = build_train_set(tasks, records, tokenizer, 128, None, model.max_labels)
    sampler = MultiTaskBatchSampler(data.task_indices, args.batch_size,
                                    task_shares(data.sizes, "power", 0.75), seed=0)
    collate = DataCollatorWithPadding(tokenizer)
    columns = ["input_ids", "token_type_ids", "attention_mask", "task_ids"]
    batches = []
    for indices in sampler:
        batches.append(collate([{c: data.train[i][c] for c in columns} for i in indices]))
        if len(batches) == args.batches:
            break

    model.train()
    times: dict[str, list[float]] = {"padded": [], "trimmed": []}
    positions = {"padded": 0, "trimmed": 0}
    real_tokens = 0
    for number, batch in enumerate(batches):
        inputs = {k: v for k, v in batch.items() if k != "task_ids"}
        real_tokens += int(batch["attention_mask"].sum())
        order = ("padded", "trimmed") if number % 2 == 0 else ("trimmed", "padded")
        for mode in order:
            mt_model.trim_padding = no_trim if mode == "padded" else TRIM_PADDING
            for index in range(len(tasks)):
                rows = (batch["task_ids"] == index).nonzero(as_tuple=True)[0]
                if rows.numel():
                    kept = mt_model.trim_padding({"attention_mask": batch["attention_mask"][rows]})
                    positions[mode] += kept["attention_mask"].numel()
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            logits = model(task_ids=batch["task_ids"], **inputs).logits
            logits.float().pow(2).mean().backward()  # the loss does not change the cost
            times[mode].append(time.perf_counter() - start)
    mt_model.trim_padding = TRIM_PADDING

    print(f"tasks {args.tasks}; first {len(batches)} batches of {args.batch_size} of the "
          f"student's epoch 0 (seed 0); {args.threads} thread(s); one forward + backward each\n")
    print("| encoder input | padded share of positions | median step (s) | mean step (s) |")
    print("|---|---:|---:|---:|")
    for mode in ("padded", "trimmed"):
        share = 1 - real_tokens / positions[mode]
        print(f"| {mode} | {share:.1%} | {statistics.median(times[mode]):.3f} "
              f"| {statistics.fmean(times[mode]):.3f} |")
    ratio = statistics.median(times["trimmed"]) / statistics.median(times["padded"])
    print(f"\ntrimmed / padded median step time: {ratio:.3f}×")


if __name__ == "__main__":
    main()
