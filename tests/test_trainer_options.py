"""Every transformers.TrainingArguments option reachable from train and bam, generated from the
dataclass; the options selftune owns refused with their reason."""

from __future__ import annotations

import dataclasses
import json

import pytest
from transformers import TrainingArguments

from selftune.cli import build_parser, main
from selftune.config import TrainConfig
from selftune.errors import SelftuneError
from selftune.recipes.bam import BamConfig
from selftune.trainer_options import OWNED, SPEC_FILE, generate_spec, installed_transformers_version


def option_strings(command: str) -> set[str]:
    parser = build_parser()
    commands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return set(commands.choices[command]._option_string_actions)


@pytest.mark.parametrize("command, config", [("train", TrainConfig), ("bam", BamConfig)])
def test_every_training_argument_is_an_option_in_both_spellings(command, config):
    flags = option_strings(command)
    ours = {f.name for f in dataclasses.fields(config)}
    for field in dataclasses.fields(TrainingArguments):
        if not field.init or field.name in ("debug",):
            continue
        name = field.name
        if name in ours and command == "bam":
            continue  # a selftune option (some are not offered for multi-task runs)
        dashed = "--" + name.replace("_", "-")
        assert dashed in flags, f"{command}: no {dashed}"
        if "_" in name:
            assert "--" + name in flags, f"{command}: no --{name}"


def test_the_committed_description_is_the_installed_dataclass():
    committed = json.loads(SPEC_FILE.read_text())
    generated = generate_spec()
    if committed["transformers_version"] == installed_transformers_version():
        assert committed == generated
    else:  # another transformers: generated once into the user's cache instead
        assert {f["name"] for f in generated["fields"]} >= {
            f["name"] for f in committed["fields"]} - set(OWNED)


def test_a_trainer_option_reaches_the_trainer(tiny_model, sentiment_files, tmp_path, capsys):
    train_file, dev_file = sentiment_files
    out = tmp_path / "run"
    code = main(["train", "--model", str(tiny_model), "--train-file", str(train_file),
                 "--validation-file", str(dev_file), "--output-dir", str(out),
                 "--max_steps", "2", "--adam-beta2", "0.98", "--no-eval-each-epoch"])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_steps"] == 2
    saved = json.loads((out / "run_config.json").read_text())
    assert saved["trainer_options"] == {"max_steps": 2, "adam_beta2": 0.98}


def test_a_config_file_takes_trainer_options_at_the_top_level(tiny_model, sentiment_files,
                                                              tmp_path, capsys):
    train_file, dev_file = sentiment_files
    config = tmp_path / "options.yaml"
    config.write_text(f"model: {tiny_model}\ntrain_file: {train_file}\n"
                      f"validation_file: {dev_file}\nmax_steps: 3\nlr_scheduler_kwargs: {{}}\n")
    out = tmp_path / "run"
    code = main(["train", "--config", str(config), "--output-dir", str(out),
                 "--no-eval-each-epoch", "--max-steps", "1"])  # the command line wins
    assert code == 0, capsys.readouterr().err
    assert json.loads((out / "metrics.json").read_text())["global_steps"] == 1


@pytest.mark.parametrize("argv, message", [
    (["--save-total-limit", "3"], "--save-total-limit is selftune's to set"),
    (["--eval_strategy", "steps"], "--eval_strategy is selftune's to set"),
    (["--remove-unused-columns"], "collators need the columns"),
    (["--max-steps", "two"], "'two' is not a valid int"),
    (["--optim", "sgdx"], "'sgdx' is not one of"),
    (["--no-such-option"], "unrecognized arguments: --no-such-option"),
])
def test_refused_and_bad_trainer_options_name_the_reason(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["train", "--task", "rte", *argv])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "usage: selftune train" in err  # the subcommand's usage, not the top level's


def test_config_files_refuse_owned_trainer_options():
    with pytest.raises(SelftuneError, match="'save_strategy' is selftune's to set"):
        TrainConfig.from_dict({"task": "rte", "save_strategy": "steps"})
    cfg = TrainConfig.from_dict({"task": "rte", "max_steps": "4", "fp16": "false"})
    assert cfg.trainer_options == {"max_steps": 4, "fp16": False}
    assert cfg.hash() != TrainConfig.from_dict({"task": "rte"}).hash()
