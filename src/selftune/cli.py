"""The ``selftune`` command line: train, evaluate, predict, export, diagnose-cls, tasks (and
bench, report, bam, teacher-predictions from their own modules).

Every user mistake ends in a one-line ``selftune: error: ...`` and exit status 2, never a
traceback (``--debug`` shows it). An interrupted ``train`` resumes when the same command is run
again.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import sys
import tempfile
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path

from selftune import __version__
from selftune.config import (
    TrainConfig,
    add_dataclass_arguments,
    dataclass_from_namespace,
    int_at_least,
)
from selftune.data.loading import parse_text_columns
from selftune.errors import SelftuneError
from selftune.trainer_options import add_trainer_arguments

GROUP_TITLES = {
    "data": "data (a registry task, a local folder, the Hub, or your own files)",
    "model": "model",
    "training": "training (defaults follow run_glue.py / the BERT recipe)",
    "self-distillation": "self-ensemble and self-distillation (--strategy se, sda, sdv, ema; "
                         "Xu et al. 2020)",
    "output": "output and resuming",
}

MODEL_DIR_HELP = ("A model directory written by 'selftune train', or any sequence classifier "
                  "(a local directory or a Hub id).")

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
Interrupted? Run the same command again: it resumes from the last checkpoint.
"""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=36, width=100)


def add_config_option(parser: argparse.ArgumentParser, config_class: type) -> None:
    """``--config FILE``: option values from a file, overridden by flags on the command line."""
    parser.add_argument("--config", metavar="FILE",
                        help="Read options from a JSON or YAML file (keys are option names with "
                             "underscores, as in run_config.json); flags given on the command "
                             "line win over the file.")
    parser.set_defaults(_config_parser=parser, _config_class=config_class)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true",
                        help="Show the full traceback when something goes wrong.")


