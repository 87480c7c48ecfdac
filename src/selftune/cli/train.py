"""``selftune train``: fine-tune a model on one task and save it with its dev metrics."""

from __future__ import annotations

import argparse
import dataclasses

from selftune.cli.common import (
    GROUP_TITLES,
    Commands,
    HelpFormatter,
    add_common,
    add_config_option,
    print_result,
)
from selftune.config import TrainConfig, add_dataclass_arguments, dataclass_from_namespace
from selftune.ensemble import EnsembleConfig
from selftune.trainer_options import add_trainer_arguments

TRAIN_EPILOG = """\
examples:
  selftune train --task rte --data-dir ../shared/data
  selftune train --task sst2 --max-train-samples 10000 --learning-rate 1e-4 --seed 1
  selftune train --train-file train.csv --validation-file dev.csv \\
      --text-columns review --label-column stars --output-dir runs/reviews

The run directory gets the final model (a standard Hugging Face directory: load it with
AutoModelForSequenceClassification.from_pretrained or pipeline(); a --cls-norm layernorm or
--cls-source cls model loads with selftune predict/evaluate only), a model card README.md,
all_results.json and trainer_state.json (as run_glue.py), metrics.json (dev metrics in percent,
the per-epoch learning curve, wall time, examples/s, peak memory), run_config.json, train.log.
Every transformers.TrainingArguments option is accepted too (listed last).
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
    add_trainer_arguments(train, {f.name for f in dataclasses.fields(TrainConfig)})
    add_config_option(train, TrainConfig)
    add_common(train, quiet=True)
    train.set_defaults(_run=run_train)

    ensemble = commands.add_parser(
        "ensemble", help="Self-ensemble of a finished run from the snapshots it kept.",
        description="Average the last K snapshots a baseline run kept (selftune train "
                    "--save-snapshots K) into a standard model directory, score it on the "
                    "run's dev split (metrics.json) and print the metrics as JSON: the "
                    "self-ensemble (se) of a run without training it again.",
        formatter_class=HelpFormatter,
        epilog="example:\n  selftune train --task sst2 --save-snapshots 5 --snapshot-interval "
               "0.1ep --output-dir runs/sst2-base\n  selftune ensemble runs/sst2-base --k 5 "
               "--vote")
    add_dataclass_arguments(ensemble, EnsembleConfig, GROUP_TITLES)
    add_common(ensemble, quiet=True)
    ensemble.set_defaults(_run=run_ensemble)


def run_train(args: argparse.Namespace) -> int:
    from selftune.training import train

    result = train(dataclass_from_namespace(TrainConfig, args))
    print_result(args, {"task": result["task"], "eval_split": result["eval_split"],
                        **result["metrics"], "score": result["score"]})
    return 0


def run_ensemble(args: argparse.Namespace) -> int:
    from selftune.ensemble import build_ensemble

    result = build_ensemble(dataclass_from_namespace(EnsembleConfig, args))
    print_result(args, {"task": result["task"], "eval_split": result["eval_split"],
                        **result["metrics"], "score": result["score"],
                        **({"vote_score": result["vote_score"]} if "vote_score" in result
                           else {})})
    return 0
