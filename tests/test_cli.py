"""The command line: help, and a clear one-line error (exit 2, no traceback) for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from selftune.cli import main


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.startswith("selftune: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("command", ["train", "evaluate", "predict", "export", "diagnose-cls",
                                     "bench", "report",
                                     "tasks"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: selftune " + command in capsys.readouterr().out


def test_train_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for flag in ("--learning-rate", "--per-device-train-batch-size", "--max-seq-length",
                 "--warmup-ratio", "--output-dir", "--overwrite-output-dir", "--train-file",
                 "--text-columns", "--label-column", "--data-dir", "--model", "--seed"):
        assert flag in out
    assert "--learning_rate" in out  # run_glue.py spelling


@pytest.fixture()
def files(tmp_path):
    def write(name: str, content: str | bytes):
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return str(path)
    return write


def train_args(tmp_path, tiny_model, train, dev, *extra):
    return ["train", "--train-file", train, "--validation-file", dev, "--model", str(tiny_model),
            "--output-dir", str(tmp_path / "out"), *extra]


def test_unknown_task(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "--task", "glue", "--output-dir", str(tmp_path / "o"))
    assert_one_line_error(code, err, "unknown task 'glue'", "--train-file")
    assert not (tmp_path / "o").exists()


def test_missing_file(capsys, tmp_path, tiny_model):
    code, _, err = run_cli(capsys, *train_args(tmp_path, tiny_model, str(tmp_path / "no.csv"),
                                               str(tmp_path / "no.csv")))
    assert_one_line_error(code, err, "file not found", "no.csv")


def test_missing_data_folder(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "--task", "rte", "--data-dir", str(tmp_path / "x"))
    assert_one_line_error(code, err, "data folder not found")


def test_missing_columns(capsys, tmp_path, tiny_model, files):
    train = files("t.csv", "review,stars\ngood,1\nbad,0\n")
    code, _, err = run_cli(capsys, *train_args(tmp_path, tiny_model, train, train))
    assert_one_line_error(code, err, "['text', 'label'] not found", "['review', 'stars']",
                          "--text-columns")


def test_dev_label_unseen_in_train(capsys, tmp_path, tiny_model, files):
    train = files("t.csv", "text,label\ngood,pos\nbad,neg\n")
    dev = files("d.csv", "text,label\ngood,pos\nfine,neutral\n")
    code, _, err = run_cli(capsys, *train_args(tmp_path, tiny_model, train, dev))
    assert_one_line_error(code, err, "['neutral'] never occur")
    assert not (tmp_path / "out").exists()  # nothing written for a bad input


def test_empty_label(capsys, tmp_path, tiny_model, files):
    train = files("t.csv", "text,label\ngood,\nbad,neg\n")
    code, _, err = run_cli(capsys, *train_args(tmp_path, tiny_model, train, train))
    assert_one_line_error(code, err, "empty label", "t.csv:2")


def test_non_numeric_regression_label(capsys, tmp_path, tiny_model, files):
    train = files("t.csv", "text,label\ngood,4.5\nbad,low\n")
    code, _, err = run_cli(capsys, *train_args(tmp_path, tiny_model, train, train,
                                               "--label-type", "regression"))
    assert_one_line_error(code, err, "'low' is not a number")


def test_empty_text(capsys, tmp_path, tiny_model, files):
    train = files("t.jsonl", '{"text": "good", "label": 1}\n{"text": "  ", "label": 0}\n')
    code, _, err = run_cli(capsys, *train_args(tmp_path, tiny_model, train, train))
    assert_one_line_error(code, err, "empty text", "t.jsonl:2")


def test_undecodable_bytes(capsys, tmp_path, tiny_model, files):
    train = files("t.csv", b"text,label\ngood,1\nbad \xff\xfe,0\n")
    code, _, err = run_cli(capsys, *train_args(tmp_path, tiny_model, train, train))
    assert_one_line_error(code, err, "not valid utf-8 at line 3")


def test_model_directory_without_weights(capsys, tmp_path, files, tiny_model):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((tiny_model / "config.json").read_text())
    (broken / "pytorch_model.bin").write_bytes(b"pickle")
    train = files("t.csv", "text,label\ngood,1\nbad,0\n")
    code, _, err = run_cli(capsys, "train", "--train-file", train, "--validation-file", train,
                           "--model", str(broken), "--output-dir", str(tmp_path / "o"))
    assert_one_line_error(code, err, "has no model weights", "pickle weights are not loaded")
    code, _, err = run_cli(capsys, "evaluate", str(broken), "--validation-file", train)
    assert_one_line_error(code, err, "has no model weights")


def test_finished_output_dir_is_refused(capsys, tmp_path, tiny_model, sentiment_files):
    train, dev = map(str, sentiment_files)
    args = train_args(tmp_path, tiny_model, train, dev, "--num-train-epochs", "1")
    code, out, _ = run_cli(capsys, *args)
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["task"] == "train"
    code, _, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, "already holds a finished run", "--overwrite-output-dir")
    code, _, _ = run_cli(capsys, *args, "--overwrite-output-dir")
    assert code == 0


def test_overwrite_never_deletes_a_folder_selftune_did_not_write(capsys, tmp_path, tiny_model,
                                                                   sentiment_files):
    train, dev = map(str, sentiment_files)
    own = tmp_path / "my-project"
    (own / "src").mkdir(parents=True)
    (own / "notes.txt").write_text("keep me")
    code, _, err = run_cli(capsys, "train", "--train-file", train, "--validation-file", dev,
                           "--model", str(tiny_model), "--output-dir", str(own),
                           "--overwrite-output-dir")
    assert_one_line_error(code, err, "is not a selftune run folder", "refusing to delete")
    assert (own / "notes.txt").read_text() == "keep me" and (own / "src").is_dir()


def test_hub_access_while_offline_names_the_flag(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("SELFTUNE_DATA", raising=False)
    code, _, err = run_cli(capsys, "train", "--task", "rte", "--output-dir", str(tmp_path / "o"))
    assert_one_line_error(code, err, "Hugging Face Hub", "--data-dir")


def test_hub_model_while_offline(capsys, monkeypatch, tmp_path, files):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    train = files("t.csv", "text,label\ngood,1\nbad,0\n")
    code, _, err = run_cli(capsys, "train", "--train-file", train, "--validation-file", train,
                           "--model", "someone/not-cached-model")
    assert_one_line_error(code, err, "could not load model", "--model")


def test_config_file_with_unknown_option(capsys, tmp_path, files):
    config = files("c.yaml", "task: rte\nlearning_rte: 1e-4\n")
    code, _, err = run_cli(capsys, "train", "--config", config)
    assert_one_line_error(code, err, "unknown option(s) ['learning_rte']")


def test_config_file_values_and_flag_precedence(capsys, tmp_path, tiny_model, sentiment_files):
    train, dev = map(str, sentiment_files)
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"train_file": train, "validation_file": dev,
                                  "model": str(tiny_model), "num_train_epochs": 5,
                                  "output_dir": str(tmp_path / "o")}))
    code, _, _ = run_cli(capsys, "train", "--config", str(config), "--num-train-epochs", "1")
    assert code == 0
    saved = json.loads((tmp_path / "o" / "run_config.json").read_text())
    assert saved["num_train_epochs"] == 1 and saved["train_file"] == train


def test_predict_bad_output_suffix(capsys, tmp_path, tiny_model, files):
    data = files("t.csv", "text\ngood\n")
    code, _, err = run_cli(capsys, "predict", str(tiny_model), "--input-file", data,
                           "--output-file", str(tmp_path / "p.xlsx"))
    assert_one_line_error(code, err, ".jsonl, .csv or .tsv")


def test_bad_option_value(capsys, tmp_path, files):
    train = files("t.csv", "text,label\ngood,1\nbad,0\n")
    code, _, err = run_cli(capsys, "train", "--train-file", train, "--validation-file", train,
                           "--warmup-ratio", "1.5")
    assert_one_line_error(code, err, "--warmup-ratio must be in [0, 1)")


def test_tracker_without_its_package_names_what_to_install(capsys, tmp_path, sentiment_files,
                                                            monkeypatch):
    import transformers.integrations

    monkeypatch.setattr(transformers.integrations, "get_available_reporting_integrations",
                        lambda: [])  # as on a fresh install: no tracker package
    train, dev = map(str, sentiment_files)
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--train-file", train, "--validation-file", dev,
                           "--report-to", "tensorboard", "--output-dir", str(out))
    assert_one_line_error(code, err, "--report-to tensorboard", "pip install tensorboard")
    assert not out.exists()  # refused before anything is written


def test_real_entry_point_prints_no_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "selftune", "train", "--task", "nope"],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("selftune: error: unknown task 'nope'; known tasks: cola, "
                                   "sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli, imdb, ag_news, "
                                   "mr, cr, mpqa (or give your own data with --train-file/"
                                   "--validation-file)")
    debug = subprocess.run([sys.executable, "-m", "selftune", "train", "--task", "nope",
                            "--debug"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert "Traceback" in debug.stderr


def test_unknown_scheduler_is_a_clear_error(capsys, tmp_path, files):
    train = files("t.csv", "text,label\ngood,1\nbad,0\n")
    code, _, err = run_cli(capsys, "train", "--train-file", train, "--validation-file", train,
                           "--lr-scheduler-type", "zigzag", "--output-dir", str(tmp_path / "o"))
    assert_one_line_error(code, err, "invalid training option", "zigzag")
    assert not (tmp_path / "o").exists()


def test_header_only_file(capsys, tmp_path, tiny_model, files):
    train = files("t.tsv", "text\tlabel\n")
    code, _, err = run_cli(capsys, *train_args(tmp_path, tiny_model, train, train))
    assert_one_line_error(code, err, "no data rows")


def test_glue_label_outside_the_task(capsys, tmp_path, glue_dir):
    rte = glue_dir / "glue" / "RTE" / "train.tsv"
    rte.write_text(rte.read_text() + "99\tthe plot\tthe film\tmaybe\n")
    code, _, err = run_cli(capsys, "train", "--task", "rte", "--data-dir", str(glue_dir))
    assert_one_line_error(code, err, "label 'maybe' is not one of", "train.tsv:18")


def test_model_directory_without_tokenizer(capsys, tmp_path, tiny_model, files):
    broken = tmp_path / "no-tokenizer"
    broken.mkdir()
    for name in ("config.json", "model.safetensors"):
        (broken / name).write_bytes((tiny_model / name).read_bytes())
    train = files("t.csv", "text,label\ngood,1\nbad,0\n")
    code, _, err = run_cli(capsys, "train", "--train-file", train, "--validation-file", train,
                           "--model", str(broken), "--output-dir", str(tmp_path / "o"))
    assert_one_line_error(code, err, "no tokenizer files")


def test_output_dir_that_cannot_be_a_folder(capsys, tmp_path, tiny_model, sentiment_files):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    train, dev = map(str, sentiment_files)
    code, _, err = run_cli(capsys, "train", "--train-file", train, "--validation-file", dev,
                           "--model", str(tiny_model), "--output-dir", str(blocker / "run"))
    assert_one_line_error(code, err, "cannot write to --output-dir")


def test_disk_full_is_explained(capsys, tmp_path, tiny_model, sentiment_files, monkeypatch):
    import errno

    from selftune import outputs

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs, "write_json_atomic", full)
    train, dev = map(str, sentiment_files)
    code, _, err = run_cli(capsys, *train_args(tmp_path, tiny_model, train, dev))
    assert_one_line_error(code, err, "no space left on the device", "resume")


def test_unknown_option_value_is_argparse_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--task", "rte", "--strategy", "magic"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'magic'" in err and "Traceback" not in err


@pytest.mark.parametrize("command", [["evaluate", "m"], ["predict", "m", "--input-file", "x.csv"],
                                     ["teacher-predictions", "m", "--task", "rte",
                                      "--output-file", "p.jsonl"]])
@pytest.mark.parametrize("option", [["--batch-size", "0"], ["--max-seq-length", "0"],
                                    ["--batch-size", "many"]])
def test_inference_sizes_are_checked_as_they_are_read(capsys, command, option):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, *option])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option[0]}" in err and "Traceback" not in err
    assert ("must be at least" if option[1] != "many" else "not an integer") in err


def test_inference_longer_than_the_model_is_refused(capsys, tmp_path, tiny_classifier,
                                                    sentiment_files):
    train, dev = map(str, sentiment_files)
    code, _, err = run_cli(capsys, "evaluate", str(tiny_classifier), "--validation-file", dev,
                           "--max-seq-length", "256")
    assert_one_line_error(code, err, "longer than the model's 128 positions")


def test_very_long_texts_are_truncated_not_refused(capsys, tmp_path, tiny_model, files):
    long = " ".join(["good"] * 20000)
    train = files("t.csv", f"text,label\n{long},1\nbad movie,0\n{long},1\ndull plot,0\n")
    code, out, _ = run_cli(capsys, "train", "--train-file", train, "--validation-file", train,
                           "--model", str(tiny_model), "--max-seq-length", "32",
                           "--output-dir", str(tmp_path / "o"), "--num-train-epochs", "1")
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["task"] == "t"


def test_config_file_values_are_checked_like_flags(capsys, tmp_path, files):
    config = files("c.yaml", "task: rte\nstrategy: bogus\n")
    code, _, err = run_cli(capsys, "train", "--config", config)
    assert_one_line_error(code, err, "'bogus' is not one of baseline")
    config = files("c2.yaml", "task: rte\nnum_train_epochs: many\n")
    code, _, err = run_cli(capsys, "train", "--config", config)
    assert_one_line_error(code, err, "'many' is not a valid float")


def test_run_glue_spelling_of_boolean_flags(capsys):
    from selftune.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["train", "--task", "rte", "--overwrite_output_dir"])
    assert args.overwrite_output_dir is True
    args = parser.parse_args(["train", "--task", "rte", "--overwrite-output-dir",
                              "--no-overwrite_output_dir"])
    assert args.overwrite_output_dir is False
    assert parser.parse_args(["train", "--task", "rte"]).overwrite_output_dir is False
    # Accepted, but the usage line lists each switch once, in its dashed spelling.
    usage = parser._subparsers._group_actions[0].choices["train"].format_usage()
    assert "--overwrite-output-dir | --no-overwrite-output-dir]" in usage
    assert "overwrite_output_dir" not in usage


def test_unwritable_output_dir(capsys, tmp_path, tiny_model, sentiment_files, monkeypatch):
    import errno
    import pathlib

    # Simulated: permission bits do not stop root, which CI may be.
    out = tmp_path / "read-only" / "run"
    original = pathlib.Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self == out:
            raise PermissionError(errno.EACCES, "Permission denied")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    train, dev = map(str, sentiment_files)
    code, _, err = run_cli(capsys, "train", "--train-file", train, "--validation-file", dev,
                           "--model", str(tiny_model), "--output-dir", str(out))
    assert_one_line_error(code, err, "cannot write to --output-dir", "Permission denied")
    assert not out.exists()


@pytest.mark.parametrize("option", [["--label-type", "classification"],
                                    ["--text-columns", "sentence1,sentence2"]])
def test_user_file_option_with_a_registry_task(capsys, tmp_path, glue_dir, option):
    code, _, err = run_cli(capsys, "train", "--task", "stsb", "--data-dir", str(glue_dir),
                           "--output-dir", str(tmp_path / "o"), *option)
    assert_one_line_error(code, err, option[0], "only apply to your own files",
                          "stsb is a regression task")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", [["evaluate", "--validation-file", "DEV"],
                                     ["predict", "--input-file", "DEV", "--output-file", "P.csv"],
                                     ["export", "OUT"]])
def test_a_model_without_a_trained_head_is_refused(capsys, tmp_path, tiny_model, sentiment_files,
                                                   command):
    """A pretrained encoder's head would be drawn at random: predictions that change per run."""
    dev = str(sentiment_files[1])
    args = [a.replace("DEV", dev).replace("P.csv", str(tmp_path / "p.csv"))
            .replace("OUT", str(tmp_path / "exported")) for a in command]
    code, _, err = run_cli(capsys, args[0], str(tiny_model), *args[1:])
    assert_one_line_error(code, err, "not a fine-tuned sequence classifier", "classifier.weight")
    assert not (tmp_path / "p.csv").exists()


