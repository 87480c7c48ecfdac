"""Which saved models `evaluate` and the BAM! teachers accept for a task: the class checks."""

from __future__ import annotations

import logging

import pytest

from selftune.data.tasks import get_task
from selftune.errors import SelftuneError
from selftune.evaluation import check_label_order, check_task_matches


def test_the_tasks_own_classes_pass_silently(caplog):
    with caplog.at_level(logging.WARNING, logger="selftune"):
        check_task_matches(get_task("rte"), ("Entailment", "not_entailment"), "m")
        # One class spelled two ways across tasks: SST-2's negative/positive are IMDb's neg/pos.
        check_task_matches(get_task("imdb"), ("negative", "positive"), "m")
    assert caplog.records == []


def test_the_tasks_classes_in_another_order_are_refused():
    with pytest.raises(SelftuneError, match="permuted"):
        check_label_order("m", get_task("rte"), ("not_entailment", "entailment"))
    with pytest.raises(SelftuneError, match="permuted"):
        check_label_order("m", get_task("sst2"), ("pos", "neg"))


def test_another_tasks_classes_are_refused():
    with pytest.raises(SelftuneError, match="classes of qnli/rte/wnli .* not those of mrpc"):
        check_task_matches(get_task("mrpc"), ("entailment", "not_entailment"), "m")
    with pytest.raises(SelftuneError, match="classes of cola"):
        check_label_order("m", get_task("sst2"), ("unacceptable", "acceptable"))


def test_names_of_no_task_are_taken_in_the_tasks_order_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="selftune"):
        check_label_order("m", get_task("mrpc"), ("LABEL_0", "LABEL_1"))
        check_label_order("m", get_task("rte"), ("yes", "no"))
    assert [r.getMessage() for r in caplog.records] == [
        "m names its classes ['LABEL_0', 'LABEL_1']; taken to be ['not_equivalent', "
        "'equivalent'], in that order",
        "m names its classes ['yes', 'no']; taken to be ['entailment', 'not_entailment'], in "
        "that order"]


def test_kind_and_number_of_classes_are_checked():
    with pytest.raises(SelftuneError, match="is a classifier but task stsb is not"):
        check_task_matches(get_task("stsb"), ("a", "b"), "m")
    with pytest.raises(SelftuneError, match="is a regression but task rte is not"):
        check_task_matches(get_task("rte"), None, "m")
    with pytest.raises(SelftuneError, match="predicts 3 classes"):
        check_task_matches(get_task("rte"), ("a", "b", "c"), "m")
