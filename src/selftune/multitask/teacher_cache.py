"""Teacher predictions, computed once per task and stored keyed by example id (BAM!, §2.2).

File format (JSON Lines, UTF-8): a header line, then one line per training example::

    {"format": "selftune-teacher-predictions", "version": 1, "task": "rte",
     "label_names": ["entailment", "not_entailment"], "model": "runs/bam/teachers/rte",
     "num_examples": 2490, "max_seq_length": 128}
    {"example_id": "train-0", "logits": [1.25, -0.73]}
    ...

``logits`` are the teacher's raw outputs in eval mode (one value for a regression task, on the
task's own scale, e.g. 0-5 for STS-B). Ids include the swapped copies (``train-7:swap``) when the
predictions were made for training on both sentence orders.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from selftune.data.readers import Record
from selftune.data.tasks import TaskSpec
from selftune.errors import SelftuneError

FORMAT = "selftune-teacher-predictions"


def write_predictions(path: Path, task: TaskSpec, ids: list[str], logits: np.ndarray,
                      model: str, max_seq_length: int | None = None) -> None:
    """Write atomically: a killed run never leaves a file that looks complete."""
    header = {"format": FORMAT, "version": 1, "task": task.name,
              "label_names": list(task.label_names) if task.label_names else None,
              "model": model, "num_examples": len(ids)}
    if max_seq_length is not None:
        header["max_seq_length"] = max_seq_length
    tmp = path.with_name(f".{path.name}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "w") as f:
        f.write(json.dumps(header) + "\n")
        for example_id, row in zip(ids, logits, strict=True):
            f.write(json.dumps({"example_id": example_id,
                                "logits": [round(float(v), 6) for v in np.atleast_1d(row)]})
                    + "\n")
    os.replace(tmp, path)


def cached_max_seq_length(path: Path) -> int | None:
    """The input length a predictions file was made with (None if its header does not say)."""
    with open(path) as f:
        try:
            return json.loads(f.readline()).get("max_seq_length")
        except (json.JSONDecodeError, AttributeError):
            return None


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
            f"training examples (ids {shown}); recompute the predictions on the same data "
            "(same --data-dir, --max-train-samples and --double-unordered)")
