"""The peer: fine-tuning as a `run_glue.py` user does by default, with a plain `Trainer`.

Every batch is padded to max_seq_length (run_glue's default `pad_to_max_length=True`), no
length grouping, fp32, the Trainer's own optimizer and schedule. Same data (selftune's readers,
so the examples are identical), same model, hyper-parameters and seed as `selftune train`.
Writes one JSON object (dev metrics in percent, wall time, train examples/s, peak memory).
An interrupted run resumes from the Trainer's last checkpoint when started again with the
same --output-dir (`--save-steps`); the times of a resumed run cover its last part only and
say so (`"resumed": true`).

    python benchmarks/peer_run_glue.py --task rte --data-dir ../shared/data --seed 0 \
        --output-dir runs/peer/rte-seed0
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import transformers
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    Trainer,
    TrainingArguments,
    default_data_collator,
)
from transformers.trainer_utils import get_last_checkpoint

from selftune.data.loading import DataOptions, load_task_data
from selftune.metrics import trainer_metrics_fn
from selftune.models.loading import resolve_model_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--model", default="default")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--warmup-ratio", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--max-train-samples", type=int)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--append-to", help="also append the result as one JSON line to this "
                        "file (e.g. benchmarks/peer_full_scale.results.jsonl)")
    parser.add_argument("--save-steps", type=int, default=100,
                        help="Trainer checkpoint interval, so a killed run can resume; 0: no "
                        "checkpoints (what peer_timing.py times)")
    args = parser.parse_args()

    started = time.time()
    transformers.set_seed(args.seed)
    data = load_task_data(DataOptions(task=args.task, data_dir=args.data_dir,
                                      max_train_samples=args.max_train_samples))
    task = data.task
    path = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    labels = {} if task.is_regression else {
        "id2label": dict(enumerate(task.label_names)),
        "label2id": {n: i for i, n in enumerate(task.label_names)}}
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=task.num_labels, **labels)

    def encode(records):
        texts = [r["text_a"] for r in records]
        pairs = [r["text_b"] for r in records] if "text_b" in records[0] else None
        enc = tokenizer(texts, pairs, padding="max_length", truncation=True,
                        max_length=args.max_seq_length)
        return [{**{k: v[i] for k, v in enc.items()}, "labels": r["label"]}
                for i, r in enumerate(records)]

    train_set = encode(data.train)
    eval_set = encode(next(iter(data.eval_splits.values())))
    training_args = TrainingArguments(
        output_dir=str(Path(args.output_dir) / "trainer"), seed=args.seed,
        learning_rate=args.learning_rate, per_device_train_batch_size=args.batch_size,
        num_train_epochs=args.epochs, warmup_steps=args.warmup_ratio,
        weight_decay=args.weight_decay, eval_strategy="no",
        save_strategy="steps" if args.save_steps > 0 else "no", save_steps=max(args.save_steps, 1),
        save_total_limit=1, report_to=[], logging_steps=50)
    trainer = Trainer(model=model, args=training_args, train_dataset=train_set,
                      eval_dataset=eval_set, data_collator=default_data_collator,
                      compute_metrics=trainer_metrics_fn(task))
    last_checkpoint = get_last_checkpoint(training_args.output_dir) if Path(
        training_args.output_dir).is_dir() else None
    train_output = trainer.train(resume_from_checkpoint=last_checkpoint)
    final = trainer.evaluate()
    result = {
        "task": task.name, "seed": args.seed, "runner": "peer (plain Trainer, max-length padding)",
        "metrics": {k.removeprefix("eval_"): v for k, v in final.items()
                    if k.removeprefix("eval_") in task.metrics},
        "score": final["eval_score"],
        "wall_time_s": time.time() - started,
        "train_time_s": train_output.metrics["train_runtime"],
        "train_examples_per_s": len(train_set) * args.epochs / train_output.metrics[
            "train_runtime"],
        "resumed": last_checkpoint is not None,
        "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    if args.append_to:
        with open(args.append_to, "a") as f:
            f.write(json.dumps({**result, "finished_at": time.strftime("%Y-%m-%d")}) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
