"""``predict`` and ``evaluate`` stream their input: chunk by chunk, the same numbers as one pass,
rows written as they are done into a temporary file that only a complete run renames to the
output, and a model's pair/single training checked against its input."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from selftune import evaluation
from selftune.cli import main
from selftune.config import TrainConfig
from selftune.data.loading import DataOptions
from selftune.data.readers import iter_user_records, read_user_file
from selftune.data.tasks import custom_task
from selftune.errors import SelftuneError
from selftune.evaluation import (
    NUM_TEXTS_KEY,
    chunk_rows_for,
    evaluate_model,
    predict_file,
    predict_logits,
    trained_num_texts,
)
from selftune.metrics import compute_task_metrics
from selftune.models.loading import load_finetuned, load_tokenizer
from selftune.outputs import RUN_CONFIG_FILE
from tests.conftest import make_tiny_model, sentiment_rows, write_csv


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def varied_rows(n: int) -> list[tuple[str, int]]:
    """Sentences of several lengths, so that how rows are batched changes padding and packing."""
    return [(" ".join(["really"] * (i % 7) + [text]), label)
            for i, (text, label) in enumerate(sentiment_rows(n, 5))]


@pytest.fixture()
def labelled_file(tmp_path) -> Path:
    return write_csv(tmp_path / "data.csv", ["text", "label"], varied_rows(40))


@pytest.fixture(scope="session")
def tiny_regressor(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-regressor"), with_head=True,
                           num_labels=1, problem_type="regression")


def leftovers(folder: Path) -> list[str]:
    """Temporary files predict may have left beside its output."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# ---- chunked output is the one-pass output, bit for bit


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".tsv"])
def test_chunked_predictions_equal_one_pass(tmp_path, tiny_classifier, labelled_file, packing,
                                            suffix):
    one_pass = tmp_path / f"one{suffix}"
    chunked = tmp_path / f"chunked{suffix}"
    # A chunk larger than the file is the implementation before streaming: every row
    # tokenized, then one loop over all batches.
    args = (str(tiny_classifier), str(labelled_file))
    assert predict_file(*args, str(one_pass), ("text",), None, 64, 3, packing=packing,
                        chunk_rows=10**9) == 40
    assert predict_file(*args, str(chunked), ("text",), None, 64, 3, packing=packing,
                        chunk_rows=5) == 40  # rounded up to 6 rows: 7 chunks, the last of 4
    assert chunked.read_bytes() == one_pass.read_bytes()
    assert leftovers(tmp_path) == []


def test_chunks_are_whole_batches():
    assert chunk_rows_for(3, 5) == 6
    assert chunk_rows_for(4, 8) == 8
    assert chunk_rows_for(128, 1) == 128
    assert chunk_rows_for(128) % 128 == 0


def test_predictions_match_a_direct_pass_over_all_rows(tmp_path, tiny_classifier,
                                                       labelled_file):
    """The streamed file against logits computed here in one call over the whole file."""
    out = tmp_path / "p.jsonl"
    predict_file(str(tiny_classifier), str(labelled_file), str(out), ("text",), None, 64, 4,
                 chunk_rows=8)
    model = load_finetuned(str(tiny_classifier))
    records = read_user_file(labelled_file, ["text"], None)
    logits = predict_logits(model, load_tokenizer(str(tiny_classifier)), records, 64, 4)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["example_id"] for r in rows] == [str(i) for i in range(40)]
    written = np.array([[r["prob_LABEL_0"], r["prob_LABEL_1"]] for r in rows])
    np.testing.assert_allclose(written, probs, rtol=1e-6)
    assert [r["label"] for r in rows] == [f"LABEL_{i}" for i in probs.argmax(axis=1)]


@pytest.mark.parametrize("model_name", ["tiny_classifier", "tiny_regressor"])
def test_evaluate_metrics_unchanged_by_streaming(request, tmp_path, model_name):
    model_dir = str(request.getfixturevalue(model_name))
    rows = [(text, label if model_name == "tiny_classifier" else label + 0.25 * (i % 4))
            for i, (text, label) in enumerate(varied_rows(40))]
    dev = write_csv(tmp_path / "dev.csv", ["text", "label"], rows)
    options = DataOptions(validation_file=str(dev))
    one_pass = evaluate_model(model_dir, options, None, 64, 3, chunk_rows=10**9)
    chunked = evaluate_model(model_dir, options, None, 64, 3, chunk_rows=5)
    assert chunked == one_pass
    assert chunked["num_examples"] == 40
    # And as the metrics were computed before streaming: from all logits at once.
    model = load_finetuned(model_dir)
    records = read_user_file(dev, ["text"], "label")
    logits = predict_logits(model, load_tokenizer(model_dir), records, 64, 3)
    labels = None if model_name == "tiny_regressor" else ("LABEL_0", "LABEL_1")
    gold = np.array([float(r["label"]) if labels is None else int(r["label"]) for r in records])
    expected = compute_task_metrics(custom_task("custom", 1, labels), logits, gold)
    assert chunked["score"] == expected.pop("score")
    assert chunked["metrics"] == expected


