"""``selftune bam`` and ``teacher-predictions`` (BAM!, Clark et al. 2019)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from selftune.cli.common import (
    GROUP_TITLES,
    Commands,
    HelpFormatter,
    add_common,
    add_config_option,
    print_result,
)
from selftune.cli.options import TeacherPredictionsOptions
from selftune.config import (
    NOT_FOR_MULTITASK,
    BamConfig,
    add_dataclass_arguments,
    dataclass_from_namespace,
)
from selftune.errors import SelftuneError
from selftune.trainer_options import add_trainer_arguments

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


def register(commands: Commands) -> None:
    bam = commands.add_parser(
        "bam", help="BAM!: single-task teachers distilled into one multi-task student.",
        description="Born-Again Multi-task networks (Clark et al. 2019): train single-task "
                    "teachers, distill them into one multi-task student with teacher annealing "
                    "(target = λ·gold + (1−λ)·teacher, λ rising 0→1), layer-wise learning-rate "
                    "decay and task sampling ∝ |D|^0.75; evaluate every task.",
        formatter_class=HelpFormatter, epilog=BAM_EPILOG)
    add_dataclass_arguments(bam, BamConfig, {**GROUP_TITLES, "multi-task": "multi-task student",
                                             "BAM! recipe": "BAM! recipe (teachers, stages)"},
                            exclude=NOT_FOR_MULTITASK)
    add_trainer_arguments(bam, {f.name for f in dataclasses.fields(BamConfig)})
    add_config_option(bam, BamConfig)
    add_common(bam, quiet=True)
    bam.set_defaults(_run=run_bam)

    predictions = commands.add_parser(
        "teacher-predictions",
        help="A teacher's predictions over its task's training set, keyed by example id.",
        description="Run a single-task model over its task's training set in eval mode and "
                    "write its logits per example id (the cached teacher of a BAM! student).",
        formatter_class=HelpFormatter)
    predictions.add_argument("model_dir", help="The teacher: a model directory.")
    add_dataclass_arguments(predictions, TeacherPredictionsOptions)
    add_common(predictions)
    predictions.set_defaults(_run=run_teacher_predictions)


def run_bam(args: argparse.Namespace) -> int:
    from selftune.recipes.bam import run_bam as run_recipe

    print_result(args, run_recipe(dataclass_from_namespace(BamConfig, args)), indent=2)
    return 0


def run_teacher_predictions(args: argparse.Namespace) -> int:
    from selftune.data.loading import DataOptions
    from selftune.data.tasks import get_task
    from selftune.recipes.bam import compute_teacher_predictions

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
