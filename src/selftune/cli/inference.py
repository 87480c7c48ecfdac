"""``selftune evaluate``, ``predict`` and ``export``: use a saved model."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from selftune.cli.common import (
    MODEL_DIR_HELP,
    Commands,
    HelpFormatter,
    add_common,
    print_result,
)
from selftune.cli.options import EvaluateOptions, PredictOptions
from selftune.config import add_dataclass_arguments
from selftune.data.loading import parse_text_columns
from selftune.errors import SelftuneError


def register(commands: Commands) -> None:
    evaluate = commands.add_parser(
        "evaluate", help="Dev metrics of a saved model on a task (or a labelled file).",
        description="Evaluate a model directory (as written by 'selftune train') on a task's "
                    "dev split or on your own labelled file; prints the metrics as JSON.",
        formatter_class=HelpFormatter,
        epilog="example:\n  selftune evaluate runs/rte/baseline-seed42 --task rte "
               "--data-dir ../shared/data")
    evaluate.add_argument("model_dir", help=MODEL_DIR_HELP)
    add_dataclass_arguments(evaluate, EvaluateOptions)
    add_common(evaluate, quiet=True)
    evaluate.set_defaults(_run=run_evaluate)

    predict = commands.add_parser(
        "predict", help="Predict labels and probabilities for a csv/tsv/jsonl file.",
        description="Run a saved model over every row of a file and write one prediction per "
                    "row: the label and each class probability (classification) or the "
                    "predicted score (regression).",
        formatter_class=HelpFormatter,
        epilog="example:\n  selftune predict runs/sst2/baseline-seed42 --input-file "
               "reviews.csv --text-columns review --output-file predictions.csv")
    predict.add_argument("model_dir", help=MODEL_DIR_HELP)
    add_dataclass_arguments(predict, PredictOptions)
    add_common(predict, quiet=True)
    predict.set_defaults(_run=run_predict)

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
    add_common(export)
    export.set_defaults(_run=run_export)


def run_evaluate(args: argparse.Namespace) -> int:
    from selftune.data.loading import DataOptions
    from selftune.data.tasks import TASKS
    from selftune.evaluation import check_output_file, evaluate_model
    from selftune.outputs import write_json_atomic

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
                            args.batch_size, args.trust_remote_code, packing=args.packing,
                            progress=not args.quiet)
    if args.output_file:
        write_json_atomic(Path(args.output_file), result)
    print_result(args, result, indent=2)
    return 0


def run_predict(args: argparse.Namespace) -> int:
    from selftune.evaluation import predict_file

    count = predict_file(args.model_dir, args.input_file, args.output_file,
                         parse_text_columns(args.text_columns), args.id_column,
                         args.max_seq_length,
                         args.batch_size, args.trust_remote_code, packing=args.packing,
                         progress=not args.quiet)
    if not args.quiet:
        print(f"wrote {count} predictions to {args.output_file}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from selftune.evaluation import NUM_TEXTS_KEY, trained_num_texts
    from selftune.models.heads import fold_cls_norm
    from selftune.models.loading import load_finetuned, load_tokenizer

    out = Path(args.out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SelftuneError(f"{out} exists and is not an empty folder; choose a new folder")
    model = fold_cls_norm(load_finetuned(args.model_dir))
    tokenizer = load_tokenizer(args.model_dir)
    # The copy leaves run_config.json behind: it keeps whether the model reads sentence pairs
    # (a key a plain loader ignores), for predict's check of its input.
    num_texts = trained_num_texts(args.model_dir)
    if num_texts is not None:
        setattr(model.config, NUM_TEXTS_KEY, num_texts)
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
    if not getattr(args, "quiet", False):
        print(f"wrote a plain model to {out}")
    return 0