def test_output_dir_that_is_the_model_is_refused(capsys, tmp_path, tiny_model, sentiment_files):
    import shutil

    model = tmp_path / "my-model"
    shutil.copytree(tiny_model, model)
    before = (model / "model.safetensors").read_bytes()
    train, dev = map(str, sentiment_files)
    for extra in ([], ["--overwrite-output-dir"]):
        code, _, err = run_cli(capsys, "train", "--train-file", train, "--validation-file", dev,
                               "--model", str(model), "--output-dir", str(model) + "/", *extra)
        assert_one_line_error(code, err, "is the --model directory")
    assert (model / "model.safetensors").read_bytes() == before


def test_run_into_a_folder_of_the_users_own_is_refused(capsys, tmp_path, tiny_model,
                                                       sentiment_files):
    own = tmp_path / "papers"
    own.mkdir()
    (own / "draft.tex").write_text("keep me")
    train, dev = map(str, sentiment_files)
    code, _, err = run_cli(capsys, *train_args(tmp_path, tiny_model, train, dev)[:-1], str(own))
    assert_one_line_error(code, err, "is not a selftune run folder", "write the run into it")
    assert sorted(p.name for p in own.iterdir()) == ["draft.tex"]


def test_label_column_read_as_text_is_refused(capsys, tmp_path, tiny_model, sentiment_files):
    train, dev = map(str, sentiment_files)
    code, _, err = run_cli(capsys, *train_args(tmp_path, tiny_model, train, dev,
                                               "--text-columns", "label"))
    assert_one_line_error(code, err, "['label'] given for more than one role")


