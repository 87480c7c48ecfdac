"""``selftune train``: fine-tune a model on one task and save it with its dev metrics."""

from __future__ import annotations

import argparse

from selftune.cli.common import (
    GROUP_TITLES,
    Commands,
    HelpFormatter,
    add_common,
    add_config_option,
    print_result,
)
from selftune.config import TrainConfig, add_dataclass_arguments, dataclass_from_namespace

TRAIN_EPILOG = """\
examples:
  selftune train --task rte --data-dir ../shared/data
  selftune train --task sst2 --max-train-samples 10000 --learning-rate 1e-4 --seed 1
  selftune train --train-file train.csv --validation-file dev.csv \\
      --text-columns review --label-column stars --output-dir runs/reviews

The run directory gets the final model (a standard Hugging Face directory: load it with
AutoModelForSequenceClassification.from_pretrained), metrics.json (dev metrics in percent, the
per-epoch learning curve, wall time, examples/s, peak memory), run_config.json and train.log.
Interrupted? Run the same command again: it resumes from the last checkpoint.
stdout carries only the final JSON line (nothing with --quiet); logs and progress go to stderr.
"""


def register(commands: Commands) -> None:
    train = commands.add_parser(
        "train", help="Fine-tune a model on a task and save it with its dev metrics.",
        description="Fine-tune a pretrained encoder on one task with transformers.Trainer, "
                    "evaluate on the dev split after each epoch, and save the final model.",
        formatter_class=HelpFormatter, epilog=TRAIN_EPILOG)
    add_dataclass_arguments(train, TrainConfig, GROUP_TITLES)
    add_config_option(train, TrainConfig)
    add_common(train, quiet=True)
    train.set_defaults(_run=run_train)


def run_train(args: argparse.Namespace) -> int:
    from selftune.training import train

    result = train(dataclass_from_namespace(TrainConfig, args))
    print_result(args, {"task": result["task"], "eval_split": result["eval_split"],
                        **result["metrics"], "score": result["score"]})
    return 0
