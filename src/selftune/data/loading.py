"""Pick the data source for a run and return labelled train/eval splits.

Sources, in order: the user's own files (``--train-file``/``--validation-file``); a local folder
(``--data-dir`` or ``$SELFTUNE_DATA``) laid out like ``../shared/data``; the Hugging Face Hub.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from selftune.data import readers
from selftune.data.tasks import TaskSpec, custom_task, get_task
from selftune.errors import SelftuneError

Record = readers.Record


@dataclass
class TaskData:
    """A task with its labelled splits; labels are class ids (int) or floats (regression)."""

    task: TaskSpec
    train: list[Record]
    eval_splits: dict[str, list[Record]]
    source: str


@dataclass
class DataOptions:
    task: str | None = None
    data_dir: str | None = None
    train_file: str | None = None
    validation_file: str | None = None
    text_columns: tuple[str, ...] = ("text",)
    label_column: str = "label"
    id_column: str | None = None
    label_type: str = "auto"  # auto | classification | regression
    split_seed: int = 0
    dev_fraction: float = 0.1
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    dataset_name: str | None = None  # any Hub dataset with text and label columns
    dataset_config_name: str | None = None


def data_fingerprint(records: list[Record]) -> str:
    """A hash of the training examples (ids, texts, labels, in order): a run keeps it, so that
    resuming it over data that changed since is refused."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps(record, sort_keys=True, default=str).encode())
        digest.update(b"\n")
    return digest.hexdigest()[:16]


def resolve_data_dir(data_dir: str | None) -> Path | None:
    """``--data-dir`` wins over ``$SELFTUNE_DATA``; a named folder must exist."""
    value = data_dir or os.environ.get("SELFTUNE_DATA") or None
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        origin = "--data-dir" if data_dir else "$SELFTUNE_DATA"
        raise SelftuneError(f"data folder not found: {path} (from {origin})")
    return path


def load_task_data(opts: DataOptions, include_train: bool = True) -> TaskData:
    """Labelled splits of a registry task or of the user's files.

    ``include_train=False`` (evaluation only) skips reading the training split.
    """
    if opts.dataset_name:
        if opts.task and opts.task != opts.dataset_name or opts.train_file or opts.data_dir:
            raise SelftuneError("--dataset-name names the data on its own: drop --task, "
                                "--train-file and --data-dir")
        from selftune.data.hub import load_hub_dataset

        given = opts.text_columns if opts.text_columns != DataOptions().text_columns else None
        task, train, evals, source = load_hub_dataset(
            opts.dataset_name, opts.dataset_config_name, opts.label_column, opts.id_column, given)
        data = _to_label_ids(TaskData(task, train, evals, source))
    elif opts.dataset_config_name:
        raise SelftuneError("--dataset-config-name goes with --dataset-name")
    elif opts.train_file or opts.validation_file:
        data = _load_user_files(opts)
    else:
        if not opts.task:
            raise SelftuneError("give --task NAME, or your own data with --train-file and "
                                "--validation-file")
        task = get_task(opts.task)
        _refuse_user_file_options(opts, task)
        data_dir = resolve_data_dir(opts.data_dir)
        if data_dir is not None:
            data = _load_local(task, data_dir, opts, include_train)
        else:
            from selftune.data.hub import load_from_hub

            train, evals = load_from_hub(task, include_train)
            data = TaskData(task, train, evals, source=f"hub:{task.hub[0] if task.hub else '?'}")
        data = _to_label_ids(data)
    return _subsample(data, opts)


def _refuse_user_file_options(opts: DataOptions, task: TaskSpec) -> None:
    """Column and label-type options describe the user's own files; a registry task knows its
    own, and silently ignoring e.g. ``--label-type classification`` on STS-B would mislead."""
    defaults = DataOptions()
    given = [flag for flag, name in (("--label-type", "label_type"),
                                     ("--text-columns", "text_columns"),
                                     ("--label-column", "label_column"),
                                     ("--id-column", "id_column"))
             if getattr(opts, name) != getattr(defaults, name)]
    if given:
        kind = "a regression task" if task.is_regression else "a classification task"
        raise SelftuneError(f"{', '.join(given)} only apply to your own files (--train-file); "
                            f"{task.name} is {kind} with its own columns: drop the option")


def _load_local(
    task: TaskSpec, data_dir: Path, opts: DataOptions, include_train: bool
) -> TaskData:
    if task.name in readers.POS_NEG_FILES:
        records = readers.read_pos_neg(task, data_dir)
        train, dev = stratified_split(records, opts.dev_fraction, opts.split_seed)
        return TaskData(task, train, {"validation": dev}, source=str(data_dir))
    if task.name == "imdb":
        def read(split: str) -> list[Record]:
            return readers.read_imdb_split(data_dir, split)
    elif task.name == "ag_news":
        def read(split: str) -> list[Record]:
            return readers.read_ag_news_split(task, data_dir, split)
    else:
        def read(split: str) -> list[Record]:
            return readers.read_glue_split(task, data_dir, split)
    return TaskData(task, read("train") if include_train else [],
                    {s: read(s) for s in task.eval_splits},
                    source=str(data_dir))


