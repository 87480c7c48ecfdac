"""Multi-task training data: every task tokenized, labelled, tagged with its task id.

Labels are stored as floats in one column (class ids for classification, scores for regression;
STS-B scaled to [0, 1] as y/5, as BAM!). With teacher predictions, each example also carries
its teacher's logits, padded to the widest task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import datasets

from selftune.data.features import tokenize_records
from selftune.data.readers import Record
from selftune.data.tasks import TaskSpec
from selftune.multitask.model import REGRESSION_SCALE

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Tasks BAM! trains on both sentence orders ("double_unordered": MRPC and STS-B in its
# reference code; QQP, symmetric too, is not doubled there, and not here).
UNORDERED_TASKS = ("mrpc", "stsb")


def with_swapped_pairs(records: list[Record]) -> list[Record]:
    """The records followed by their copies with the two sentences swapped (id + ':swap')."""
    swapped = [{**r, "example_id": f"{r['example_id']}:swap", "text_a": r["text_b"],
                "text_b": r["text_a"]} for r in records]
    return records + swapped


@dataclass
class MultiTaskData:
    train: datasets.Dataset
    task_indices: dict[str, list[int]]  # rows of ``train`` per task
    sizes: dict[str, int]


def label_scale(task: TaskSpec) -> float:
    return REGRESSION_SCALE.get(task.name, 1.0) if task.is_regression else 1.0


def build_train_set(
    tasks: list[TaskSpec], records: dict[str, list[Record]],
    tokenizer: PreTrainedTokenizerBase, max_seq_length: int,
    teachers: dict[str, dict[str, list[float]]] | None, max_labels: int,
) -> MultiTaskData:
    parts, task_indices, sizes, start = [], {}, {}, 0
    for index, task in enumerate(tasks):
        rows = records[task.name]
        scale = label_scale(task)
        dataset = tokenize_records(rows, tokenizer, max_seq_length)
        dataset = dataset.map(lambda b, s=scale: {"labels": [float(y) / s for y in b["labels"]]},
                              batched=True, desc=f"{task.name} labels")
        dataset = dataset.add_column("task_ids", [index] * len(dataset))
        if teachers is not None:
            predictions = teachers[task.name]
            padded = [[v / scale for v in predictions[str(r["example_id"])]]
                      + [0.0] * (max_labels - task.num_labels) for r in rows]
            dataset = dataset.add_column("teacher_logits", padded)
        dataset = dataset.cast_column("labels", datasets.Value("float32"))
        parts.append(dataset.remove_columns(["example_id"]))
        task_indices[task.name] = list(range(start, start + len(dataset)))
        sizes[task.name] = len(dataset)
        start += len(dataset)
    return MultiTaskData(datasets.concatenate_datasets(parts), task_indices, sizes)


def eval_set(task_index: int, records: list[Record], tokenizer: PreTrainedTokenizerBase,
             max_seq_length: int) -> datasets.Dataset:
    """A task's dev split for prediction: features and task id only (labels kept aside)."""
    dataset = tokenize_records(records, tokenizer, max_seq_length, with_labels=False)
    return dataset.add_column("task_ids", [task_index] * len(dataset)).remove_columns(
        ["example_id"])
