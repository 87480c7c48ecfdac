"""Task data from the Hugging Face Hub (``nyu-mll/glue`` and friends), for machines online."""

from __future__ import annotations

from selftune.data.readers import Record
from selftune.data.tasks import TaskSpec
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