@pytest.mark.parametrize(("option", "message"), [
    (["--max-grad-norm", "-1"], "--max-grad-norm must be non-negative"),
    (["--seed", str(2**32)], "--seed must be in [0, 2^32)")])
def test_numbers_out_of_range(capsys, tmp_path, tiny_model, sentiment_files, option, message):
    train, dev = map(str, sentiment_files)
    code, _, err = run_cli(capsys, *train_args(tmp_path, tiny_model, train, dev, *option))
    assert_one_line_error(code, err, message)


def test_predictions_never_replace_the_input(capsys, tmp_path, tiny_classifier, files):
    data = files("t.csv", "text\ngood\n")
    code, _, err = run_cli(capsys, "predict", str(tiny_classifier), "--input-file", data,
                           "--output-file", data)
    assert_one_line_error(code, err, "is the --input-file")
    assert open(data).read() == "text\ngood\n"


@pytest.mark.parametrize("command", [["predict", "--input-file", "DEV", "--output-file", "D.csv"],
                                     ["evaluate", "--validation-file", "DEV", "--output-file",
                                      "D"]])
def test_output_file_that_is_a_folder(capsys, tmp_path, tiny_classifier, sentiment_files,
                                      command):
    (tmp_path / "D.csv").mkdir()
    (tmp_path / "D").mkdir()
    args = [str(tmp_path / a) if a in ("D", "D.csv") else a.replace("DEV", str(
        sentiment_files[1])) for a in command]
    code, _, err = run_cli(capsys, args[0], str(tiny_classifier), *args[1:])
    assert_one_line_error(code, err, "is a folder; give a file name")


