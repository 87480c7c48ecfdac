"""Readers and the data-source logic, on small files written here."""

from __future__ import annotations

import json

import pytest

from selftune.data.loading import DataOptions, load_task_data, stratified_split
from selftune.data.readers import read_glue_split, read_user_file
from selftune.data.tasks import get_task
from selftune.errors import SelftuneError


def test_glue_tsv_quotes_are_literal(glue_dir):
    records = read_glue_split(get_task("rte"), glue_dir, "train")
    assert len(records) == 16  # a leading quote must not swallow the following lines
    assert records[0]["text_a"] == '"Quoted start of a premise.'
    assert records[0]["label"] == "entailment"
    assert records[1]["example_id"] == "train-1"


def test_mrpc_bom_and_cola_without_header(glue_dir):
    mrpc = read_glue_split(get_task("mrpc"), glue_dir, "train")
    assert [r["label"] for r in mrpc] == ["equivalent", "not_equivalent"]
    cola = read_glue_split(get_task("cola"), glue_dir, "validation")
    assert [r["label"] for r in cola] == ["acceptable", "unacceptable"]
    assert cola[1]["text_a"] == "movie the good was ."


def test_stsb_is_regression(glue_dir):
    data = load_task_data(DataOptions(task="stsb", data_dir=str(glue_dir)))
    assert [r["label"] for r in data.train] == [4.5, 0.75]


def test_labels_become_ids_in_registry_order(glue_dir):
    data = load_task_data(DataOptions(task="rte", data_dir=str(glue_dir)))
    # nyu-mll/glue order: entailment = 0, not_entailment = 1
    assert [r["label"] for r in data.eval_splits["validation"]] == [0, 1, 1, 0]


def test_data_dir_from_environment(glue_dir, monkeypatch):
    monkeypatch.setenv("SELFTUNE_DATA", str(glue_dir))
    assert len(load_task_data(DataOptions(task="rte")).train) == 16


def test_missing_glue_file_names_the_fix(glue_dir):
    with pytest.raises(SelftuneError, match="data not found.*--data-dir"):
        load_task_data(DataOptions(task="sst2", data_dir=str(glue_dir)))


def test_user_csv_tsv_jsonl_agree(tmp_path):
    rows = [("a good movie", "pos"), ('"quoted" plot', "neg"), ("it was dull", "neg")]
    (tmp_path / "d.csv").write_text("text,label\n" + "".join(
        f'"{t.replace(chr(34), chr(34) * 2)}",{y}\n' for t, y in rows))
    (tmp_path / "d.tsv").write_text("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n"
                                              for t, y in rows))
    parsed = [read_user_file(tmp_path / f"d.{ext}", ["text"], "label")
              for ext in ("csv", "tsv", "jsonl")]
    assert parsed[0] == parsed[1] == parsed[2]
    assert parsed[0][1]["text_a"] == '"quoted" plot'


