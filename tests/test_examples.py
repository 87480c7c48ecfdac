"""The README's quick start (examples/bam_own_tasks.py) end to end on a tiny model and small files
shaped like the shared data: it writes the own tasks in three formats, runs Multi and BAM!, records
both and prints the comparison."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import make_tiny_model, sentiment_rows

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "bam_own_tasks.py"


def write_shared_like_data(root: Path) -> Path:
    """mr/, cr/, mpqa/ polarity files (MR in latin-1, blank lines as in CR/MPQA), AG News' csv
    (no header, classes 1-4, a backslash for a line break), SST-2 and STS-B."""
    rows = sentiment_rows(60, seed=3)
    (root / "ag_news").mkdir(parents=True)
    with open(root / "ag_news" / "test.csv", "w", encoding="utf-8", newline="") as file:
        csv.writer(file, quoting=csv.QUOTE_ALL).writerows(
            (str(1 + i % 4), f"headline {text}", f"the story\\{text}")
            for i, (text, _) in enumerate(rows))
    for folder, stem, encoding in (("mr", "rt-polarity", "latin-1"), ("cr", "custrev", "ascii"),
                                   ("mpqa", "mpqa", "ascii")):
        (root / folder).mkdir(parents=True)
        for label, suffix in enumerate(("neg", "pos")):
            lines = [text for text, y in rows if y == label]
            if folder == "mr":
                lines[0] += " caf\xe9"  # a latin-1 byte, as in the real MR files
            (root / folder / f"{stem}.{suffix}").write_text("\n".join([*lines, "", ""]),
                                                            encoding=encoding)
    sst2 = root / "glue" / "SST-2"
    sst2.mkdir(parents=True)
    table = "sentence\tlabel\n" + "".join(f"{text}\t{y}\n" for text, y in rows)
    (sst2 / "train.tsv").write_text(table)
    (sst2 / "dev.tsv").write_text(table)
    stsb = root / "glue" / "STS-B"
    stsb.mkdir(parents=True)
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\t" \
             "sentence2\tscore\n"
    sentences = [text for text, _ in rows]
    pairs = header + "".join(f"{i}\tg\tf\t2012\t{i}\tnone\tnone\t{a}\t{b}\t{i % 6}.000\n"
                             for i, (a, b) in enumerate(zip(sentences, reversed(sentences),
                                                            strict=True)))
    (stsb / "train.tsv").write_text(pairs)
    (stsb / "dev.tsv").write_text(pairs)
    return root


def run_example(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    data = write_shared_like_data(tmp_path / "data")
    model = make_tiny_model(tmp_path / "model")
    return subprocess.run(
        [sys.executable, str(EXAMPLE), "--data-dir", str(data), "--work-dir",
         str(tmp_path / "work"), "--model", str(model), "--max-train-samples", "24",
         "--epochs", "1", "--record", str(tmp_path / "results.jsonl"), *argv],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})


def test_the_mixed_task_set_writes_news_with_two_text_columns_with_stsb(tmp_path):
    done = run_example(tmp_path, "--task-set", "mixed")
    assert done.returncode == 0, done.stderr[-3000:]
    work, results = tmp_path / "work" / "mixed", tmp_path / "results.jsonl"

    # News as a csv with two text columns and string topics; a tenth of the rows is the dev set.
    with open(work / "news" / "train.csv", encoding="utf-8") as file:
        news = list(csv.DictReader(file))
    assert set(news[0]) == {"title", "description", "topic"} and len(news) == 54
    assert {r["topic"] for r in news} == {"World", "Sports", "Business", "Sci/Tech"}
    assert all("\\" not in r["description"] for r in news)  # line breaks become spaces
    products = [json.loads(line) for line in
                (work / "products" / "dev.jsonl").read_text().splitlines()]
    assert len(products) == 6 and set(products[0]) == {"review_id", "review", "sentiment"}
    assert (work / "opinions" / "train.tsv").read_text().startswith("phrase\tpolarity\n")
    assert_recorded_and_printed(done, work, results, {"news", "products", "opinions", "stsb"})
    # The mixed set's teachers: the student's learning rate, 3 epochs.
    record = json.loads(results.read_text().splitlines()[-1])["options"]
    assert record["task_set"] == "mixed" and record["teacher_learning_rate"] == 1e-4
    assert record["teacher_epochs"] == 3.0


def test_the_quick_start_runs_multi_and_bam_on_own_files_and_compares_them(tmp_path):
    done = run_example(tmp_path)  # the default task set: sentiment
    assert done.returncode == 0, done.stderr[-3000:]
    work, results = tmp_path / "work" / "sentiment", tmp_path / "results.jsonl"

    # The own tasks, each in its own format, with a tenth of the rows as the dev set.
    with open(work / "movies" / "train.csv", encoding="utf-8") as file:
        movies = list(csv.DictReader(file))
    assert set(movies[0]) == {"sentence", "label"}
    assert {r["label"] for r in movies} == {"negative", "positive"}
    assert any("caf\xe9" in r["sentence"] for r in movies) or \
        "caf\xe9" in (work / "movies" / "dev.csv").read_text(encoding="utf-8")
    products = [json.loads(line) for line in
                (work / "products" / "dev.jsonl").read_text().splitlines()]
    assert len(products) == 6 and set(products[0]) == {"review_id", "review", "sentiment"}
    assert (work / "opinions" / "train.tsv").read_text().startswith("phrase\tpolarity\n")
    assert len((work / "opinions" / "train.tsv").read_text().splitlines()) == 1 + 54
    assert_recorded_and_printed(done, work, results, {"movies", "products", "opinions", "sst2"})


def assert_recorded_and_printed(done: subprocess.CompletedProcess, work: Path, results: Path,
                                tasks: set[str]) -> None:
    # Both recipes ran and were recorded, with every task's score.
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["variant"] for r in records] == ["multi", "bam"]
    for record in records:
        assert set(record["scores"]) == tasks
        assert record["average"] == pytest.approx(sum(record["scores"].values()) / 4)
    assert (work / "bam-seed0" / "teachers" / "products" / "metrics.json").is_file()
    assert not (work / "multi-seed0" / "teachers").exists()

    # The table: one line per task and the average: teachers, Multi, BAM!, the gain.
    lines = {line.split()[0]: line.split() for line in done.stdout.splitlines() if line.strip()}
    multi, bam = records
    teachers = json.loads((work / "bam-seed0" / "bam.json").read_text())["teachers"]
    assert bam["teacher_scores"] == teachers
    for task in [*tasks, "average"]:
        got = [float(x) for x in lines[task][1:5]]
        if task == "average":
            want = [sum(teachers.values()) / 4, multi["average"], bam["average"]]
        else:
            want = [teachers[task], multi["scores"][task], bam["scores"][task]]
        want.append(want[2] - want[1])
        assert got == pytest.approx([round(w, 2) for w in want], abs=0.0051)


def test_the_quick_start_names_missing_data_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, str(EXAMPLE), "--data-dir", str(tmp_path),
                           "--work-dir", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert "ag_news/, mr/, cr/ and mpqa/" in done.stderr