def test_evaluate_takes_a_registry_task_or_a_file_not_both(capsys, tiny_classifier,
                                                            sentiment_files, glue_dir):
    code, _, err = run_cli(capsys, "evaluate", str(tiny_classifier), "--task", "rte",
                           "--data-dir", str(glue_dir), "--validation-file",
                           str(sentiment_files[1]))
    assert_one_line_error(code, err, "not both")


def test_model_with_invalid_config_json(capsys, tmp_path, tiny_model, sentiment_files):
    import shutil

    model = tmp_path / "broken"
    shutil.copytree(tiny_model, model)
    (model / "config.json").write_text("{not json")
    train, dev = map(str, sentiment_files)
    code, _, err = run_cli(capsys, "train", "--train-file", train, "--validation-file", dev,
                           "--model", str(model), "--output-dir", str(tmp_path / "o"))
    assert_one_line_error(code, err, "config.json is not valid JSON")


def test_encoder_decoder_model_is_refused(capsys, tmp_path, sentiment_files):
    from transformers import T5Config, T5ForConditionalGeneration

    model = tmp_path / "t5"
    T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_ff=32, num_layers=1,
                                        num_heads=2, d_kv=8)).save_pretrained(model)
    (model / "vocab.json").write_text("{}")  # passes the tokenizer-file check; never read
    train, dev = map(str, sentiment_files)
    code, _, err = run_cli(capsys, "train", "--train-file", train, "--validation-file", dev,
                           "--model", str(model), "--output-dir", str(tmp_path / "o"))
    assert_one_line_error(code, err, "encoder-decoder model (t5)")


