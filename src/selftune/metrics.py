"""GLUE metrics, in percent, and the task score (the mean of a task's metrics, as GLUE does)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
from transformers import EvalPrediction

from selftune.data.tasks import TaskSpec


def _corr(fn: Callable, preds: np.ndarray, labels: np.ndarray) -> float:
    # A constant prediction has no defined correlation; report 0 rather than NaN.
    if np.std(preds) == 0 or np.std(labels) == 0:
        return 0.0
    return float(fn(preds, labels)[0])


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": lambda p, y: float(accuracy_score(y, p)),
    "f1": lambda p, y: float(f1_score(y, p)),
    "matthews_correlation": lambda p, y: float(matthews_corrcoef(y, p)),
    "pearson": lambda p, y: _corr(pearsonr, p, y),
    "spearman": lambda p, y: _corr(spearmanr, p, y),
}


def predictions_from_logits(task: TaskSpec, logits: np.ndarray) -> np.ndarray:
    """Class ids for classification, the scalar score for regression."""
    logits = np.asarray(logits)
    return logits.reshape(-1) if task.is_regression else logits.argmax(axis=-1)


def compute_task_metrics(task: TaskSpec, logits: np.ndarray, labels: np.ndarray) -> dict:
    """All of the task's metrics in percent, plus ``score``, their mean."""
    return metrics_from_predictions(task, predictions_from_logits(task, logits), labels)


def metrics_from_predictions(task: TaskSpec, preds: np.ndarray, labels: np.ndarray) -> dict:
    """:func:`compute_task_metrics` from the predictions (class ids or scores) rather than
    the logits: what a streaming evaluation keeps of each row."""
    labels = np.asarray(labels).reshape(-1)
    values = {name: 100.0 * METRICS[name](preds, labels) for name in task.metrics}
    values["score"] = float(np.mean(list(values.values())))
    return values


def metrics_and_score(values: dict, prefix: str = "") -> dict:
    """``compute_task_metrics``' flat values as results store them: ``{prefix}metrics`` (the
    task's metrics) and ``{prefix}score``."""
    return {f"{prefix}metrics": {k: v for k, v in values.items() if k != "score"},
            f"{prefix}score": values["score"]}


def trainer_metrics_fn(task: TaskSpec) -> Callable[[EvalPrediction], dict]:
    """``compute_metrics`` for ``transformers.Trainer``."""

    def compute(pred: EvalPrediction) -> dict:
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        return compute_task_metrics(task, logits, pred.label_ids)

    return compute