def test_user_files_label_ids_and_unseen_dev_label(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\na,neg\nb,pos\nc,pos\n")
    (tmp_path / "dev.csv").write_text("text,label\na,pos\nb,neutral\n")
    with pytest.raises(SelftuneError, match=r"label\(s\) \['neutral'\] never occur"):
        load_task_data(DataOptions(train_file=str(tmp_path / "train.csv"),
                                   validation_file=str(tmp_path / "dev.csv")))
    (tmp_path / "dev.csv").write_text("text,label\na,pos\nb,neg\n")
    data = load_task_data(DataOptions(train_file=str(tmp_path / "train.csv"),
                                      validation_file=str(tmp_path / "dev.csv")))
    assert data.task.label_names == ("neg", "pos")
    assert [r["label"] for r in data.eval_splits["validation"]] == [1, 0]


def test_numeric_labels_sort_numerically_and_fractions_mean_regression(tmp_path):
    (tmp_path / "c.csv").write_text("text,label\na,10\nb,2\nc,2\n")
    data = load_task_data(DataOptions(train_file=str(tmp_path / "c.csv"),
                                      validation_file=str(tmp_path / "c.csv")))
    assert data.task.label_names == ("2", "10")
    (tmp_path / "r.csv").write_text("text,label\na,0.5\nb,2\nc,4.25\n")
    data = load_task_data(DataOptions(train_file=str(tmp_path / "r.csv"),
                                      validation_file=str(tmp_path / "r.csv")))
    assert data.task.is_regression and data.train[2]["label"] == 4.25


@pytest.mark.parametrize("content, message", [
    ("text,label\n", "no data rows"),
    ("", "no data rows"),
    ("text,label\n,pos\nb,neg\n", "empty text"),
    ("text,label\na,\nb,neg\n", "empty label"),
    ("text;label\na;pos\n", "wrong delimiter"),
    ("text,label\na,1\nb,pos\n", "mixed label types"),
    ("text,label\na,1\nb,2,3\n", "3 fields but the header has 2"),
])
def test_bad_user_files(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(SelftuneError, match=message):
        load_task_data(DataOptions(train_file=str(path), validation_file=str(path)))


def test_undecodable_bytes_name_the_line(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes(b"text,label\ngood,1\ncaf\xe9,0\n")
    with pytest.raises(SelftuneError, match="not valid utf-8 at line 3"):
        read_user_file(path, ["text"], "label")


@pytest.mark.parametrize("bad", ["NaN", "Infinity", "-Infinity"])
def test_nan_regression_label_is_refused(tmp_path, bad):
    path = tmp_path / "r.jsonl"
    path.write_text(f'{{"text": "a", "label": 0.5}}\n{{"text": "b", "label": {bad}}}\n')
    with pytest.raises(SelftuneError, match="NaN or infinite"):
        load_task_data(DataOptions(train_file=str(path), validation_file=str(path)))


def test_stratified_split_is_seeded_and_stratified():
    records = [{"example_id": f"{lab}-{i}", "text_a": "x", "label": lab}
               for lab in ("pos", "neg") for i in range(50 if lab == "pos" else 150)]
    train, dev = stratified_split(records, 0.1, seed=0)
    again, dev_again = stratified_split(records, 0.1, seed=0)
    assert [r["example_id"] for r in dev] == [r["example_id"] for r in dev_again]
    assert len(dev) == 20 and sum(r["label"] == "pos" for r in dev) == 5
    assert not {r["example_id"] for r in train} & {r["example_id"] for r in dev}
    _, other = stratified_split(records, 0.1, seed=1)
    assert [r["example_id"] for r in other] != [r["example_id"] for r in dev]


def test_unknown_task():
    with pytest.raises(SelftuneError, match="unknown task 'glue'"):
        get_task("glue")
    assert get_task("SST-2").name == "sst2" and get_task("STS-B").name == "stsb"


def test_ag_news_csv_rows_and_an_empty_file(tmp_path):
    from selftune.data.readers import read_ag_news_split

    folder = tmp_path / "ag_news"
    folder.mkdir()
    (folder / "test.csv").write_text('"3","Stocks rise","Markets, up again"\n'
                                     '"2","Cup final","A late goal"\n')
    records = read_ag_news_split(get_task("ag_news"), tmp_path, "test")
    assert [r["label"] for r in records] == ["Business", "Sports"]
    assert records[0]["text_a"] == "Stocks rise Markets, up again"
    (folder / "test.csv").write_text("")
    with pytest.raises(SelftuneError, match="file is empty"):
        read_ag_news_split(get_task("ag_news"), tmp_path, "test")


def test_text_columns_are_one_or_two_names_spaces_and_empty_items_dropped():
    from selftune.data.loading import parse_text_columns

    assert parse_text_columns("premise, ") == ("premise",)
    assert parse_text_columns(" a ,b") == ("a", "b")
    for bad in ("", " , ", "a,b,c"):
        with pytest.raises(SelftuneError, match="--text-columns takes one column"):
            parse_text_columns(bad)
