"""The GLUE metrics against their textbook formulas, computed here by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from selftune.data.tasks import get_task
from selftune.metrics import compute_task_metrics, metrics_and_score

GOLD = np.array([1, 0, 1, 1, 0, 0, 1, 0, 1, 1])
PRED = np.array([1, 0, 0, 1, 1, 0, 1, 0, 1, 0])


def one_hot_logits(classes: np.ndarray, n: int = 2) -> np.ndarray:
    return np.eye(n)[classes] * 3.0 - 1.0


def confusion() -> tuple[int, int, int, int]:
    tp = int(np.sum((PRED == 1) & (GOLD == 1)))
    tn = int(np.sum((PRED == 0) & (GOLD == 0)))
    fp = int(np.sum((PRED == 1) & (GOLD == 0)))
    fn = int(np.sum((PRED == 0) & (GOLD == 1)))
    return tp, tn, fp, fn


def test_mrpc_accuracy_f1_and_score():
    tp, tn, fp, fn = confusion()
    values = compute_task_metrics(get_task("mrpc"), one_hot_logits(PRED), GOLD)
    accuracy = 100 * (tp + tn) / len(GOLD)
    f1 = 100 * 2 * tp / (2 * tp + fp + fn)  # of class 1, "equivalent"
    assert values["accuracy"] == pytest.approx(accuracy)
    assert values["f1"] == pytest.approx(f1)
    assert values["score"] == pytest.approx((accuracy + f1) / 2)
    assert metrics_and_score(values) == {"metrics": {"accuracy": accuracy, "f1": f1},
                                         "score": values["score"]}


def test_cola_matthews_correlation():
    tp, tn, fp, fn = confusion()
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    values = compute_task_metrics(get_task("cola"), one_hot_logits(PRED), GOLD)
    assert values["matthews_correlation"] == pytest.approx(100 * mcc)
    assert values["score"] == values["matthews_correlation"]
    # One class predicted throughout (an undertrained CoLA model): MCC 0, not NaN.
    constant = compute_task_metrics(get_task("cola"), one_hot_logits(np.ones(10, int)), GOLD)
    assert constant["matthews_correlation"] == 0.0


def test_stsb_pearson_spearman_and_a_constant_prediction():
    gold = np.array([0.0, 1.2, 2.5, 3.1, 4.0, 5.0])
    pred = np.array([0.3, 0.9, 2.9, 2.8, 4.4, 4.1])
    values = compute_task_metrics(get_task("stsb"), pred.reshape(-1, 1), gold)
    pearson = np.corrcoef(pred, gold)[0, 1]
    ranks = lambda x: np.argsort(np.argsort(x))  # noqa: E731 (no ties here)
    spearman = np.corrcoef(ranks(pred), ranks(gold))[0, 1]
    assert values["pearson"] == pytest.approx(100 * pearson)
    assert values["spearman"] == pytest.approx(100 * spearman)
    # Correlations ignore scale: a model trained on y/5 scores the same.
    assert compute_task_metrics(get_task("stsb"), pred / 5, gold)["pearson"] == \
        pytest.approx(values["pearson"])
    flat = compute_task_metrics(get_task("stsb"), np.full((6, 1), 2.5), gold)
    assert flat["pearson"] == 0.0 and flat["spearman"] == 0.0


def test_mnli_three_classes_take_the_argmax():
    gold = np.array([0, 1, 2, 2, 1])
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 1.0], [5.0, 0.0, 1.0],
                       [0.0, 1.0, 0.5]])
    values = compute_task_metrics(get_task("mnli"), logits, gold)
    assert values["accuracy"] == pytest.approx(80.0)  # the fourth is wrong
