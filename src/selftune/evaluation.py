"""Evaluate a saved model on a task's dev split, and predict labels for a file."""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from selftune.data.features import tokenize_records
from selftune.data.loading import DataOptions, load_task_data
from selftune.data.readers import Record, label_text, read_user_file, regression_label
from selftune.data.tasks import TASKS, TaskSpec, custom_task
from selftune.errors import SelftuneError
from selftune.integrity import finite_or_none
from selftune.metrics import compute_task_metrics
from selftune.models.loading import (
    check_sequence_length,
    load_finetuned,
    load_tokenizer,
    model_label_names,
)
from selftune.models.packed import enable_packing, packing_collator

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger("selftune")


def predict_logits(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, records: list[Record],
    max_seq_length: int,
    batch_size: int, with_labels: bool = False, packing: bool = True,
) -> np.ndarray:
    """Logits for ``records`` in eval mode, in batches with dynamic padding (or packed, see
    ``selftune.models.packed``)."""
    check_sequence_length(max_seq_length, model)
    enable_packing(model, packing)
    dataset = tokenize_records(records, tokenizer, max_seq_length, with_labels=with_labels)
    return dataset_logits(model, tokenizer, dataset, batch_size, packing)


def dataset_logits(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                   dataset: datasets.Dataset, batch_size: int, packing: bool = True,
                   ) -> np.ndarray:
    """Logits for an already tokenized dataset (eval mode, no_grad, dynamic padding; packed
    rows if ``packing`` and the model's packing is enabled).

    A plain loop on purpose: inside a ``torchrun`` job a ``Trainer`` would shard and gather the
    predictions across processes, but these are one process's own (e.g. the main process
    caching a teacher's predictions while the others wait).
    """
    collate = packing_collator(model, tokenizer, packing=packing)
    columns = [c for c in dataset.column_names if c in tokenizer.model_input_names]
    loader = DataLoader(dataset.select_columns(columns), batch_size=batch_size,
                        collate_fn=collate)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs = []
    with torch.no_grad():
        for batch in tqdm(loader, desc="Predicting", disable=len(dataset) < 2000):
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
            outputs.append(logits.float().cpu().numpy())
    model.train(was_training)
    return np.concatenate(outputs).astype(np.float64)


def check_task_matches(task: TaskSpec, labels: tuple[str, ...] | None,
                       model_dir: Path | str) -> None:
    """Refuse a model whose outputs are not the task's: kind, number and order of classes."""
    if (labels is None) != task.is_regression:
        kind = "a regression" if labels is None else "a classifier"
        raise SelftuneError(f"{model_dir} is {kind} but task {task.name} is not")
    if labels is not None and task.label_names is not None and len(labels) != task.num_labels:
        raise SelftuneError(f"{model_dir} predicts {len(labels)} classes {list(labels)}, task "
                            f"{task.name} has {task.num_labels} {list(task.label_names)}")
    check_label_order(model_dir, task, labels)


def check_label_order(model_dir: Path | str, task: TaskSpec,
                      labels: tuple[str, ...] | None) -> None:
    """A model trained elsewhere may order the task's classes differently (MNLI checkpoints
    often do): its predictions (a teacher's soft targets, or what `evaluate` scores) would
    then be silently permuted, so the task's own names in another order are refused, and so
    are the classes of another registry task (an RTE model scored on MRPC). Other names
    (LABEL_0..., or a sentiment model's negative/positive used on IMDb's neg/pos) say nothing
    about the order: they are taken in the task's, with a warning."""
    if labels is None or task.label_names is None:
        return
    ours, theirs = _class_names(task.label_names), _class_names(labels)
    if theirs == ours:
        return
    if sorted(theirs) == sorted(ours):
        raise SelftuneError(
            f"{model_dir} orders its classes {list(labels)}, {task.name} orders them "
            f"{list(task.label_names)}; its predictions would be permuted. Re-export the "
            "model with the task's label order")
    other_tasks = [t.name for t in TASKS.values() if t.label_names is not None
                   and sorted(_class_names(t.label_names)) == sorted(theirs)]
    if other_tasks:
        raise SelftuneError(
            f"{model_dir} predicts the classes of {'/'.join(other_tasks)} {list(labels)}, not "
            f"those of {task.name} {list(task.label_names)}: a model of another task")
    logger.warning("%s names its classes %s; taken to be %s, in that order", model_dir,
                   list(labels), list(task.label_names))


# Spellings of one class across tasks and checkpoints.
CLASS_SYNONYMS = {"negative": "neg", "positive": "pos"}


def _class_names(names: tuple[str, ...]) -> list[str]:
    return [CLASS_SYNONYMS.get(n.lower(), n.lower()) for n in names]