def test_evaluate_a_hub_id_while_offline(capsys, monkeypatch, sentiment_files):
    """A name that is no local folder is taken for a Hub id, as `train --model` does."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run_cli(capsys, "evaluate", "someone/not-cached-classifier",
                           "--validation-file", str(sentiment_files[1]))
    assert_one_line_error(code, err, "could not load model 'someone/not-cached-classifier'",
                          "HF_HUB_OFFLINE=1", "no local folder has that name")


def test_stdout_is_the_final_json_alone(tmp_path, tiny_model, sentiment_files):
    """The Trainer's log dicts and progress bars, and our log lines, go to stderr: stdout
    parses as one JSON document (and is empty with --quiet)."""
    train, dev = sentiment_files
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def run(out: str, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "selftune", "train", "--train-file", str(train),
             "--validation-file", str(dev), "--model", str(tiny_model), "--output-dir",
             str(tmp_path / out), "--num-train-epochs", "1", "--logging-steps", "1", *extra],
            capture_output=True, text=True, env=env, cwd=tmp_path)

    proc = run("loud")
    assert proc.returncode == 0, proc.stderr
    assert "'loss'" in proc.stderr  # the Trainer's log dicts were printed, on stderr
    result = json.loads(proc.stdout)
    assert result["score"] == json.loads((tmp_path / "loud" / "metrics.json").read_text())["score"]
    quiet = run("quiet", "--quiet")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout == "" and (tmp_path / "quiet" / "metrics.json").is_file()


def test_evaluate_prints_its_json_or_nothing_when_quiet(capsys, tmp_path, tiny_classifier,
                                                        sentiment_files):
    _, dev = sentiment_files
    args = ["evaluate", str(tiny_classifier), "--validation-file", str(dev)]
    code, out, _ = run_cli(capsys, *args)
    printed = json.loads(out)
    assert code == 0 and printed["num_examples"] == 16
    metrics_file = tmp_path / "metrics.json"
    code, out, _ = run_cli(capsys, *args, "--output-file", str(metrics_file), "--quiet")
    assert code == 0 and out == ""
    assert json.loads(metrics_file.read_text()) == printed  # quiet, but still written