def stratified_split(
    records: list[Record], dev_fraction: float, seed: int
) -> tuple[list[Record], list[Record]]:
    """A seeded, stratified train/dev split for sets that ship without one (MR, CR, MPQA).

    The split depends only on ``seed`` (``--split-seed``, default 0) and the data, never on the
    training seed, so every run of a grid sees the same dev set.
    """
    from sklearn.model_selection import train_test_split

    if not 0 < dev_fraction < 1:
        raise SelftuneError(f"--dev-fraction must be between 0 and 1, got {dev_fraction}")
    labels = [r["label"] for r in records]
    train, dev = train_test_split(records, test_size=dev_fraction, random_state=seed,
                                  stratify=labels)
    key = {r["example_id"]: i for i, r in enumerate(records)}
    # Keep file order inside each part: the order is then independent of sklearn internals.
    return sorted(train, key=lambda r: key[r["example_id"]]), sorted(
        dev, key=lambda r: key[r["example_id"]])


def _to_label_ids(data: TaskData) -> TaskData:
    task = data.task
    if task.is_regression:
        return data
    index = {name: i for i, name in enumerate(task.label_names or ())}

    def convert(records: list[Record], split: str) -> list[Record]:
        out = []
        for r in records:
            if r["label"] not in index:
                raise SelftuneError(
                    f"{split} example {r['example_id']}: label {r['label']!r} is not one of "
                    f"{list(index)} for task {task.name}")
            out.append({**r, "label": index[r["label"]]})
        return out

    return TaskData(task, convert(data.train, "train"),
                    {s: convert(v, s) for s, v in data.eval_splits.items()}, data.source)


def parse_text_columns(value: str) -> tuple[str, ...]:
    """``--text-columns``: one column, or two comma-separated for sentence pairs."""
    columns = tuple(c.strip() for c in value.split(",") if c.strip())
    if not 1 <= len(columns) <= 2:
        raise SelftuneError("--text-columns takes one column, or two comma-separated for pairs")
    return columns


def _load_user_files(opts: DataOptions) -> TaskData:
    if not (opts.train_file and opts.validation_file):
        raise SelftuneError("give both --train-file and --validation-file")
    if not 1 <= len(opts.text_columns) <= 2:
        raise SelftuneError("--text-columns takes one column, or two for sentence pairs")
    train = readers.read_user_file(Path(opts.train_file), opts.text_columns, opts.label_column,
                                   opts.id_column)
    dev = readers.read_user_file(Path(opts.validation_file), opts.text_columns,
                                 opts.label_column, opts.id_column)
    regression = _is_regression(train, opts.label_type, opts.train_file)
    name = opts.task or Path(opts.train_file).stem
    if regression:
        for split, records in (("train", train), ("validation", dev)):
            for r in records:
                r["label"] = readers.regression_label(
                    r["label"], f"{split} example {r['example_id']}")
        task = custom_task(name, len(opts.text_columns), None)
        return TaskData(task, train, {"validation": dev}, source="files")
    for records in (train, dev):
        for r in records:
            r["label"] = readers.label_text(r["label"])
    label_names = tuple(sorted({r["label"] for r in train}, key=readers.natural_label_key))
    if len(label_names) < 2:
        raise SelftuneError(f"{opts.train_file}: only one label ({label_names[0]!r}) in the "
                            "training data; classification needs at least two")
    unseen = sorted({r["label"] for r in dev} - set(label_names))
    if unseen:
        raise SelftuneError(f"{opts.validation_file}: label(s) {unseen} never occur in the "
                            "training file; fix the labels or add training examples")
    task = custom_task(name, len(opts.text_columns), label_names)
    return _to_label_ids(TaskData(task, train, {"validation": dev}, source="files"))


def _is_regression(train: list[Record], label_type: str, path: str) -> bool:
    if label_type not in ("auto", "classification", "regression"):
        raise SelftuneError(f"--label-type must be auto, classification or regression, "
                            f"got {label_type!r}")
    if label_type != "auto":
        return label_type == "regression"
    numbers = []
    for r in train:
        try:
            numbers.append(float(r["label"]))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            if any(_is_number(x["label"]) for x in train):
                raise SelftuneError(
                    f"{path}: mixed label types (numbers and {r['label']!r}); give "
                    "--label-type classification to treat all labels as class names") from None
            return False
    if any(not math.isfinite(x) for x in numbers):
        raise SelftuneError(f"{path}: NaN or infinite labels; fix or remove those rows")
    # Integer labels are classes; any fractional value makes the task a regression.
    return any(not x.is_integer() for x in numbers)


def _is_number(value: object) -> bool:
    try:
        float(value)  # type: ignore[arg-type]
        return True
    except (TypeError, ValueError):
        return False


def _subsample(data: TaskData, opts: DataOptions) -> TaskData:
    """Fixed subsets (``--max-train-samples``) drawn with ``--split-seed``, not the run seed."""
    import random

    def take(records: list[Record], n: int | None) -> list[Record]:
        if n is None or n >= len(records):
            return records
        if n <= 0:
            raise SelftuneError("--max-train-samples/--max-eval-samples must be positive")
        chosen = sorted(random.Random(opts.split_seed).sample(range(len(records)), n))
        return [records[i] for i in chosen]

    return TaskData(data.task, take(data.train, opts.max_train_samples),
                    {s: take(v, opts.max_eval_samples) for s, v in data.eval_splits.items()},
                    data.source)
