"""BAM! over a task list (--tasks-file): registry tasks and the user's own files in one student."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from transformers import AutoConfig

from selftune.cli import main
from selftune.errors import SelftuneError
from selftune.multitask.task_list import file_hash, load_task_list
from selftune.multitask.training import train_multitask
from selftune.recipes.bam import BamConfig, run_bam

from .conftest import make_tiny_model, sentiment_rows, write_csv
from .test_training import StopAfterFirstSave


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def similarity_rows(n: int, seed: int) -> list[dict]:
    """Sentence pairs with a 0-1 similarity score (a regression task), keyed by an id column."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.choice(["good", "bad"]), rng.choice(["good", "bad", "dull"])
        rows.append({"uid": f"p{seed}-{i}", "first": f"the movie was {a}",
                     "second": f"the film was {b}", "score": 0.9 if a == b else 0.1 + 0.01 * i})
    return rows


@pytest.fixture()
def own_files(tmp_path) -> Path:
    """A folder with two own tasks: a sentiment csv (row-number ids) and a similarity jsonl."""
    folder = tmp_path / "own"
    folder.mkdir()
    write_csv(folder / "reviews_train.csv", ["text", "label"], sentiment_rows(24, 0))
    write_csv(folder / "reviews_dev.csv", ["text", "label"], sentiment_rows(8, 1))
    write_jsonl(folder / "pairs_train.jsonl", similarity_rows(12, 0))
    write_jsonl(folder / "pairs_dev.jsonl", similarity_rows(6, 1))
    return folder


REVIEWS = {"name": "reviews", "train_file": "reviews_train.csv",
           "validation_file": "reviews_dev.csv"}
PAIRS = {"name": "pairs", "train_file": "pairs_train.jsonl", "validation_file": "pairs_dev.jsonl",
         "text_columns": ["first", "second"], "label_column": "score",
         "label_type": "regression", "id_column": "uid"}


def write_task_list(folder: Path, tasks: list, suffix: str = ".yaml") -> Path:
    import yaml

    path = folder / f"tasks{suffix}"
    path.write_text(json.dumps({"tasks": tasks}) if suffix == ".json"
                    else yaml.safe_dump({"tasks": tasks}))
    return path


def bam_config(tiny_model, glue_dir, tasks_file, out, **kw) -> BamConfig:
    values = dict(tasks_file=str(tasks_file), model=str(tiny_model), data_dir=str(glue_dir),
                  output_dir=str(out), num_train_epochs=1, per_device_train_batch_size=8,
                  learning_rate=1e-3, teacher_epochs=1, teacher_batch_size=8, seed=3)
    values.update(kw)
    return BamConfig(**values)


def test_registry_and_own_tasks_mix_in_one_bam_student(tiny_model, glue_dir, own_files,
                                                       tmp_path):
    tasks_file = write_task_list(own_files, ["rte", REVIEWS, PAIRS])
    cfg = bam_config(tiny_model, glue_dir, tasks_file, tmp_path / "bam", finetune_after=True)
    summary = run_bam(cfg)
    root = tmp_path / "bam"
    assert summary["tasks"] == ["rte", "reviews", "pairs"]
    assert set(summary["teachers"]) == set(summary["student"]) == set(summary["finetuned"]) == {
        "rte", "reviews", "pairs"}
    # The own teachers are `selftune train` runs on the task's files and columns.
    teacher = json.loads((root / "teachers" / "pairs" / "run_config.json").read_text())
    assert (teacher["train_file"], teacher["text_columns"], teacher["id_column"]) == (
        str((own_files / "pairs_train.jsonl").resolve()), "first,second", "uid")
    # Predictions are cached by the id column, or the row number with the file's hash.
    digest = file_hash(own_files / "reviews_train.csv")
    cached = (root / "teachers" / "reviews" / "train_predictions.jsonl").read_text().splitlines()
    assert [json.loads(line)["example_id"] for line in cached[1:3]] == [f"0@{digest}",
                                                                       f"1@{digest}"]
    cached = (root / "teachers" / "pairs" / "train_predictions.jsonl").read_text().splitlines()
    assert json.loads(cached[1])["example_id"] == "p0-0"
    # Each task is exported as a standard model with its own labels (or as a regression).
    assert AutoConfig.from_pretrained(root / "student" / "tasks" / "reviews").id2label == {
        0: "0", 1: "1"}
    assert AutoConfig.from_pretrained(root / "student" / "tasks" / "pairs").num_labels == 1
    assert (root / "finetuned" / "pairs" / "model.safetensors").is_file()
    saved = json.loads((root / "student" / "run_config.json").read_text())
    assert [t["name"] for t in json.loads(saved["task_list"])] == ["rte", "reviews", "pairs"]

    stamps = {p: p.stat().st_mtime for p in root.rglob("metrics.json")}
    assert run_bam(cfg)["student"] == summary["student"]  # every stage reused
    assert {p: p.stat().st_mtime for p in root.rglob("metrics.json")} == stamps
    # Another column in the task list is another student: not taken for this one's.
    write_task_list(own_files, ["rte", REVIEWS, {**PAIRS, "label_type": "auto"}])
    with pytest.raises(SelftuneError, match=r"pairs holds a finished run with other options "
                                            r"\(label_type\)"):
        run_bam(cfg)  # the same options object, read again