def _add_eval_data_options(parser: argparse.ArgumentParser, labelled: bool) -> None:
    group = parser.add_argument_group("data")
    if labelled:
        group.add_argument("--task", help="Registry task whose dev split to evaluate on.")
        group.add_argument("--data-dir", "--data_dir", dest="data_dir",
                           help="Local data folder like ../shared/data (default: "
                                "$SELFTUNE_DATA, else the Hub).")
        group.add_argument("--eval-split", dest="eval_split",
                           help="Split to evaluate (default: the task's dev split).")
        group.add_argument("--validation-file", "--validation_file", dest="validation_file",
                           help="Evaluate on your own labelled .csv/.tsv/.jsonl file instead.")
        group.add_argument("--label-column", dest="label_column", default="label",
                           help="Label column of --validation-file (default: label).")
        group.add_argument("--max-eval-samples", dest="max_eval_samples", type=int_at_least(1),
                           help="Evaluate on a fixed random subset of this size.")
    group.add_argument("--text-columns", dest="text_columns", default="text",
                       help="Text column(s) of your file, comma-separated for pairs "
                            "(default: text).")
    group.add_argument("--id-column", dest="id_column",
                       help="Column of example ids (default: the row number).")
    run = parser.add_argument_group("inference")
    run.add_argument("--max-seq-length", dest="max_seq_length", type=int_at_least(8), default=128,
                     help="Truncate inputs to this many tokens (default: 128).")
    run.add_argument("--batch-size", dest="batch_size", type=int_at_least(1), default=128,
                     help="Inference batch size (default: 128).")
    run.add_argument("--trust-remote-code", action="store_true",
                     help="Allow model code from the Hub to run.")
    run.add_argument("--packing", action=argparse.BooleanOptionalAction, default=True,
                     help="Pack each batch's examples into as few rows as fit, each attending "
                          "only to itself (BERT, RoBERTa, ELECTRA; other models are padded). "
                          "--no-packing: padded batches.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selftune",
        description="Fine-tune pretrained Transformer encoders (BERT and relatives) more "
                    "accurately and more stably: self-ensemble, self-distillation, BAM!, "
                    "[CLS] normalization.",
        formatter_class=HelpFormatter,
        epilog="Run 'selftune COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"selftune {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = commands.add_parser(
        "train", help="Fine-tune a model on a task and save it with its dev metrics.",
        description="Fine-tune a pretrained encoder on one task with transformers.Trainer, "
                    "evaluate on the dev split after each epoch, and save the final model.",
        formatter_class=HelpFormatter, epilog=TRAIN_EPILOG)
    add_dataclass_arguments(train, TrainConfig, GROUP_TITLES)
    add_trainer_arguments(train, {f.name for f in dataclasses.fields(TrainConfig)})
    add_config_option(train, TrainConfig)
    _add_common(train)

    evaluate = commands.add_parser(
        "evaluate", help="Dev metrics of a saved model on a task (or a labelled file).",
        description="Evaluate a model directory (as written by 'selftune train') on a task's "
                    "dev split or on your own labelled file; prints the metrics as JSON.",
        formatter_class=HelpFormatter,
        epilog="example:\n  selftune evaluate runs/rte/baseline-seed42 --task rte "
               "--data-dir ../shared/data")
    evaluate.add_argument("model_dir", help=MODEL_DIR_HELP)
    _add_eval_data_options(evaluate, labelled=True)
    evaluate.add_argument("--output-file", dest="output_file",
                          help="Also write the metrics to this JSON file.")
    _add_common(evaluate)

    predict = commands.add_parser(
        "predict", help="Predict labels and probabilities for a csv/tsv/jsonl file.",
        description="Run a saved model over every row of a file and write one prediction per "
                    "row: the label and each class probability (classification) or the "
                    "predicted score (regression).",
        formatter_class=HelpFormatter,
        epilog="example:\n  selftune predict runs/sst2/baseline-seed42 --input-file "
               "reviews.csv --text-columns review --output-file predictions.csv")
    predict.add_argument("model_dir", help=MODEL_DIR_HELP)
    predict.add_argument("--input-file", dest="input_file", required=True,
                         help="Texts to classify: .csv, .tsv (tab-separated) or .jsonl.")
    predict.add_argument("--output-file", dest="output_file", default="predictions.jsonl",
                         help="Where to write predictions; .jsonl, .csv or .tsv "
                              "(default: predictions.jsonl).")
    _add_eval_data_options(predict, labelled=False)
    _add_common(predict)

    export = commands.add_parser(
        "export", help="Write a plain Hugging Face copy of a model (folding a [CLS] normalizer).",
        description="Copy a model directory so that a plain AutoModelForSequenceClassification "
                    "loads it with the same predictions: a fixed [CLS] normalizer (center, "
                    "standardize, batchnorm, isobn on the pooler output) is folded exactly into "
                    "the classifier's weights. layernorm, or a normalizer on the last-layer "
                    "[CLS] (--cls-source cls), cannot be folded: such models load with selftune.",
        formatter_class=HelpFormatter)
    export.add_argument("model_dir", help=MODEL_DIR_HELP)
    export.add_argument("out_dir", help="Where to write the plain model directory.")
    _add_common(export)

    diagnose = commands.add_parser(
        "diagnose-cls", help="How the pre-trained [CLS] is distributed, and gradient norms at "
                             "[CLS] with each normalization.",
        description="The analysis that motivates [CLS] normalization (Zhou et al. 2019, a "
                    "reconstruction: the paper was withdrawn): per-dimension mean and std of "
                    "the pre-trained [CLS] hidden state and pooler output over a task's training "
                    "data, the share of the squared norm in the top-k dimensions, the offset "
                    "from zero, and the gradient norm at [CLS] during the first fine-tuning "
                    "steps with each --cls-norm. Writes diagnostics.md/.json and two PNG plots.",
        formatter_class=HelpFormatter,
        epilog="example:\n  selftune diagnose-cls --task rte --data-dir ../shared/data")
    diagnose.add_argument("--task", help="Registry task whose training data to analyse.")
    diagnose.add_argument("--data-dir", "--data_dir", dest="data_dir",
                          help="Local data folder (default: $SELFTUNE_DATA, else the Hub).")
    diagnose.add_argument("--train-file", dest="train_file",
                          help="Or your own labelled file (needs --validation-file too).")
    diagnose.add_argument("--validation-file", dest="validation_file",
                          help="Your own dev file (only read to validate the labels).")
    diagnose.add_argument("--text-columns", dest="text_columns", default="text",
                          help="Text column(s) of your files (default: text).")
    diagnose.add_argument("--label-column", dest="label_column", default="label",
                          help="Label column of your files (default: label).")
    diagnose.add_argument("--model", default="default",
                          help="Pretrained model (default: the packaged all-MiniLM-L6-v2).")
    diagnose.add_argument("--max-examples", type=int_at_least(2), default=2000,
                          help="Analyse a fixed subset of this many training examples "
                               "(default: 2000).")
    diagnose.add_argument("--steps", type=int_at_least(1), default=20,
                          help="Fine-tuning steps per normalization for the gradient norms "
                               "(default: 20).")
    diagnose.add_argument("--batch-size", type=int_at_least(1), default=32,
                          help="Batch size (default: 32).")
    diagnose.add_argument("--learning-rate", type=float, default=5e-5,
                          help="AdamW learning rate of the gradient runs (default: 5e-5).")
    diagnose.add_argument("--max-seq-length", type=int_at_least(8), default=128,
                          help="Truncate inputs to this many tokens (default: 128).")
    diagnose.add_argument("--norms", default=",".join(
                              ("none", "center", "standardize", "batchnorm", "layernorm",
                               "isobn")),
                          help="Normalizations to compare, comma-separated (default: all).")
    diagnose.add_argument("--sources",
                          help="Representations: cls (last-layer [CLS] hidden state), pooler "
                               "(default: both; cls alone for a model without a pooler).")
    diagnose.add_argument("--seed", type=int_at_least(0), default=0, help="Seed (default: 0).")
    diagnose.add_argument("--out-dir", dest="out_dir",
                          help="Where to write (default: diagnostics/<task>).")
    _add_common(diagnose)

    from selftune.ensemble import EnsembleConfig

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
    _add_common(ensemble)

    tasks = commands.add_parser("tasks", help="List the tasks of the registry.",
                                formatter_class=HelpFormatter)
    _add_common(tasks)

    from selftune.bam_cli import add_bam_commands
    from selftune.bench_cli import add_bench_commands

    add_bam_commands(commands, HelpFormatter, _add_common, GROUP_TITLES)
    add_bench_commands(commands, HelpFormatter, _add_common)
    return parser


def _run_train(args: argparse.Namespace) -> int:
    from selftune.training import train

    result = train(dataclass_from_namespace(TrainConfig, args))
    print(json.dumps({"task": result["task"], "eval_split": result["eval_split"],
                      **result["metrics"], "score": result["score"]}))
    return 0


def _run_ensemble(args: argparse.Namespace) -> int:
    from selftune.ensemble import EnsembleConfig, build_ensemble

    result = build_ensemble(dataclass_from_namespace(EnsembleConfig, args))
    print(json.dumps({"task": result["task"], "eval_split": result["eval_split"],
                      **result["metrics"], "score": result["score"],
                      **({"vote_score": result["vote_score"]} if "vote_score" in result
                         else {})}))
    return 0


def _run_evaluate(args: argparse.Namespace) -> int:
    from selftune.data.loading import DataOptions
    from selftune.data.tasks import TASKS
    from selftune.evaluation import check_output_file, evaluate_model

    if not args.task and not args.validation_file:
        raise SelftuneError("give --task NAME or --validation-file FILE to evaluate on")
    if args.task in TASKS and args.validation_file:
        raise SelftuneError(f"give --task {args.task} (its dev split) or --validation-file (your "
                            "own labelled file), not both")
    if args.output_file:
        check_output_file(Path(args.output_file))
    opts = DataOptions(task=args.task, data_dir=args.data_dir,
                       validation_file=args.validation_file,
                       text_columns=parse_text_columns(args.text_columns),
                       label_column=args.label_column,
                       id_column=args.id_column, max_eval_samples=args.max_eval_samples)
    result = evaluate_model(args.model_dir, opts, args.eval_split, args.max_seq_length,
                            args.batch_size, args.trust_remote_code, packing=args.packing)
    text = json.dumps(result, indent=2)
    if args.output_file:
        from selftune.outputs import write_json_atomic

        write_json_atomic(Path(args.output_file), result)
    print(text)
    return 0


def _run_predict(args: argparse.Namespace) -> int:
    from selftune.evaluation import predict_file

    count = predict_file(args.model_dir, args.input_file, args.output_file,
                         parse_text_columns(args.text_columns), args.id_column,
                         args.max_seq_length,
                         args.batch_size, args.trust_remote_code, packing=args.packing)
    print(f"wrote {count} predictions to {args.output_file}")
    return 0


def _run_export(args: argparse.Namespace) -> int:
    from selftune.models.heads import fold_cls_norm
    from selftune.models.loading import load_finetuned, load_tokenizer

    out = Path(args.out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SelftuneError(f"{out} exists and is not an empty folder; choose a new folder")
    model = fold_cls_norm(load_finetuned(args.model_dir))
    tokenizer = load_tokenizer(args.model_dir)
    # Written beside, then renamed: never a half-written model under the final name, and a
    # second export to the same folder fails at the rename instead of mixing two models.
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, out)
        except OSError as err:
            raise SelftuneError(f"{out} was created meanwhile ({err.strerror}); choose a new "
                                "folder") from None
        Path(tmp).mkdir()  # for TemporaryDirectory's own cleanup
    print(f"wrote a plain model to {out}")
    return 0


def _run_diagnose(args: argparse.Namespace) -> int:
    import transformers

    from selftune.data.features import tokenize_records
    from selftune.data.loading import DataOptions, load_task_data
    from selftune.diagnostics import check_model, check_options, diagnose
    from selftune.extras import require_matplotlib
    from selftune.models.loading import (
        check_sequence_length,
        load_for_training,
        load_tokenizer,
        resolve_model_path,
    )

    require_matplotlib("selftune diagnose-cls")  # before minutes of analysis
    norms = tuple(n.strip() for n in args.norms.split(",") if n.strip())
    sources = (None if args.sources is None
               else tuple(s.strip() for s in args.sources.split(",") if s.strip()))
    check_options(norms, sources, args.steps, args.batch_size, args.learning_rate, args.seed)
    opts = DataOptions(task=args.task, data_dir=args.data_dir, train_file=args.train_file,
                       validation_file=args.validation_file,
                       text_columns=parse_text_columns(args.text_columns),
                       label_column=args.label_column,
                       max_train_samples=args.max_examples)
    data = load_task_data(opts)
    transformers.set_seed(args.seed)
    path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(path)
    model = load_for_training(path, data.task)
    sources = check_model(model, sources)
    check_sequence_length(args.max_seq_length, model)
    train_set = tokenize_records(data.train, tokenizer, args.max_seq_length)
    out = Path(args.out_dir or Path("diagnostics") / data.task.name)
    print(diagnose(model, tokenizer, train_set, out, norms, sources, args.steps,
                   args.batch_size, args.learning_rate, args.seed, data.task.name))
    print(f"wrote {out / 'diagnostics.md'} and its plots")
    return 0


def _run_tasks(args: argparse.Namespace) -> int:
    from selftune.data.tasks import TASKS

    for task in TASKS.values():
        labels = "regression" if task.is_regression else "/".join(task.label_names or ())
        print(f"{task.name:8s} {task.description}")
        print(textwrap.indent(f"labels: {labels}; metrics: {', '.join(task.metrics)}; "
                              f"eval split: {task.eval_splits[0]}", " " * 9))
    return 0


def _load_config_file(path: str, config_class: type) -> dict:
    import yaml

    file = Path(path)
    if not file.is_file():
        raise SelftuneError(f"--config file not found: {path}")
    try:
        values = yaml.safe_load(file.read_text())  # YAML is a superset of JSON
    except yaml.YAMLError as err:
        raise SelftuneError(f"--config {path}: cannot parse ({err})") from None
    if not isinstance(values, dict):
        raise SelftuneError(f"--config {path}: expected a mapping of option names to values")
    checked = config_class.from_dict(values)  # names, types and choices, before anything runs
    defaults = {name: getattr(checked, name) for name in values if hasattr(checked, name)}
    if getattr(checked, "trainer_options", None):
        defaults["trainer_options"] = checked.trainer_options
    return defaults


def _handlers() -> dict[str, Callable[[argparse.Namespace], int]]:
    from selftune.bam_cli import BAM_HANDLERS
    from selftune.bench_cli import BENCH_HANDLERS

    return {"train": _run_train, "evaluate": _run_evaluate, "predict": _run_predict,
            "tasks": _run_tasks, "export": _run_export, "ensemble": _run_ensemble,
            "diagnose-cls": _run_diagnose, **BAM_HANDLERS, **BENCH_HANDLERS}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # the subcommand's usage, not the top-level one
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        (commands.choices.get(args.command) or parser).error(
            f"unrecognized arguments: {' '.join(unknown)}")
    if args.command is None:
        parser.print_help()
        return 2
    debug = getattr(args, "debug", False)
    try:
        if getattr(args, "config", None):
            # Two passes: the file's values become defaults, so explicit flags still win.
            args._config_parser.set_defaults(**_load_config_file(args.config, args._config_class))
            args = parser.parse_args(argv)
        return _handlers()[args.command](args)
    except SelftuneError as err:
        if debug:
            raise
        print(f"selftune: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0  # the reader went away (e.g. '| head')
    except KeyboardInterrupt:
        print("\nselftune: interrupted; run the same command again to resume from the last "
              "checkpoint", file=sys.stderr)
        return 130
    except Exception as err:
        message = None if debug else io_failure_message(err)
        if message is None:
            raise
        print(f"selftune: error: {message}", file=sys.stderr)
        return 2


# Errors of the storage itself, by errno and as the Rust of safetensors spells them.
STORAGE_ERRORS = {
    errno.ENOSPC: ("no space left on the device", ("No space left", "StorageFull")),
    errno.EDQUOT: ("disk quota exceeded", ("Disk quota exceeded", "QuotaExceeded")),
    errno.EROFS: ("the file system is read-only", ("Read-only file system", "ReadOnlyFilesystem")),
    errno.EIO: ("an input/output error of the storage", ("Input/output error",)),
}
RESUME_HINT = ("free disk space or choose another --output-dir, then run the same command "
               "again to resume")


def io_failure_message(err: BaseException) -> str | None:
    """The one line for a failed write or read of the storage (a full disk, a quota, a
    read-only or failing device), whichever library hit it; None for other errors."""
    text = str(err)
    for code, (what, spellings) in STORAGE_ERRORS.items():
        if getattr(err, "errno", None) == code or (
                not isinstance(err, OSError) and any(s in text for s in spellings)):
            where = f" ({err.filename})" if getattr(err, "filename", None) else ""
            return f"{what}{where}; {RESUME_HINT}"
    if isinstance(err, OSError):
        where = f": {err.filename}" if err.filename else ""
        return f"{err.strerror or err}{where}"
    if isinstance(err, RuntimeError) and "PytorchStreamWriter failed" in text:
        return f"writing a checkpoint failed ({text.splitlines()[0][:200]}); {RESUME_HINT}"
    return None


def entry() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())


if __name__ == "__main__":
    entry()
