"""The ``bam`` and ``teacher-predictions`` commands (BAM!, Clark et al. 2019)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from selftune.config import add_dataclass_arguments, dataclass_from_namespace, int_at_least

# Single-task options that mean nothing to a multi-task run.
NOT_FOR_MULTITASK = ("task", "train_file", "validation_file", "text_columns", "label_column",
                     "id_column", "label_type", "eval_split", "teacher_predictions",
                     "se_pool", "se_combine", "task_list")

BAM_EPILOG = """\
examples:
  selftune bam --tasks rte,mrpc,stsb,cola --data-dir ../shared/data --output-dir runs/bam
  selftune bam --tasks rte,mrpc --teachers none --output-dir runs/multi     # plain "Multi"
  selftune bam --tasks-file tasks.yaml --output-dir runs/mine   # registry tasks and your files
  selftune bam --tasks rte,mrpc --teachers rte=runs/rte,mrpc=runs/mrpc --finetune-after
  selftune bam --tasks rte --teachers-only --teachers-root runs/teachers &  # teachers
  selftune bam --tasks mrpc --teachers-only --teachers-root runs/teachers &  # in parallel

Stages: single-task teachers (teachers/<task>, reused when finished), their predictions on the
training sets (cached beside each teacher), the multi-task student (student/, with each task as a
standard model directory in student/tasks/<task>), optionally single-task fine-tuning
(finetuned/<task>). Run the same command again after an interruption: finished stages are kept,
the interrupted one resumes from its checkpoint. --cls-norm puts one normalizer on the shared
encoder's [CLS] (statistics over all tasks' training examples; the teachers get their own).
--strategy sda/sdv/ema makes the student also distill from its own averaged past (Xu et al.
2020): loss = teacher-annealing loss + λ·MSE(student, averaged student); the teachers stay plain
single-task runs. The averaged student is exported beside it (student/teacher/tasks/<task>).
--group-by-length applies to the single-task stages (teachers, --finetune-after); the student's
batches come from the task sampler.
"""


def add_bam_commands(commands, formatter, add_common: Callable, groups: dict) -> None:
    from selftune.bam import BamConfig

    bam = commands.add_parser(
        "bam", help="BAM!: single-task teachers distilled into one multi-task student.",
        description="Born-Again Multi-task networks (Clark et al. 2019): train single-task "
                    "teachers, distill them into one multi-task student with teacher annealing "
                    "(target = λ·gold + (1−λ)·teacher, λ rising 0→1), layer-wise learning-rate "
                    "decay and task sampling ∝ |D|^0.75; evaluate every task.",
        formatter_class=formatter, epilog=BAM_EPILOG)
    add_dataclass_arguments(bam, BamConfig, {**groups, "multi-task": "multi-task student",
                                             "BAM! recipe": "BAM! recipe (teachers, stages)"},
                            exclude=NOT_FOR_MULTITASK)
    from selftune.cli import add_config_option

    add_config_option(bam, BamConfig)
    add_common(bam)

    predictions = commands.add_parser(
        "teacher-predictions",
        help="A teacher's predictions over its task's training set, keyed by example id.",
        description="Run a single-task model over its task's training set in eval mode and "
                    "write its logits per example id (the cached teacher of a BAM! student).",
        formatter_class=formatter)
    predictions.add_argument("model_dir", help="The teacher: a model directory.")
    predictions.add_argument("--task", required=True, help="The teacher's task.")
    predictions.add_argument("--output-file", dest="output_file", required=True,
                             help="Where to write the predictions (.jsonl).")
    predictions.add_argument("--data-dir", dest="data_dir",
                             help="Local data folder (default: $SELFTUNE_DATA, else the Hub).")
    predictions.add_argument("--max-train-samples", dest="max_train_samples",
                             type=int_at_least(1),
                             help="The same fixed subset the student trains on.")
    predictions.add_argument("--both-orders", action="store_true",
                             help="Also predict every pair with its sentences swapped (for a "
                                  "student trained with --double-unordered on MRPC/STS-B).")
    predictions.add_argument("--max-seq-length", type=int_at_least(8), default=128,
                             help="Truncate inputs to this many tokens (default: 128).")
    predictions.add_argument("--batch-size", type=int_at_least(1), default=128,
                             help="Inference batch size (default: 128).")
    predictions.add_argument("--trust-remote-code", action="store_true",
                             help="Allow the teacher's own modelling code from its directory "
                                  "(off by default, for safety).")
    add_common(predictions)


def _run_bam(args: argparse.Namespace) -> int:
    from selftune.bam import BamConfig, run_bam

    summary = run_bam(dataclass_from_namespace(BamConfig, args))
    print(json.dumps(summary, indent=2))
    return 0


def _run_teacher_predictions(args: argparse.Namespace) -> int:
    from selftune.bam import compute_teacher_predictions
    from selftune.data.loading import DataOptions
    from selftune.data.tasks import get_task
    from selftune.errors import SelftuneError

    if Path(args.output_file).suffix != ".jsonl":
        raise SelftuneError(f"--output-file {args.output_file}: teacher predictions are "
                            "written as JSON Lines; give a file name ending in .jsonl")
    task = get_task(args.task)
    opts = DataOptions(task=task.name, data_dir=args.data_dir,
                       max_train_samples=args.max_train_samples)
    out = compute_teacher_predictions(Path(args.model_dir), task, opts, Path(args.output_file),
                                      args.both_orders, args.max_seq_length, args.batch_size,
                                      args.trust_remote_code)
    print(f"wrote teacher predictions to {out}")
    return 0


BAM_HANDLERS = {"bam": _run_bam, "teacher-predictions": _run_teacher_predictions}
