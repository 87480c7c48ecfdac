"""Teacher predictions, computed once per task, stored keyed by example id (docs/methods.md §2.5).

File format (JSON Lines, UTF-8): a header line, then one line per training example::

    {"format": "selftune-teacher-predictions", "version": 1, "task": "rte",
     "label_names": ["entailment", "not_entailment"], "model": "runs/bam/teachers/rte",
     "num_examples": 2490, "max_seq_length": 128}
    {"example_id": "train-0", "input_hash": "5d41402abc4b2a76", "logits": [1.25, -0.73]}
    ...

``logits`` are the teacher's raw outputs in eval mode (one value for a regression task, on the
task's own scale, e.g. 0-5 for STS-B). Ids include the swapped copies (``train-7:swap``) when the
predictions were made for training on both sentence orders.

``input_hash`` (optional) is :func:`input_hash` of the example the teacher saw: the first 16 hex
digits of the sha256 of its texts, ``[text_a, text_b]`` as JSON. A student checks it for each of
its own examples, so a file made on a larger training set, or in both orders for a student that
trains on one, still serves it, while a text changed under the same id (an edited row; GLUE ids
are row numbers, so reordered rows too) is caught by id: ``selftune bam`` makes its cache again,
a file given to a multi-task run is refused. Files written before it existed lack it, as does
``max_seq_length`` in the oldest ones; only the ids of such a file can be checked. Readers ignore
fields they do not know, so the version stays 1 and old and new files are read alike.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from selftune.data.readers import Record
from selftune.data.tasks import TaskSpec
from selftune.errors import SelftuneError

FORMAT = "selftune-teacher-predictions"


def input_hash(record: Record) -> str:
    """What a teacher's prediction depends on: the example's texts (not its label)."""
    texts = json.dumps([record.get("text_a"), record.get("text_b")], ensure_ascii=False)
    return hashlib.sha256(texts.encode()).hexdigest()[:16]


@dataclass
class TeacherPredictions:
    logits: dict[str, list[float]]
    input_hashes: dict[str, str] = field(default_factory=dict)  # empty in files without them


def write_predictions(path: Path, task: TaskSpec, records: list[Record], logits: np.ndarray,
                      model: str, max_seq_length: int | None = None) -> None:
    """Write atomically: a killed run never leaves a file that looks complete."""
    header = {"format": FORMAT, "version": 1, "task": task.name,
              "label_names": list(task.label_names) if task.label_names else None,
              "model": model, "num_examples": len(records)}
    if max_seq_length is not None:
        header["max_seq_length"] = max_seq_length
    tmp = path.with_name(f".{path.name}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "w") as f:
        f.write(json.dumps(header) + "\n")
        for record, row in zip(records, logits, strict=True):
            f.write(json.dumps({"example_id": str(record["example_id"]),
                                "input_hash": input_hash(record),
                                "logits": [round(float(v), 6) for v in np.atleast_1d(row)]})
                    + "\n")
    os.replace(tmp, path)


def _parse_header(line: str) -> dict:
    try:
        header = json.loads(line)
    except json.JSONDecodeError:
        return {}
    return header if isinstance(header, dict) else {}


def read_header(path: Path) -> dict:
    """A predictions file's header line ({} if it has none that parses)."""
    with open(path) as f:
        return _parse_header(f.readline())


def read_predictions(path: Path, task: TaskSpec) -> TeacherPredictions:
    if not path.is_file():
        raise SelftuneError(f"teacher predictions not found: {path}")
    lines = path.read_text().splitlines()
    header = _parse_header(lines[0]) if lines else {}
    if header.get("format") != FORMAT:
        raise SelftuneError(f"{path} is not a selftune teacher-predictions file; make one with "
                            "'selftune teacher-predictions'")
    if header.get("task") != task.name:
        raise SelftuneError(f"{path} holds predictions for task {header.get('task')!r}, not "
                            f"{task.name!r}")
    width = task.num_labels
    predictions = TeacherPredictions({})
    for lineno, line in enumerate(lines[1:], start=2):
        try:
            row = json.loads(line)
            example_id = str(row["example_id"])
            logits = [float(v) for v in row["logits"]]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise SelftuneError(f"{path}:{lineno}: not a prediction line") from None
        if len(logits) != width:
            raise SelftuneError(f"{path}:{lineno}: {len(logits)} values, task {task.name} has "
                                f"{width} outputs")
        predictions.logits[example_id] = logits
        if "input_hash" in row:
            predictions.input_hashes[example_id] = str(row["input_hash"])
    if len(predictions.logits) != header.get("num_examples"):
        raise SelftuneError(f"{path}: {len(predictions.logits)} predictions, the header "
                            f"announces {header.get('num_examples')} (an incomplete file?)")
    return predictions


def _shown(ids: list[str]) -> str:
    return ", ".join(ids[:5]) + (", ..." if len(ids) > 5 else "")


def mismatches(predictions: TeacherPredictions, records: list[Record]) -> tuple[list[str],
                                                                              list[str]]:
    """Ids of the examples the predictions lack, and of those they were made on other texts
    for (only in files with input hashes)."""
    missing, changed = [], []
    hashes = predictions.input_hashes
    for record in records:
        example_id = str(record["example_id"])
        if example_id not in predictions.logits:
            missing.append(example_id)
        elif example_id in hashes and hashes[example_id] != input_hash(record):
            changed.append(example_id)
    return missing, changed


def check_coverage(predictions: TeacherPredictions, records: list[Record], path: Path,
                   task: TaskSpec) -> None:
    """Every training example of the student needs its teacher's prediction on that very text."""
    missing, changed = mismatches(predictions, records)
    if not (missing or changed):
        return
    remedy = (f"replace {path} with predictions made on the student's data ('selftune "
              "teacher-predictions' with the same --data-dir and --max-train-samples, and "
              "--both-orders for mrpc/stsb when the student trains with --double-unordered)")
    shown = _shown(missing or changed)
    if missing:
        raise SelftuneError(
            f"{path}: no teacher prediction for {len(missing)} of the {len(records)} {task.name} "
            f"training examples (ids {shown}): it was made on other data; {remedy}")
    raise SelftuneError(
        f"{path}: the teacher predicted on other texts than the student's for {len(changed)} "
        f"of the {len(records)} {task.name} training examples (ids {shown}): the data changed "
        f"under the same ids; {remedy}")