def test_a_changed_own_file_is_never_served_its_old_predictions(tiny_model, glue_dir,
                                                                 own_files, tmp_path):
    tasks_file = write_task_list(own_files, [REVIEWS])
    cfg = bam_config(tiny_model, glue_dir, tasks_file, tmp_path / "bam", teachers_only=True)
    run_bam(cfg)
    cache = tmp_path / "bam" / "teachers" / "reviews" / "train_predictions.jsonl"
    before = cache.read_text()
    run_bam(cfg)
    assert cache.read_text() == before  # the same file: reused
    # Same texts, one label changed: the row ids no longer match, the cache is made again.
    rows = sentiment_rows(24, 0)
    rows[0] = (rows[0][0], 1 - rows[0][1])
    write_csv(own_files / "reviews_train.csv", ["text", "label"], rows)
    run_bam(cfg)
    ids = [json.loads(line)["example_id"] for line in cache.read_text().splitlines()[1:]]
    assert ids[0] == f"0@{file_hash(own_files / 'reviews_train.csv')}"
    assert cache.read_text() != before


def test_multi_over_own_tasks_resumes_exactly(tiny_model, glue_dir, own_files, tmp_path,
                                              monkeypatch):
    """--teachers none (plain Multi) over own files, interrupted and resumed."""
    tasks_file = write_task_list(own_files, [REVIEWS, PAIRS], ".json")
    reference = run_bam(bam_config(tiny_model, glue_dir, tasks_file, tmp_path / "ref",
                                   teachers="none", num_train_epochs=2))
    from selftune import lifecycle

    with monkeypatch.context() as patch:
        # The probe where every run's Trainer callbacks are made (the only run: the student).
        patch.setattr(lifecycle, "LogToFile", StopAfterFirstSave)
        with pytest.raises(KeyboardInterrupt):
            run_bam(bam_config(tiny_model, glue_dir, tasks_file, tmp_path / "run",
                               teachers="none", num_train_epochs=2))
    resumed = run_bam(bam_config(tiny_model, glue_dir, tasks_file, tmp_path / "run",
                                 teachers="none", num_train_epochs=2))
    assert "teachers" not in resumed
    assert resumed["student"] == reference["student"]
    metrics = json.loads((tmp_path / "run" / "student" / "metrics.json").read_text())
    assert metrics["resumed_from"] and not metrics["with_teachers"]


def test_a_task_list_drives_a_multitask_run_from_python(tiny_model, own_files, tmp_path):
    tasks_file = write_task_list(own_files, [REVIEWS, PAIRS])
    mt_config = train_config(tiny_model, tasks_file, tmp_path / "mt")
    result = train_multitask(mt_config)
    assert set(result["tasks"]) == {"reviews", "pairs"}
    assert mt_config.tasks == "reviews,pairs"
    assert result["num_train_examples"] == {"reviews": 24, "pairs": 12}


def train_config(tiny_model, tasks_file, out):
    from selftune.multitask.training import MultiTaskConfig

    return MultiTaskConfig(tasks_file=str(tasks_file), model=str(tiny_model), output_dir=str(out),
                           num_train_epochs=1, per_device_train_batch_size=8)


def test_given_teachers_for_own_tasks_must_predict_what_the_task_is(tiny_model, glue_dir,
                                                                    own_files, tmp_path):
    tasks_file = write_task_list(own_files, [REVIEWS, PAIRS])
    classifier = make_tiny_model(tmp_path / "classifier", with_head=True)
    regressor = make_tiny_model(tmp_path / "regressor", with_head=True, num_labels=1)
    for teachers, message in (
            (f"reviews={classifier},pairs={classifier}", "classifier but task pairs is not"),
            (f"reviews={regressor},pairs={regressor}", "regression but task reviews is not")):
        cfg = bam_config(tiny_model, glue_dir, tasks_file, tmp_path / "bam", teachers=teachers)
        with pytest.raises(SelftuneError, match=f"--teachers: .*{message}"):
            run_bam(cfg)
        assert not (tmp_path / "bam").exists()
    # The right kinds: each teacher's predictions are cached beside it, the student trains.
    cfg = bam_config(tiny_model, glue_dir, tasks_file, tmp_path / "bam",
                     teachers=f"reviews={classifier},pairs={regressor}")
    summary = run_bam(cfg)
    assert set(summary["student"]) == {"reviews", "pairs"}
    assert (regressor / "train_predictions.jsonl").is_file()


