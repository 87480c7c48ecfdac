"""Teacher predictions, computed once per task and stored keyed by example id (BAM!, §2.2).

File format (JSON Lines, UTF-8): a header line, then one line per training example::

    {"format": "selftune-teacher-predictions", "version": 1, "task": "rte",
     "label_names": ["entailment", "not_entailment"], "model": "runs/bam/teachers/rte",
     "num_examples": 2490, "max_seq_length": 128, "train_sha256": "9f86d0..."}
    {"example_id": "train-0", "logits": [1.25, -0.73]}
    ...

``logits`` are the teacher's raw outputs in eval mode (one value for a regression task, on the
task's own scale, e.g. 0-5 for STS-B). Ids include the swapped copies (``train-7:swap``) when the
predictions were made for training on both sentence orders.

``train_sha256`` (optional) is the fingerprint of the training examples the predictions were made
on (:func:`training_fingerprint`: ids, texts and labels, in id order), so that ``selftune bam``
recomputes a cached file when the data changed under the same ids (rows edited or reordered).
Files written before it existed lack it, as does ``max_seq_length`` in the oldest ones; readers
ignore header fields they do not know, so the version stays 1 and old and new files are read
alike.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from selftune.data.readers import Record
from selftune.data.tasks import TaskSpec
from selftune.errors import SelftuneError

FORMAT = "selftune-teacher-predictions"


def training_fingerprint(records: list[Record]) -> str:
    """sha256 over the examples' ids, texts and labels in id order: it changes when a text or
    label under an id changes (GLUE ids are row numbers, so reordering rows changes it too),
    not when rows keyed by their own id column are merely reordered."""
    digest = hashlib.sha256()
    for record in sorted(records, key=lambda r: str(r["example_id"])):
        digest.update(json.dumps([str(record["example_id"]), record.get("text_a"),
                                  record.get("text_b"), record.get("label")],
                                 ensure_ascii=False).encode() + b"\n")
    return digest.hexdigest()


def write_predictions(path: Path, task: TaskSpec, ids: list[str], logits: np.ndarray,
                      model: str, max_seq_length: int | None = None,
                      fingerprint: str | None = None) -> None:
    """Write atomically: a killed run never leaves a file that looks complete."""
    header = {"format": FORMAT, "version": 1, "task": task.name,
              "label_names": list(task.label_names) if task.label_names else None,
              "model": model, "num_examples": len(ids)}
    if max_seq_length is not None:
        header["max_seq_length"] = max_seq_length
    if fingerprint is not None:
        header["train_sha256"] = fingerprint
    tmp = path.with_name(f".{path.name}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "w") as f:
        f.write(json.dumps(header) + "\n")
        for example_id, row in zip(ids, logits, strict=True):
            f.write(json.dumps({"example_id": example_id,
                                "logits": [round(float(v), 6) for v in np.atleast_1d(row)]})
                    + "\n")
    os.replace(tmp, path)


def read_header(path: Path) -> dict:
    """A predictions file's header line ({} if it has none that parses)."""
    with open(path) as f:
        try:
            header = json.loads(f.readline())
        except json.JSONDecodeError:
            return {}
    return header if isinstance(header, dict) else {}


def read_predictions(path: Path, task: TaskSpec) -> dict[str, list[float]]:
    if not path.is_file():
        raise SelftuneError(f"teacher predictions not found: {path}")
    lines = path.read_text().splitlines()
    try:
        header = json.loads(lines[0]) if lines else {}
    except json.JSONDecodeError:
        header = {}
    if header.get("format") != FORMAT:
        raise SelftuneError(f"{path} is not a selftune teacher-predictions file; make one with "
                            "'selftune teacher-predictions'")
    if header.get("task") != task.name:
        raise SelftuneError(f"{path} holds predictions for task {header.get('task')!r}, not "
                            f"{task.name!r}")
    width = task.num_labels
    predictions: dict[str, list[float]] = {}
    for lineno, line in enumerate(lines[1:], start=2):
        try:
            row = json.loads(line)
            logits = [float(v) for v in row["logits"]]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise SelftuneError(f"{path}:{lineno}: not a prediction line") from None
        if len(logits) != width:
            raise SelftuneError(f"{path}:{lineno}: {len(logits)} values, task {task.name} has "
                                f"{width} outputs")
        predictions[str(row["example_id"])] = logits
    if len(predictions) != header.get("num_examples"):
        raise SelftuneError(f"{path}: {len(predictions)} predictions, the header announces "
                            f"{header.get('num_examples')} (an incomplete file?)")
    return predictions


def check_coverage(predictions: dict[str, list[float]], records: list[Record], path: Path,
                   task: TaskSpec) -> None:
    """Every training example of the student needs its teacher prediction."""
    missing = [str(r["example_id"]) for r in records if str(r["example_id"]) not in predictions]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise SelftuneError(
            f"{path}: no teacher prediction for {len(missing)} of the {len(records)} {task.name} "
            f"training examples (ids {shown}): it was made on other data; replace {path} with "
            "predictions made on the student's data ('selftune teacher-predictions' with the "
            "same --data-dir and --max-train-samples, and --both-orders for mrpc/stsb when "
            "the student trains with --double-unordered)")