def evaluate_model(
    model_dir: str, opts: DataOptions, eval_split: str | None, max_seq_length: int,
    batch_size: int, trust_remote_code: bool = False, packing: bool = True,
    logits_fn: Callable | None = None,
) -> dict[str, Any]:
    """Metrics (percent) of a saved model on a registry task's dev split or a labelled file.

    ``logits_fn(model, tokenizer, records, max_seq_length, batch_size)`` replaces
    :func:`predict_logits` (e.g. to score an output vote of several states of the model)."""
    model = load_finetuned(model_dir, trust_remote_code)
    tokenizer = load_tokenizer(model_dir, trust_remote_code)
    labels = model_label_names(model)
    if opts.validation_file and not opts.train_file:
        task = custom_task(opts.task or "custom", len(opts.text_columns), labels)
        records = _labelled_file(Path(opts.validation_file), opts, labels)
        split = "validation"
    else:
        data = load_task_data(opts, include_train=False)
        task = data.task
        check_task_matches(task, labels, model_dir)
        split = eval_split or next(iter(data.eval_splits))
        if split not in data.eval_splits:
            raise SelftuneError(f"task {task.name} has no split {split!r}; choose one of "
                                f"{list(data.eval_splits)}")
        records = data.eval_splits[split]
    if logits_fn is not None:
        logits = logits_fn(model, tokenizer, records, max_seq_length, batch_size)
    else:
        logits = predict_logits(model, tokenizer, records, max_seq_length, batch_size,
                                packing=packing)
    gold = np.array([r["label"] for r in records])
    metrics = compute_task_metrics(task, logits, gold)
    score = metrics.pop("score")
    return {"task": task.name, "eval_split": split, "model_dir": model_dir,
            "num_examples": len(records), "metrics": metrics, "score": score}


def _labelled_file(path: Path, opts: DataOptions, labels: tuple[str, ...] | None) -> list[Record]:
    records = read_user_file(path, opts.text_columns, opts.label_column, opts.id_column)
    for r in records:
        where = f"{path} example {r['example_id']}"
        if labels is None:
            r["label"] = regression_label(r["label"], where)
            continue
        raw = label_text(r["label"])
        if raw in labels:
            r["label"] = labels.index(raw)
        elif raw.isdigit() and int(raw) < len(labels):
            r["label"] = int(raw)
        else:
            raise SelftuneError(f"{where}: label {raw!r} is not one of the model's labels "
                                f"{list(labels)}")
    return records


def predict_file(
    model_dir: str, input_file: str, output_file: str, text_columns: tuple[str, ...],
    id_column: str | None, max_seq_length: int, batch_size: int,
    trust_remote_code: bool = False, packing: bool = True,
) -> int:
    """Write predicted labels (and class probabilities) for every row of ``input_file``.

    The output format follows the output file's extension: .jsonl, .csv or .tsv.
    """
    out_path = Path(output_file)
    if out_path.suffix.lower() not in (".jsonl", ".csv", ".tsv"):
        raise SelftuneError(f"--output-file must end in .jsonl, .csv or .tsv: {output_file}")
    check_output_file(out_path)
    if out_path.resolve() == Path(input_file).resolve():
        raise SelftuneError(f"--output-file {output_file} is the --input-file: the predictions "
                            "would replace your data; choose another file")
    model = load_finetuned(model_dir, trust_remote_code)
    tokenizer = load_tokenizer(model_dir, trust_remote_code)
    labels = model_label_names(model)
    records = read_user_file(Path(input_file), text_columns, None, id_column)
    logits = predict_logits(model, tokenizer, records, max_seq_length, batch_size,
                            packing=packing)
    rows = []
    for record, row_logits in zip(records, logits, strict=True):
        row: dict[str, Any] = {"example_id": record["example_id"]}
        if labels is None:
            row["prediction"] = float(row_logits[0])
        else:
            probs = torch.softmax(torch.from_numpy(row_logits), dim=-1).numpy()
            row["label"] = labels[int(probs.argmax())]
            row.update({f"prob_{name}": float(p) for name, p in zip(labels, probs, strict=True)})
        rows.append(row)
    _write_rows(out_path, rows)
    return len(rows)


def check_output_file(path: Path) -> None:
    """Refuse, before any work, an output file that cannot be written."""
    if path.is_dir():
        raise SelftuneError(f"--output-file {path} is a folder; give a file name")


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        if path.suffix.lower() == ".jsonl":
            for row in rows:
                # NaN/infinity are not JSON: such a value (an overflow) is written as null.
                f.write(json.dumps({k: finite_or_none(v) if isinstance(v, float) else v
                                    for k, v in row.items()}) + "\n")
        else:
            delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
            writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
            writer.writeheader()
            writer.writerows(rows)
    tmp.replace(path)