def test_evaluate_a_file_on_a_fixed_subset(tmp_path, tiny_classifier, labelled_file):
    """--max-eval-samples on a labelled file: the rows a registry task's split would keep."""
    import random

    rows = varied_rows(40)
    chosen = sorted(random.Random(0).sample(range(40), 10))
    subset = write_csv(tmp_path / "subset.csv", ["text", "label"], [rows[i] for i in chosen])
    sampled = evaluate_model(str(tiny_classifier), DataOptions(
        validation_file=str(labelled_file), max_eval_samples=10), None, 64, 3, chunk_rows=4)
    direct = evaluate_model(str(tiny_classifier), DataOptions(validation_file=str(subset)),
                            None, 64, 3)
    assert sampled["num_examples"] == 10
    assert sampled["metrics"] == direct["metrics"] and sampled["score"] == direct["score"]
    everything = evaluate_model(str(tiny_classifier), DataOptions(
        validation_file=str(labelled_file), max_eval_samples=40), None, 64, 3)
    assert everything["num_examples"] == 40


# ---- rows are written as they are done; nothing half-written under the final name


class CountingPredictions:
    """Wraps ``predict_logits``: before each chunk, how many rows the temporary output holds
    and how many records the reader has handed out."""

    def __init__(self, monkeypatch, out: Path):
        self.out = out
        self.rows_in_temp_file: list[int] = []
        self.records_read: list[int] = []
        self.read = 0
        real_predict, real_reader = evaluation.predict_logits, evaluation.iter_user_records

        def predict(*args, **kwargs):
            temps = list(out.parent.glob(f".{out.name}.*.tmp"))
            assert len(temps) == 1 and not out.exists()
            self.rows_in_temp_file.append(len(temps[0].read_text().splitlines()))
            self.records_read.append(self.read)
            return real_predict(*args, **kwargs)

        def reader(*args, **kwargs):
            for record in real_reader(*args, **kwargs):
                self.read += 1
                yield record

        monkeypatch.setattr(evaluation, "predict_logits", predict)
        monkeypatch.setattr(evaluation, "iter_user_records", reader)


def test_rows_are_written_chunk_by_chunk(monkeypatch, tmp_path, tiny_classifier, labelled_file):
    out = tmp_path / "p.jsonl"
    counting = CountingPredictions(monkeypatch, out)
    predict_file(str(tiny_classifier), str(labelled_file), str(out), ("text",), None, 64, 4,
                 chunk_rows=8)
    # Before chunk k, the k-1 chunks before it are in the file (flushed, not buffered).
    assert counting.rows_in_temp_file == [0, 8, 16, 24, 32]
    assert len(out.read_text().splitlines()) == 40
    assert leftovers(tmp_path) == []


def test_the_file_is_read_only_as_far_as_the_chunk(monkeypatch, tmp_path, tiny_classifier,
                                                   labelled_file):
    """Memory independent of the file's length: no list of all rows is ever made (a
    ``list(records)`` anywhere would have read all 40 before the first chunk is run)."""
    out = tmp_path / "p.jsonl"
    counting = CountingPredictions(monkeypatch, out)
    predict_file(str(tiny_classifier), str(labelled_file), str(out), ("text",), None, 64, 4,
                 chunk_rows=8)
    assert counting.records_read == [8, 16, 24, 32, 40]


def test_the_reader_is_lazy(tmp_path):
    """The first rows come before the rest of the file is read: an undecodable byte on the
    last line (past the first read buffers) is only met when reading gets there."""
    path = tmp_path / "data.csv"
    path.write_bytes(b"text\n" + b"a good movie\n" * 50_000 + b"bad \xff bytes\n")
    records = iter_user_records(path, ["text"], None)
    assert [next(records)["text_a"] for _ in range(5)] == ["a good movie"] * 5
    with pytest.raises(SelftuneError, match=r"not valid utf-8 at line 50002 \(byte 650009\)"):
        list(records)


