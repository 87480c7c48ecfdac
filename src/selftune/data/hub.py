"""Task data from the Hugging Face Hub (``nyu-mll/glue`` and friends), for machines online."""

from __future__ import annotations

from typing import Any

from selftune.data.readers import Record, natural_label_key
from selftune.data.tasks import TaskSpec, custom_task
from selftune.errors import SelftuneError


def load_from_hub(
    task: TaskSpec, include_train: bool = True
) -> tuple[list[Record], dict[str, list[Record]]]:
    """Download (or read from the datasets cache) a task's train and eval splits."""
    if task.hub is None:
        raise SelftuneError(
            f"task {task.name} has no Hub source; give a local folder with --data-dir "
            "(or $SELFTUNE_DATA)")
    import datasets

    path, config = task.hub
    try:
        raw = datasets.load_dataset(path, config)
    except Exception as err:  # datasets raises many types for "no network"
        raise SelftuneError(
            f"could not load {path}{'/' + config if config else ''} from the Hugging Face Hub "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); offline? "
            "Give local data with --data-dir DIR (or $SELFTUNE_DATA), e.g. ../shared/data"
        ) from None

    def convert(split: str) -> list[Record]:
        hub_split = task.hub_splits.get(split, split)
        if hub_split not in raw:
            raise SelftuneError(f"{path} has no split {hub_split!r}")
        records = []
        for i, row in enumerate(raw[hub_split]):
            record: Record = {"example_id": f"{split}-{row.get('idx', i)}"}
            for key, col in zip(("text_a", "text_b"), task.hub_text_columns, strict=False):
                record[key] = row[col]
            label = row[task.hub_label_column]
            if task.is_regression:
                record["label"] = float(label)
            else:
                assert task.label_names is not None
                if not 0 <= label < len(task.label_names):
                    # GLUE test splits carry label -1: they cannot be used for evaluation.
                    raise SelftuneError(f"{path} split {hub_split!r} has no labels")
                record["label"] = task.label_names[label]
            records.append(record)
        return records

    train = convert("train") if include_train else []
    return train, {s: convert(s) for s in task.eval_splits}


# Eval split of a Hub dataset, in order of preference (run_glue.py's "validation", MNLI's
# matched one, or a test split that carries labels).
EVAL_SPLITS = ("validation", "validation_matched", "dev", "test")


def load_hub_dataset(name: str, config: str | None, label_column: str, id_column: str | None,
                     text_columns: tuple[str, ...] | None
                     ) -> tuple[TaskSpec, list[Record], dict[str, list[Record]], str]:
    """Any Hub dataset with text and label columns (``--dataset-name``), by run_glue.py's
    conventions: its train split and its validation split (else test); the label column's
    class names when it is a ``ClassLabel``, a regression when its values are floats; the
    text columns ``sentence1,sentence2``, else ``text``, else its one or two string columns
    (or ``text_columns``, when given). Returns the task, its train records,
    its eval split's records by name, and the source."""
    import datasets

    shown = f"{name}{'/' + config if config else ''}"
    try:
        raw = datasets.load_dataset(name, config)
    except Exception as err:  # datasets raises many types for "no network" or "no such name"
        raise SelftuneError(
            f"could not load the dataset {shown} from the Hugging Face Hub "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); offline "
            "(HF_HUB_OFFLINE)? Give local copies with --train-file and --validation-file"
        ) from None
    eval_split = next((s for s in EVAL_SPLITS if s in raw), None)
    if "train" not in raw or eval_split is None:
        raise SelftuneError(f"{shown} has splits {list(raw)}; selftune needs 'train' and one "
                            f"of {', '.join(EVAL_SPLITS)}")
    features = raw["train"].features
    if label_column not in features:
        raise SelftuneError(f"{shown} has no label column {label_column!r} (columns: "
                            f"{', '.join(features)}); name it with --label-column")
    text_columns = _hub_text_columns(shown, features, label_column, id_column, text_columns)
    label_feature = features[label_column]
    class_names = getattr(label_feature, "names", None)
    regression = class_names is None and getattr(label_feature, "dtype", "").startswith("float")
    splits = {split: _hub_records(raw[split], split, shown, text_columns, label_column,
                                  class_names, id_column)
              for split in ("train", eval_split)}
    train, dev = splits["train"], splits[eval_split]
    if regression:
        label_names = None
    else:
        label_names = tuple(class_names) if class_names else tuple(sorted(
            {str(r["label"]) for r in train}, key=natural_label_key))
        for records in (train, dev):
            for record in records:
                record["label"] = str(record["label"])
    task = custom_task(name.rsplit("/", 1)[-1], len(text_columns), label_names)
    return task, train, {eval_split: dev}, f"hub:{shown}"


def _hub_text_columns(shown: str, features: Any, label_column: str, id_column: str | None,
                      given: tuple[str, ...] | None) -> tuple[str, ...]:
    if given:  # with --text-columns
        columns = given
    else:
        strings = [c for c, f in features.items() if getattr(f, "dtype", None) == "string"
                   and c not in (label_column, id_column)]
        if "sentence1" in strings and "sentence2" in strings:
            columns = ("sentence1", "sentence2")
        elif "text" in strings:
            columns = ("text",)
        elif 1 <= len(strings) <= 2:
            columns = tuple(strings)
        else:
            raise SelftuneError(f"{shown}: which columns are the text? It has "
                                f"{', '.join(features)}; name one or two with --text-columns")
    missing = [c for c in columns if c not in features]
    if missing:
        raise SelftuneError(f"{shown} has no column {missing[0]!r} (columns: "
                            f"{', '.join(features)})")
    return tuple(columns)


def _hub_records(rows: Any, split: str, shown: str, text_columns: tuple[str, ...],
                 label_column: str, class_names: list[str] | None,
                 id_column: str | None) -> list[Record]:
    records = []
    for i, row in enumerate(rows):
        label = row[label_column]
        if label is None or (class_names is not None and not 0 <= label < len(class_names)):
            raise SelftuneError(f"{shown} split {split!r} row {i} has no label ({label!r}); "
                                "a split without labels cannot train or score a model")
        record: Record = {"example_id": f"{split}-{row[id_column] if id_column else i}",
                          "label": class_names[label] if class_names else label}
        for key, column in zip(("text_a", "text_b"), text_columns, strict=False):
            if not isinstance(row[column], str):
                raise SelftuneError(f"{shown} split {split!r} row {i}: column {column!r} is "
                                    f"not text ({type(row[column]).__name__})")
            record[key] = row[column]
        records.append(record)
    return records
