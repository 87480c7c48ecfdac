"""Parsing of the real files in ../shared/data, with their quirks (skipped without the folder)."""

from __future__ import annotations

import pytest

from selftune.data.loading import DataOptions, load_task_data

from .conftest import SHARED_DATA

pytestmark = pytest.mark.skipif(not SHARED_DATA.is_dir(),
                                reason=f"shared benchmark data not found at {SHARED_DATA}")

# Row counts from ../shared/data/README.md (QUOTE_NONE parsing; blank lines skipped).
EXPECTED = {
    "cola": (8551, 1043), "sst2": (67349, 872), "mrpc": (3668, 408), "stsb": (5749, 1500),
    "rte": (2490, 277), "wnli": (635, 71),
}


@pytest.mark.parametrize("task", sorted(EXPECTED))
def test_glue_row_counts(task):
    data = load_task_data(DataOptions(task=task, data_dir=str(SHARED_DATA)))
    assert (len(data.train), len(data.eval_splits["validation"])) == EXPECTED[task]
    ids = [r["example_id"] for r in data.train]
    assert len(set(ids)) == len(ids)


def test_label_balance_matches_readme():
    rte = load_task_data(DataOptions(task="rte", data_dir=str(SHARED_DATA)))
    assert sum(r["label"] == 0 for r in rte.train) == 1249  # entailment
    mrpc = load_task_data(DataOptions(task="mrpc", data_dir=str(SHARED_DATA)))
    assert sum(r["label"] == 1 for r in mrpc.train) == 2474
    assert not mrpc.train[0]["text_a"].startswith("\ufeff")
    cola = load_task_data(DataOptions(task="cola", data_dir=str(SHARED_DATA)))
    assert sum(r["label"] == 1 for r in cola.eval_splits["validation"]) == 721


def test_stsb_scores_and_quotes_survive():
    data = load_task_data(DataOptions(task="stsb", data_dir=str(SHARED_DATA)))
    scores = [r["label"] for r in data.train]
    assert min(scores) == 0.0 and max(scores) == 5.0
    # With default CSV quoting some texts would start with a swallowed '"'; here they stay.
    assert any(r["text_a"].startswith('"') for r in data.train + data.eval_splits["validation"])


@pytest.mark.parametrize("task, total", [("mr", 10662), ("cr", 3771), ("mpqa", 10603)])
def test_pos_neg_sets_split_90_10(task, total):
    data = load_task_data(DataOptions(task=task, data_dir=str(SHARED_DATA)))
    dev = data.eval_splits["validation"]
    assert len(data.train) + len(dev) == total
    assert abs(len(dev) - round(0.1 * total)) <= 1


def test_mr_is_latin1():
    data = load_task_data(DataOptions(task="mr", data_dir=str(SHARED_DATA)))
    assert any("\xe9" in r["text_a"] for r in data.train + data.eval_splits["validation"])


def test_imdb_archives():
    data = load_task_data(DataOptions(task="imdb", data_dir=str(SHARED_DATA),
                                      max_train_samples=10), include_train=True)
    test = data.eval_splits["test"]
    assert len(test) == 25000 and sum(r["label"] == 1 for r in test) == 12500
    assert all("<br />" not in r["text_a"] for r in test[:500])


def test_ag_news_has_no_train_split_here():
    from selftune.errors import SelftuneError

    with pytest.raises(SelftuneError, match="only\\s+test.csv|has only test.csv"):
        load_task_data(DataOptions(task="ag_news", data_dir=str(SHARED_DATA)))
    data = load_task_data(DataOptions(task="ag_news", data_dir=str(SHARED_DATA)),
                          include_train=False)
    assert len(data.eval_splits["test"]) == 7600