@pytest.mark.parametrize("failure", [KeyboardInterrupt, RuntimeError])
def test_an_interrupted_predict_leaves_no_file(monkeypatch, tmp_path, tiny_classifier,
                                               labelled_file, failure):
    out = tmp_path / "p.jsonl"
    real = evaluation.predict_logits
    calls = []

    def fail_on_third_chunk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            assert len(leftovers(tmp_path)) == 1  # two chunks are in the temporary file
            raise failure("stopped mid-stream")
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "predict_logits", fail_on_third_chunk)
    with pytest.raises(failure):
        predict_file(str(tiny_classifier), str(labelled_file), str(out), ("text",), None, 64,
                     4, chunk_rows=8)
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_ctrl_c_during_predict_says_nothing_was_written_not_resume(monkeypatch, capsys, tmp_path,
                                                                   tiny_classifier,
                                                                   labelled_file):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluation, "predict_logits", interrupted)
    out = tmp_path / "p.jsonl"
    code = main(["predict", str(tiny_classifier), "--input-file", str(labelled_file),
                 "--output-file", str(out)])
    err = capsys.readouterr().err
    assert code == 130 and not out.exists()
    assert "no output file was written" in err and "resume" not in err


def test_sigterm_mid_stream_leaves_no_file(monkeypatch, capsys, tmp_path, tiny_classifier,
                                           labelled_file):
    import os
    import signal

    out = tmp_path / "p.jsonl"
    real = evaluation.predict_logits
    calls = []

    def terminated_on_second_chunk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "predict_logits", terminated_on_second_chunk)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        predict_file(str(tiny_classifier), str(labelled_file), str(out), ("text",), None, 64,
                     4, chunk_rows=8)
    assert signal.getsignal(signal.SIGTERM) == before
    assert not out.exists() and leftovers(tmp_path) == []


def test_an_interrupted_predict_keeps_the_previous_output(monkeypatch, capsys, tmp_path,
                                                          tiny_classifier, labelled_file):
    """A bad row deep in the file: the run stops with one line, and the output file of an
    earlier run is left as it was, not half replaced."""
    out = tmp_path / "p.csv"
    out.write_text("earlier predictions\n")
    rows = varied_rows(40)
    rows[33] = ("   ", 0)
    data = write_csv(tmp_path / "data.csv", ["text", "label"], rows)
    code, _, err = run_cli(capsys, "predict", str(tiny_classifier), "--input-file", str(data),
                           "--output-file", str(out), "--batch-size", "4")
    assert code == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("selftune: error:")] == [
        f"selftune: error: {data}:35 column 'text': empty text; remove the row or fill in the "
        "text"]
    assert out.read_text() == "earlier predictions\n"
    assert leftovers(tmp_path) == []


def test_a_full_disk_mid_stream_removes_the_temporary_file(monkeypatch, capsys, tmp_path,
                                                           tiny_classifier, labelled_file):
    import errno
    import os

    out = tmp_path / "p.jsonl"

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    code, _, err = run_cli(capsys, "predict", str(tiny_classifier), "--input-file",
                           str(labelled_file), "--output-file", str(out))
    assert code == 2 and "no space left" in err and "Traceback" not in err
    assert not out.exists()
    assert leftovers(tmp_path) == []


# ---- pair/single mismatch between a model and its input


def model_trained_on(tmp_path: Path, tiny_classifier: Path, name: str, **run) -> Path:
    """The tiny classifier in a folder whose run_config.json says how it was trained."""
    folder = tmp_path / name
    shutil.copytree(tiny_classifier, folder)
    (folder / RUN_CONFIG_FILE).write_text(json.dumps(TrainConfig(**run).to_dict()))
    return folder


@pytest.fixture()
def pair_file(tmp_path) -> Path:
    return write_csv(tmp_path / "pairs.csv", ["premise", "hypothesis", "label"],
                     [(t, t.upper(), label) for t, label in varied_rows(12)])


