"""``selftune diagnose-cls``: how the pre-trained [CLS] is distributed, and gradient norms at
[CLS] with each normalization."""

from __future__ import annotations

import argparse
from pathlib import Path

from selftune.cli.common import Commands, HelpFormatter, add_common
from selftune.cli.options import DiagnoseOptions
from selftune.config import add_dataclass_arguments
from selftune.data.loading import DataOptions, parse_text_columns


def register(commands: Commands) -> None:
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
    add_dataclass_arguments(diagnose, DiagnoseOptions)
    add_common(diagnose)
    diagnose.set_defaults(_run=run_diagnose)


def _names(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


def run_diagnose(args: argparse.Namespace) -> int:
    import transformers

    from selftune.data.features import tokenize_records
    from selftune.data.loading import load_task_data
    from selftune.diagnostics import check_model, check_options, diagnose
    from selftune.extras import require_matplotlib
    from selftune.models.loading import (
        check_sequence_length,
        load_for_training,
        load_tokenizer,
        resolve_model_path,
    )

    require_matplotlib("selftune diagnose-cls")  # before minutes of analysis
    norms = _names(args.norms)
    sources = None if args.sources is None else _names(args.sources)
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