@pytest.mark.parametrize("tasks, message", [
    (["rte", "RTE"], "task 'rte' is named twice"),
    ([REVIEWS, {**PAIRS, "name": "Reviews"}], "task 'Reviews' is named twice"),
    ([{**REVIEWS, "train_file": "gone.csv"}], r"task 1 \(reviews\): train_file .*gone.csv not "
                                              "found"),
    ([REVIEWS, {**PAIRS, "validation_file": "pairs_nolabel.jsonl"}],
     r"task pairs: .*pairs_nolabel.jsonl: column\(s\) \['score'\] not found"),
    ([REVIEWS, {**REVIEWS, "name": "copy", "train_file": "copy.csv"}],
     "tasks 'reviews' and 'copy' train on the same file"),
    ([{**REVIEWS, "name": "../up"}], "the name becomes a folder name"),
    ([{**REVIEWS, "name": "a/b"}], "the name becomes a folder name"),
    ([{**REVIEWS, "name": "mrpc"}], "'mrpc' is a registry task's name"),
    ([{**REVIEWS, "labels": "label"}], r"unknown key\(s\) \['labels'\]"),
    ([{**REVIEWS, "label_type": "ordinal"}], "label_type 'ordinal' is not one of"),
    ([{"name": "reviews", "train_file": "reviews_train.csv"}], "give both train_file and"),
    (["nope"], "'nope' is not a registry task"),
    ([], "expected a list of tasks"),
])
def test_each_task_list_mistake_gets_one_error_before_any_training(tasks, message, tiny_model,
                                                                   glue_dir, own_files,
                                                                   tmp_path):
    shutil.copy(own_files / "reviews_train.csv", own_files / "copy.csv")
    write_jsonl(own_files / "pairs_nolabel.jsonl",
                [{k: v for k, v in row.items() if k != "score"} for row in similarity_rows(3, 2)])
    cfg = bam_config(tiny_model, glue_dir, write_task_list(own_files, tasks), tmp_path / "bam")
    with pytest.raises(SelftuneError, match=message):
        run_bam(cfg)
    assert not (tmp_path / "bam").exists()


def test_a_task_list_counts_in_the_options_hash_by_content_not_by_place():
    listed = BamConfig(tasks_file="tasks.yaml", task_list='[{"name": "rte"}]')
    assert BamConfig(tasks_file="elsewhere/tasks.yaml", task_list=listed.task_list).hash() == \
        listed.hash()
    assert BamConfig(tasks_file="tasks.yaml", task_list='[{"name": "mrpc"}]').hash() != \
        listed.hash()
    assert BamConfig().hash() != listed.hash()


def test_task_list_file_mistakes_and_the_command_line(tiny_model, glue_dir, own_files, tmp_path,
                                                      capsys):
    (own_files / "extra.yaml").write_text("tasks: [rte]\nseed: 3\n")
    with pytest.raises(SelftuneError, match=r"unknown key\(s\) \['seed'\]"):
        load_task_list(own_files / "extra.yaml")
    with pytest.raises(SelftuneError, match="file not found"):
        load_task_list(own_files / "none.yaml")
    tasks_file = write_task_list(own_files, [REVIEWS])
    with pytest.raises(SelftuneError, match="--tasks or with --tasks-file, not both"):
        run_bam(bam_config(tiny_model, glue_dir, tasks_file, tmp_path / "bam", tasks="rte"))
    # An own task in --tasks: the error points to the task list (not to --train-file).
    assert main(["bam", "--tasks", "rte,mytask", "--output-dir", str(tmp_path / "cli")]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'mytask'" in err and "--tasks-file" in err and "--train-file" not in err
    # On the command line: one line, exit status 2, nothing written.
    bad = write_task_list(own_files, ["rte", "rte"])
    code = main(["bam", "--tasks-file", str(bad), "--model", str(tiny_model),
                 "--output-dir", str(tmp_path / "cli")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "named twice" in err
    assert not (tmp_path / "cli").exists()


def test_two_process_bam_over_a_task_list(tiny_model, glue_dir, own_files, tmp_path):
    from .test_distributed import selftune

    tasks_file = write_task_list(own_files, ["rte", REVIEWS])
    out = tmp_path / "bam"
    selftune(["bam", "--tasks-file", str(tasks_file), "--model", str(tiny_model), "--data-dir",
              str(glue_dir), "--output-dir", str(out), "--num-train-epochs", "1",
              "--per-device-train-batch-size", "4", "--teacher-epochs", "1",
              "--teacher-batch-size", "8"], 2)
    summary = json.loads((out / "bam.json").read_text())
    assert set(summary["student"]) == {"rte", "reviews"}
    student = json.loads((out / "student" / "metrics.json").read_text())
    # 16 RTE + 24 review examples in global batches of 8 (two ranks of 4): 5 steps.
    assert student["with_teachers"] and student["global_steps"] == 5
    assert (out / "student" / "tasks" / "reviews" / "model.safetensors").is_file()
    assert not list(out.rglob(".*.tmp"))