def test_what_a_folder_says_about_pairs(tmp_path, tiny_classifier):
    assert trained_num_texts(str(tiny_classifier)) is None  # no record: not checked
    assert trained_num_texts("someone/hub-model") is None
    assert trained_num_texts(model_trained_on(tmp_path, tiny_classifier, "rte",
                                              task="rte")) == 2
    assert trained_num_texts(model_trained_on(tmp_path, tiny_classifier, "sst2",
                                              task="sst2")) == 1
    assert trained_num_texts(model_trained_on(
        tmp_path, tiny_classifier, "own-pairs", train_file="t.csv", validation_file="d.csv",
        text_columns="a,b")) == 2
    assert trained_num_texts(model_trained_on(
        tmp_path, tiny_classifier, "own", train_file="t.csv", validation_file="d.csv")) == 1
    multitask = tmp_path / "mt" / "tasks" / "mrpc"
    shutil.copytree(tiny_classifier, multitask)
    assert trained_num_texts(multitask) == 2
    ensemble = tmp_path / "ensemble"
    shutil.copytree(tiny_classifier, ensemble)
    (ensemble / "metrics.json").write_text(json.dumps(
        {"source_run": str(tmp_path / "rte")}))
    assert trained_num_texts(ensemble) == 2


def test_a_pair_model_refuses_single_texts(capsys, tmp_path, tiny_classifier, labelled_file):
    model = model_trained_on(tmp_path, tiny_classifier, "rte", task="rte")
    out = tmp_path / "p.jsonl"
    code, _, err = run_cli(capsys, "predict", str(model), "--input-file", str(labelled_file),
                           "--output-file", str(out))
    lines = [line for line in err.splitlines() if line.startswith("selftune: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err
    assert "trained on sentence pairs" in lines[0] and "--text-columns A,B" in lines[0]
    assert not out.exists() and leftovers(tmp_path) == []
    code, _, err = run_cli(capsys, "evaluate", str(model), "--validation-file",
                           str(labelled_file))
    assert code == 2 and "trained on sentence pairs" in err


def test_a_single_text_model_warns_on_pairs(capsys, caplog, tmp_path, tiny_classifier,
                                            pair_file):
    model = model_trained_on(tmp_path, tiny_classifier, "sst2", task="sst2")
    out = tmp_path / "p.jsonl"
    with caplog.at_level(logging.WARNING, logger="selftune"):
        code, _, _ = run_cli(capsys, "predict", str(model), "--input-file", str(pair_file),
                             "--text-columns", "premise,hypothesis", "--output-file", str(out))
    assert code == 0 and len(out.read_text().splitlines()) == 12
    warnings = [r.getMessage() for r in caplog.records if "trained on single texts" in
                r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "--text-columns premise,hypothesis" in warnings[0]


def test_a_matching_input_says_nothing(capsys, caplog, tmp_path, tiny_classifier, pair_file,
                                       labelled_file):
    pairs = model_trained_on(tmp_path, tiny_classifier, "rte", task="rte")
    single = model_trained_on(tmp_path, tiny_classifier, "sst2", task="sst2")
    with caplog.at_level(logging.WARNING, logger="selftune"):
        assert predict_file(str(pairs), str(pair_file), str(tmp_path / "a.jsonl"),
                            ("premise", "hypothesis"), None, 64, 4) == 12
        assert predict_file(str(single), str(labelled_file), str(tmp_path / "b.jsonl"),
                            ("text",), None, 64, 4) == 40
        # And an unknown model (no record of its training) is not checked.
        assert predict_file(str(tiny_classifier), str(pair_file), str(tmp_path / "c.jsonl"),
                            ("premise", "hypothesis"), None, 64, 4) == 12
    assert not [r for r in caplog.records if "trained on" in r.getMessage()]


def test_export_keeps_what_the_model_reads(capsys, tmp_path, tiny_classifier, labelled_file):
    model = model_trained_on(tmp_path, tiny_classifier, "rte", task="rte")
    code, _, err = run_cli(capsys, "export", str(model), str(tmp_path / "plain"))
    assert code == 0, err
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert config[NUM_TEXTS_KEY] == 2
    assert trained_num_texts(tmp_path / "plain") == 2
    with pytest.raises(SelftuneError, match="trained on sentence pairs"):
        predict_file(str(tmp_path / "plain"), str(labelled_file), str(tmp_path / "p.jsonl"),
                     ("text",), None, 64, 4)


def test_evaluate_on_a_task_of_the_other_kind(capsys, caplog, tmp_path, tiny_classifier):
    """A registry task's texts against the model's: an RTE (pair) model on SST-2 is refused."""
    from tests.conftest import write_glue_folder

    glue = write_glue_folder(tmp_path / "data")
    model = model_trained_on(tmp_path, tiny_classifier, "mrpc", task="mrpc")
    code, _, err = run_cli(capsys, "evaluate", str(model), "--task", "cola", "--data-dir",
                           str(glue))
    assert code == 2 and "trained on sentence pairs" in err and "task cola" in err
